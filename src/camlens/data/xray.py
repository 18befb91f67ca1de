"""Synthetic chest radiographs with a finding, and the hospital marker as a moving shortcut.

Each image is a grey, chest-radiograph-like picture: a dark background (air), a bright body
outline, two darker lung fields (jittered ellipses), faint ribs, a brighter spine, a smooth
intensity gradient across the film and pixel noise. Values are 12-bit (0..4095), stored in a
16-bit PNG (Pillow mode ``I;16``) or, with ``format="dicom"``, in a DICOM file
(MONOCHROME2, BitsAllocated 16, BitsStored 12; Secondary Capture, ConversionType ``SYN``; no
patient data: PatientName and PatientID are present but empty).

Classes: ``finding`` images show an *opacity*, a brighter blurred blob inside one lung field
(its mask is the blob above half its peak, within the lung); ``normal`` images do not.

Every image comes from one of ``hospitals`` hospitals (``A``, ``B``, ...). A hospital puts
its own laterality marker on the film, at a place that varies per image along one of the
four edges and never over the lungs: a lead letter (``L``, ``R``, ``X``: a bright letter on a
dark square; ``ring``: a bright ring) or a burned-in digital label (``box-R``, ``box-L``: a
dark letter on a bright square). By default hospital A uses ``L`` and hospital B ``box-R``,
markers that differ clearly even at 64 px (a small CNN does not learn ``L`` against ``R``
in a short run: both shrink to similar bright strokes). Each hospital also has its own
prevalence of the finding (``prevalence``, by default 80 % at A, 20 % at B). That reproduces Zech et al. 2018: a model can predict the
finding from the marker without looking at the lungs. Apart from the marker, the images of
all hospitals come from the same distribution, so swapping the markers between hospitals
(``render_xray_image(..., marker=...)``) is a clean counterfactual.

Output layout (``make_xray_dataset``; ``NNNN`` is the image's number in the data set)::

    OUT/images/<class>/xray_NNNN.png          the images (.dcm with format="dicom")
    OUT/masks/finding/xray_NNNN.png           finding masks (0 or 255), finding images only
    OUT/lungs/masks/<class>/xray_NNNN.png     the lung-field mask of every image
    OUT/markers/masks/<class>/xray_NNNN.png   the marker's square of every image
    OUT/annotations.csv                       image,x0,y0,x1,y1,label: the finding boxes
    OUT/lungs.csv                             image,x0,y0,x1,y1,label: both lung boxes per
                                              image, labelled with the image's class
    OUT/dataset.json                          all parameters, the hospitals, one record per
                                              image

so that ``camlens evaluate`` reads each region as it is: ``OUT/annotations.csv`` or ``OUT``
(the finding masks), ``OUT/lungs.csv`` (energy inside the lung boxes) or ``OUT/lungs
--images OUT/images`` (lung masks: ``--metrics mask``), ``OUT/markers --images OUT/images``
(the markers). Boxes are ``[x0, y0, x1, y1]`` in pixel-edge coordinates (``x1``, ``y1``
exclusive); paths are relative to ``OUT``. ``OUT`` follows the folder rules of every camlens
command, as for ``camlens make-dataset shapes``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from camlens.errors import ConfigError
from camlens.io.annotations import mask_box
from camlens.pipeline import OutputFolder, spelling
from camlens.writers import atomic_path, write_json, write_png, write_text

__all__ = [
    "CLASSES",
    "FORMATS",
    "MARKERS",
    "XrayConfig",
    "XraySample",
    "derived_uid",
    "edge_band",
    "hospital_name",
    "make_xray_dataset",
    "marker_patch",
    "marker_side",
    "render_xray_image",
    "write_dicom",
    "xray_plan",
]

#: The classes, in ImageFolder (alphabetical) order.
CLASSES = ("finding", "normal")
#: Marker styles; hospital k uses ``markers[k]`` (default: the first ``hospitals`` of these).
MARKERS = ("L", "box-R", "X", "ring", "R", "box-L")
FORMATS = ("png", "dicom")
#: The largest pixel value (12-bit data).
MAX_VALUE = 4095
#: The task name a generated data set records in its output folder's settings.
TASK = "make-dataset"

Box = tuple[int, int, int, int]

_GLYPHS = {  # 5 x 7 pixel letters, 1 = stroke
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "X": ["10001", "10001", "01010", "00100", "01010", "10001", "10001"],
}
_MARKER_DARK, _MARKER_BRIGHT = 0.08, 0.97  # intensities of the marker's square and glyph
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class XrayConfig:
    """Parameters of an x-ray data set (all of them end up in ``dataset.json``).

    Attributes:
        n: number of images; image ``i`` comes from hospital ``i % hospitals``.
        size: image side in pixels (at least 48).
        seed: the same seed gives byte-identical files.
        format: ``"png"`` (16-bit PNG) or ``"dicom"``.
        hospitals: number of hospitals, 2 to ``len(MARKERS)``.
        prevalence: share of finding images per hospital (exact: rounded per hospital);
            default 0.8 at the first hospital, 0.2 at the last, evenly spaced between.
        markers: the marker style of each hospital, from ``MARKERS`` (default: in order).
        finding_contrast: peak brightness of the opacity, in units of the full range.
        noise: standard deviation of the pixel noise, in units of the full range.
    """

    n: int = 600
    size: int = 128
    seed: int = 0
    format: str = "png"
    hospitals: int = 2
    prevalence: tuple[float, ...] | None = None
    markers: tuple[str, ...] | None = None
    finding_contrast: float = 0.1
    noise: float = 0.02

    def validated(self) -> XrayConfig:
        """This configuration with defaults filled in; raises ConfigError when it is invalid.

        Example:
            >>> XrayConfig(hospitals=3).validated().prevalence
            (0.8, 0.5, 0.2)
        """
        if not 2 <= self.hospitals <= len(MARKERS):
            raise ConfigError(
                f"hospitals={self.hospitals}: use 2 to {len(MARKERS)} hospitals (one marker "
                f"style each: {', '.join(MARKERS)})"
            )
        if self.n < 2 * self.hospitals:
            raise ConfigError(
                f"n={self.n} images are too few for {self.hospitals} hospitals; use at least "
                f"{2 * self.hospitals}"
            )
        if self.size < 48:
            raise ConfigError(f"size={self.size} is too small for x-rays; use at least 48")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}; choose from {', '.join(FORMATS)}")
        for name in ("finding_contrast", "noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        return XrayConfig(
            **{
                **asdict(self),
                "prevalence": self._prevalence(),
                "markers": self._markers(),
            }
        )

    def _prevalence(self) -> tuple[float, ...]:
        if self.prevalence is None:
            steps = np.linspace(0.8, 0.2, self.hospitals)
            return tuple(round(float(p), 6) for p in steps)
        values = tuple(float(p) for p in self.prevalence)
        if len(values) != self.hospitals:
            raise ConfigError(
                f"prevalence has {len(values)} value(s) {list(values)} but there are "
                f"{self.hospitals} hospitals; give one share of finding images per hospital"
            )
        if not all(0.0 <= p <= 1.0 for p in values):
            raise ConfigError(f"prevalence {list(values)}: every share must lie in [0, 1]")
        return values

    def _markers(self) -> tuple[str, ...]:
        if self.markers is None:
            return MARKERS[: self.hospitals]
        markers = tuple(m.strip() for m in self.markers)
        unknown = [m for m in markers if m not in MARKERS]
        if unknown:
            raise ConfigError(
                f"unknown marker(s) {', '.join(unknown)}; choose from {', '.join(MARKERS)}"
            )
        if len(markers) != self.hospitals or len(set(markers)) != len(markers):
            raise ConfigError(
                f"markers {list(markers)}: give {self.hospitals} different markers, one per "
                f"hospital, from {', '.join(MARKERS)}"
            )
        return markers


@dataclass(frozen=True)
class XraySample:
    """One generated radiograph and its ground truth.

    Attributes:
        pixels: (size, size) uint16, values 0..4095.
        label: ``"finding"`` or ``"normal"``.
        hospital: the hospital's index (0 is ``A``).
        marker: the marker style drawn (``"L"``...).
        lungs: (size, size) bool, both lung fields.
        lung_boxes: the box of each lung field (the image's left one first).
        finding: (size, size) bool, the opacity's pixels (all False for normal images).
        finding_box: the opacity's box, or None for normal images.
        marker_box: the marker's square.
        marker_edge: the edge it lies along (``top``, ``bottom``, ``left``, ``right``).
    """

    pixels: np.ndarray
    label: str
    hospital: int
    marker: str
    lungs: np.ndarray
    lung_boxes: tuple[Box, Box]
    finding: np.ndarray = field(repr=False)
    finding_box: Box | None
    marker_box: Box
    marker_edge: str


def hospital_name(index: int) -> str:
    """``A``, ``B``, ... for hospital 0, 1, ...

    Example:
        >>> hospital_name(0), hospital_name(3)
        ('A', 'D')
    """
    return chr(ord("A") + index)


def marker_side(size: int) -> int:
    """Side of the marker's square in pixels: about 11 % of the image side, at least 7.

    So that the marker keeps 7 pixels when ``camlens train`` shrinks the images to its
    default 64 px: a small CNN learns the marker then, but hardly at 5 px.

    Example:
        >>> marker_side(128), marker_side(64)
        (14, 7)
    """
    return max(7, round(size * 0.11))


def edge_band(size: int) -> int:
    """Every marker lies within this many pixels of the edge it is placed along.

    Example:
        >>> edge_band(128)
        22
    """
    return 2 * _margin(size) + marker_side(size)


def _margin(size: int) -> int:
    return max(1, round(size * 0.03))


def marker_patch(style: str, side: int) -> np.ndarray:
    """The marker's pixels, (side, side) float in [0, 1]: a bright glyph on a dark square, or
    for ``box-*`` styles a dark glyph on a bright square.

    Parameters:
        style: one of ``MARKERS``.
        side: the square's side in pixels.

    Returns:
        The patch, values ``_MARKER_DARK`` (0.08) and ``_MARKER_BRIGHT`` (0.97).

    Example:
        >>> (marker_patch("L", 7) > 0.5).astype(int)
        array([[0, 0, 0, 0, 0, 0, 0],
               [0, 1, 0, 0, 0, 0, 0],
               [0, 1, 0, 0, 0, 0, 0],
               [0, 1, 0, 0, 0, 0, 0],
               [0, 1, 0, 0, 0, 0, 0],
               [0, 1, 1, 1, 1, 1, 0],
               [0, 0, 0, 0, 0, 0, 0]])
    """
    if style not in MARKERS:
        raise ConfigError(f"unknown marker {style!r}; choose from {', '.join(MARKERS)}")
    pad = max(1, side // 8)
    inner = side - 2 * pad
    glyph = style.removeprefix("box-")
    if glyph == "ring":
        yy, xx = np.mgrid[0:inner, 0:inner] + 0.5 - inner / 2
        radius = np.hypot(xx, yy)
        stroke = (radius <= inner / 2) & (radius >= inner / 2 - max(1.5, inner / 5))
    else:
        bitmap = np.array([[c == "1" for c in row] for row in _GLYPHS[glyph]])
        centres = (np.arange(inner) + 0.5) / inner  # nearest bitmap pixel: keeps both ends
        rows = (centres * bitmap.shape[0]).astype(int)
        cols = (centres * bitmap.shape[1]).astype(int)
        stroke = bitmap[np.ix_(rows, cols)]
    ground, ink = (
        (_MARKER_BRIGHT, _MARKER_DARK) if glyph != style else (_MARKER_DARK, _MARKER_BRIGHT)
    )
    patch = np.full((side, side), ground)
    patch[pad : pad + inner, pad : pad + inner] = np.where(stroke, ink, ground)
    return patch


def xray_plan(config: XrayConfig) -> list[tuple[str, int]]:
    """(label, hospital) per image: image ``i`` is from hospital ``i % hospitals``, and
    exactly ``round(prevalence[h] * n_h)`` of hospital ``h``'s ``n_h`` images are findings
    (which ones: drawn from the seed).

    Example:
        >>> plan = xray_plan(XrayConfig(n=10, seed=1).validated())
        >>> [sum(1 for label, h in plan if h == k and label == "finding") for k in (0, 1)]
        [4, 1]
    """
    config = config.validated()
    hospitals = np.arange(config.n) % config.hospitals
    labels = np.full(config.n, "normal", dtype=object)
    rng = np.random.default_rng([config.seed, 2**31 - 1])
    for h, share in enumerate(config.prevalence or ()):
        members = np.flatnonzero(hospitals == h)
        chosen = rng.permutation(len(members))[: round(share * len(members))]
        labels[members[chosen]] = "finding"
    return [(str(label), int(h)) for label, h in zip(labels, hospitals, strict=True)]


def render_xray_image(
    config: XrayConfig, index: int, label: str, hospital: int, *, marker: str | None = None
) -> XraySample:
    """Draw image ``index`` of a data set: the chest, maybe an opacity, the hospital's marker.

    Deterministic: the random stream is seeded by ``(config.seed, index)``. The anatomy, the
    opacity's place and the marker's place do not depend on ``label`` or the marker style,
    so the same ``index`` with another ``marker`` (or label) is the same film otherwise.

    Parameters:
        config: the data set's parameters (validated here).
        index: the image's number; it seeds the image's random stream.
        label: ``"finding"`` draws the opacity, ``"normal"`` does not.
        hospital: index of the hospital whose marker style is drawn.
        marker: draw this style instead of the hospital's (a counterfactual).

    Returns:
        The pixels and the ground truth.

    Example:
        >>> config = XrayConfig(size=64).validated()
        >>> a = render_xray_image(config, 3, "finding", 0)
        >>> b = render_xray_image(config, 3, "finding", 0, marker="R")
        >>> a.pixels.dtype, a.marker, b.marker, a.marker_box == b.marker_box
        (dtype('uint16'), 'L', 'R', True)
        >>> bool((a.finding & ~a.lungs).any())
        False
    """
    config = config.validated()
    if label not in CLASSES:
        raise ConfigError(f"unknown class {label!r}; choose from {', '.join(CLASSES)}")
    if not 0 <= hospital < config.hospitals:
        raise ConfigError(f"hospital {hospital} does not exist; use 0 to {config.hospitals - 1}")
    style = marker or (config.markers or MARKERS)[hospital]
    rng = np.random.default_rng([config.seed, index])
    size = config.size
    image, lungs, lung_alpha, lung_boxes = _chest(rng, size)
    opacity, finding = _opacity(rng, size, lungs, config.finding_contrast)
    if label == "finding":
        image = image + opacity * lung_alpha
    else:
        finding = np.zeros_like(finding)
    marker_box, edge = _marker_place(rng, size, lungs)
    x0, y0, x1, y1 = marker_box
    image[y0:y1, x0:x1] = marker_patch(style, marker_side(size))
    image = image + rng.normal(0.0, config.noise, image.shape)
    pixels = np.clip(np.rint(image * MAX_VALUE), 0, MAX_VALUE).astype(np.uint16)
    finding_box = mask_box(finding) if label == "finding" else None
    return XraySample(
        pixels, label, hospital, style, lungs, lung_boxes, finding, finding_box, marker_box, edge
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (u = x, v = y) in units of the image side."""
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size
    return u, v


def _chest(
    rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[Box, Box]]:
    """The film without finding and marker, in [0, 1]; the lung mask, its soft coverage and
    the two lung boxes."""
    u, v = _grid(size)
    cx = 0.5 + rng.uniform(-0.03, 0.03)
    half_width, tissue = rng.uniform(0.36, 0.42), rng.uniform(0.55, 0.65)
    shape = (np.abs((u - cx) / half_width) ** 2.5 + np.abs((v - 0.64) / 0.58) ** 2.5) ** 0.4
    body = _soft(1.0 - shape, 1.5 / (size * half_width))
    spine = 0.12 * np.exp(-(((u - cx) / 0.045) ** 2))
    phase = (v - 0.12 * ((u - cx) / 0.3) ** 2) * rng.uniform(9.0, 12.0) + rng.uniform(0, 1)
    ribs = 0.06 * (0.5 + 0.5 * np.cos(2 * math.pi * phase)) ** 6 * (v < 0.78)
    lung_alpha = np.zeros((size, size))
    lungs = np.zeros((size, size), dtype=bool)
    boxes = []
    for side in (-1.0, 1.0):  # the image's left lung first
        alpha, mask = _lung(rng, size, u, v, cx + side * rng.uniform(0.14, 0.17))
        lung_alpha, lungs = np.maximum(lung_alpha, alpha), lungs | mask
        boxes.append(mask_box(mask))
    image = 0.06 + body * (tissue + spine + ribs) * (1.0 - 0.5 * lung_alpha)
    angle, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.25)
    image = image * (1.0 + strength * (math.cos(angle) * (u - 0.5) + math.sin(angle) * (v - 0.5)))
    return image, lungs, lung_alpha, (boxes[0], boxes[1])


def _lung(
    rng: np.random.Generator, size: int, u: np.ndarray, v: np.ndarray, centre_u: float
) -> tuple[np.ndarray, np.ndarray]:
    """One lung field: a tilted ellipse with a wavy outline; (soft coverage, mask)."""
    centre_v = rng.uniform(0.42, 0.47)
    a, b, tilt = rng.uniform(0.09, 0.115), rng.uniform(0.17, 0.21), rng.uniform(-0.15, 0.15)
    du, dv = u - centre_u, v - centre_v
    x = (math.cos(tilt) * du + math.sin(tilt) * dv) / a
    y = (-math.sin(tilt) * du + math.cos(tilt) * dv) / b
    theta = np.arctan2(y, x)
    wobble = 1.0 + sum(
        0.05 * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * math.pi)) for k in (2, 3)
    )
    level = 1.0 - np.hypot(x, y) / wobble
    alpha = _soft(level, 1.5 / (size * a))
    return alpha, level > 0


def _soft(level: np.ndarray, width: float) -> np.ndarray:
    """A smooth step from 0 (level < -width) to 1 (level > width)."""
    return np.clip(0.5 + level / (2 * width), 0.0, 1.0)


def _opacity(
    rng: np.random.Generator, size: int, lungs: np.ndarray, contrast: float
) -> tuple[np.ndarray, np.ndarray]:
    """A blurred blob centred well inside the lungs: (brightness, mask inside the lungs)."""
    sigma = rng.uniform(0.03, 0.05) * size
    inside = ndimage.binary_erosion(lungs, iterations=max(1, round(sigma)))
    candidates = np.argwhere(inside if inside.any() else lungs)
    row, col = candidates[rng.integers(len(candidates))]
    yy, xx = np.mgrid[0:size, 0:size]
    blob = np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * sigma**2))
    peak = contrast * rng.uniform(0.8, 1.2)
    return peak * blob, (blob >= 0.5) & lungs


def _marker_place(rng: np.random.Generator, size: int, lungs: np.ndarray) -> tuple[Box, str]:
    """A square along a random edge, at a random offset, that does not touch the lungs."""
    side, margin = marker_side(size), _margin(size)
    near_lungs = ndimage.binary_dilation(lungs, iterations=1)
    for _ in range(200):
        edge = ("top", "bottom", "left", "right")[int(rng.integers(4))]
        along = int(rng.integers(margin, size - margin - side + 1))
        depth = int(rng.integers(1, 2 * margin + 1))
        across = depth if edge in ("top", "left") else size - depth - side
        x0, y0 = (along, across) if edge in ("top", "bottom") else (across, along)
        box = (x0, y0, x0 + side, y0 + side)
        if not near_lungs[y0 : y0 + side, x0 : x0 + side].any():
            return box, edge
    raise ConfigError(  # pragma: no cover - the lungs never reach the edge band
        f"found no place for the marker off the lungs in a {size} px image; use a larger size"
    )


# --- writing the data set ------------------------------------------------------------------


def make_xray_dataset(
    out: str | Path,
    config: XrayConfig | None = None,
    *,
    overwrite: bool = False,
    cli: bool = False,
) -> dict:
    """Generate an x-ray data set into ``out`` (see the module docstring for the layout).

    Parameters:
        out: output folder; created. A folder that is not empty is refused unless
            ``overwrite``; nothing is created before the parameters are checked.
        config: the parameters (default ``XrayConfig()``: 600 images of 128 px, 2 hospitals
            with 80 % and 20 % findings, 16-bit PNG).
        overwrite: remove the files an earlier data set wrote into ``out`` (and nothing else),
            then generate.
        cli: error messages name command-line options (``--overwrite``); set by
            ``camlens make-dataset``.

    Returns:
        The content of ``dataset.json``: ``parameters``, ``classes``, ``hospitals`` (per
        hospital: name, marker, images, findings, prevalence) and ``images`` (one record per
        image: ``image``, ``label``, ``hospital``, ``marker``, ``marker_box``,
        ``marker_edge``, ``marker_mask``, ``finding_box``, ``finding_mask``, ``lung_boxes``,
        ``lung_mask``).

    Raises:
        ConfigError: invalid parameters; ``out`` is a file, or a folder that is not empty
            without ``overwrite``, or holds a file of yours where the data set writes one.

    Example:
        >>> info = make_xray_dataset("xray", XrayConfig(n=10, size=64, seed=1))
        >>> [(h["name"], h["marker"], h["findings"], h["images"]) for h in info["hospitals"]]
        [('A', 'L', 4, 5), ('B', 'box-R', 1, 5)]
        >>> info["images"][0]["image"], info["images"][0]["hospital"]
        ('images/normal/xray_0000.png', 'A')
    """
    folder = OutputFolder(out, spell=spelling(cli, "out"))
    folder.check(resume=False, overwrite=overwrite, resumable=False)
    config = (config or XrayConfig()).validated()
    parameters = _parameters(config)
    folder.open(TASK, {"parameters": parameters}, resume=False, overwrite=overwrite)
    try:
        info = _write_dataset(folder, config, parameters)
    except Exception:
        folder.discard()  # leave nothing half-made
        raise
    finally:
        folder.close()
    return info


def _parameters(config: XrayConfig) -> dict:
    return {
        "kind": "xray",
        **asdict(config),
        "prevalence": list(config.prevalence or ()),
        "markers": list(config.markers or ()),
        "max_value": MAX_VALUE,
        "marker_side": marker_side(config.size),
        "edge_band": edge_band(config.size),
    }


def _write_dataset(folder: OutputFolder, config: XrayConfig, parameters: dict) -> dict:
    findings = [["image", "x0", "y0", "x1", "y1", "label"]]
    lung_rows = [["image", "x0", "y0", "x1", "y1", "label"]]
    records = []
    for index, (label, hospital) in enumerate(xray_plan(config)):
        sample = render_xray_image(config, index, label, hospital)
        record = _write_sample(folder, config, index, sample)
        if sample.finding_box is not None:
            findings.append([record["image"], *sample.finding_box, "finding"])
        lung_rows.extend([record["image"], *box, label] for box in sample.lung_boxes)
        records.append(record)
    for name, rows in (("annotations.csv", findings), ("lungs.csv", lung_rows)):
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        write_text(folder.path(name), buffer.getvalue())
    info = {
        "generator": "camlens make-dataset xray",
        "parameters": parameters,
        "classes": list(CLASSES),
        "hospitals": _hospital_summary(config, records),
        "images": records,
    }
    write_json(folder.path("dataset.json"), info)
    return info


def _write_sample(folder: OutputFolder, config: XrayConfig, index: int, sample: XraySample) -> dict:
    """Write one image and its masks; return its dataset.json record."""
    stem, label = f"xray_{index:04d}", sample.label
    suffix = ".dcm" if config.format == "dicom" else ".png"
    image_path = f"images/{label}/{stem}{suffix}"
    if config.format == "dicom":
        write_dicom(folder.path(image_path), sample.pixels, _uid(config, "image", index))
    else:
        write_png(folder.path(image_path), Image.fromarray(sample.pixels))
    marker = np.zeros_like(sample.lungs)
    x0, y0, x1, y1 = sample.marker_box
    marker[y0:y1, x0:x1] = True
    masks = {"lung": (f"lungs/masks/{label}/{stem}.png", sample.lungs)}
    masks["marker"] = (f"markers/masks/{label}/{stem}.png", marker)
    if sample.finding_box is not None:
        masks["finding"] = (f"masks/finding/{stem}.png", sample.finding)
    for path, mask in masks.values():
        write_png(folder.path(path), Image.fromarray(mask.astype(np.uint8) * 255))
    return {
        "image": image_path,
        "label": label,
        "hospital": hospital_name(sample.hospital),
        "marker": sample.marker,
        "marker_box": list(sample.marker_box),
        "marker_edge": sample.marker_edge,
        "marker_mask": masks["marker"][0],
        "finding_box": list(sample.finding_box) if sample.finding_box else None,
        "finding_mask": masks["finding"][0] if "finding" in masks else None,
        "lung_boxes": [list(box) for box in sample.lung_boxes],
        "lung_mask": masks["lung"][0],
    }


def _hospital_summary(config: XrayConfig, records: list[dict]) -> list[dict]:
    summary = []
    for h, (share, marker) in enumerate(
        zip(config.prevalence or (), config.markers or (), strict=True)
    ):
        name = hospital_name(h)
        mine = [r for r in records if r["hospital"] == name]
        found = sum(1 for r in mine if r["label"] == "finding")
        summary.append(
            {
                "name": name,
                "marker": marker,
                "prevalence": share,
                "images": len(mine),
                "findings": found,
            }
        )
    return summary


def _uid(config: XrayConfig, kind: str, index: int) -> str:
    """A UID derived from the seed (so the same seed gives the same files)."""
    return derived_uid("camlens-xray", str(config.seed), kind, str(index))


def derived_uid(*parts: str) -> str:
    """A DICOM UID under the ``2.25`` root (PS3.5 B.2) from 128 bits of a hash of ``parts``:
    the same parts give the same UID, and nothing but ``parts`` goes into it.

    Example:
        >>> derived_uid("camlens", "1") == derived_uid("camlens", "1") != derived_uid("camlens")
        True
        >>> derived_uid("camlens", "1").startswith("2.25."), len(derived_uid("x")) <= 64
        (True, True)
    """
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def write_dicom(path: str | Path, pixels: np.ndarray, uid: str) -> Path:
    """Write a 12-bit MONOCHROME2 Secondary Capture DICOM file without patient data.

    Parameters:
        path: the file to write (atomically).
        pixels: (H, W) uint16 with values 0..4095.
        uid: the SOP Instance UID (also the file meta's Media Storage SOP Instance UID).

    Returns:
        ``path``.

    Example:
        >>> write_dicom("a.dcm", np.full((4, 4), 4095, np.uint16), "2.25.1")
        PosixPath('a.dcm')
        >>> import pydicom; ds = pydicom.dcmread("a.dcm")
        >>> int(ds.pixel_array.max()), ds.BitsStored, ds.PatientName
        (4095, 12, '')
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = _SECONDARY_CAPTURE, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        derived_uid(uid, "study"),
        derived_uid(uid, "series"),
    )
    ds.Modality, ds.ConversionType = "DX", "SYN"  # a synthetic image
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientName, ds.PatientID = "", ""  # type 2: present, empty
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "", "", "", ""
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, 1
    ds.PatientOrientation = ""
    ds.set_pixel_data(
        np.ascontiguousarray(pixels, dtype=np.uint16),
        "MONOCHROME2",
        12,
        generate_instance_uid=False,
    )
    # No window: readers then window min..max, as camlens does for the 16-bit PNG.
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(path)
