"""The concepts task: every input's concept maps against one fitted basis, as a picture.

The basis (``camlens.methods.concepts.ConceptBasis``, Deep Feature Factorization) is fitted
before the run (``camlens.api.factorizing.concepts``) and travels with the task. Per input
(``process``): decode, compute the coefficients of the batch against the basis, write

* ``concepts/<n>_<name>.png``: the image with each concept's region in its own colour (a pixel
  takes the colour of its strongest concept, its opacity from that concept's strength) and,
  below it, a legend naming each concept by its top classes and its share of this image;
* ``raw/<n>_<name>.npz``: ``raw`` (K, h, w), the coefficient maps, and ``shares`` (K,);
* one record in ``results.jsonl``: ``input``, ``status``, ``error``, ``picture``, ``raw``,
  ``size``, ``layer``, ``dominant`` (the concept with the largest share, or null) and
  ``concepts`` (per concept: ``concept``, ``share`` of the image's map mass, ``peak``).

``fold`` counts the records and, per concept, the images where it is the dominant one;
``write_concept_table`` writes ``concepts.json`` and ``concepts.csv`` from that.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from camlens.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OVERLAY_SIZE
from camlens.errors import ConfigError
from camlens.localize import normalize_maps
from camlens.methods.concepts import ConceptBasis, concept_shares
from camlens.models import Classifier
from camlens.pipeline import Item, OutputFolder
from camlens.render import colormap_table
from camlens.tasks.common import (
    FileWritingTask,
    Loaded,
    count_statuses,
    load_input,
    model_settings,
    output_stem,
    worker_model,
)
from camlens.writers import write_json, write_npz, write_png, write_text

__all__ = [
    "BASIS_FILE",
    "DEFAULT_FIT_IMAGES",
    "ConceptStyle",
    "ConceptsTask",
    "concept_colors",
    "concept_overlay",
    "concept_picture",
    "concept_table",
    "error_record",
    "legend_label",
    "legend_strip",
    "write_concept_table",
]

#: Images the concepts are fitted on by default: the first 64 inputs (``--fit-images``).
DEFAULT_FIT_IMAGES = 64
#: The fitted basis in the output folder (vectors, peaks, metadata); a resume reuses it.
BASIS_FILE = "concepts.npz"
#: Rows of a picture blended at once (bounded float64 work on the largest photos).
_BLEND_ROWS = 512
#: Height of one legend line under a picture, in pixels.
_LEGEND_LINE_PX = 22


@dataclass(frozen=True)
class ConceptStyle:
    """How concept pictures look: the colormap the concepts' colours come from (a qualitative
    one: ``tab10``, ``tab20``, ``Set1``...; with a continuous one, colours evenly spaced on
    it), the opacity of the strongest concept, and the longest side of a picture (0: the
    original size).

    Example:
        >>> ConceptStyle(colormap="Set1").check().alpha
        0.5
    """

    colormap: str = "tab10"
    alpha: float = 0.5
    overlay_size: int = DEFAULT_OVERLAY_SIZE

    def check(self) -> ConceptStyle:
        """This style, after checking it (an unknown colormap is a ``ConfigError``)."""
        try:
            colormap_table(self.colormap)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.overlay_size < 0:
            raise ConfigError(f"overlay_size must be >= 0 (0: original), got {self.overlay_size}")
        return self


@dataclass(frozen=True)
class ConceptsTask(FileWritingTask):
    """Concept maps of every input against ``basis`` (see the module docstring).

    Attributes:
        model: the ``Classifier`` (or a ``load_model`` spec, for Ray actors).
        basis: the fitted concepts.
        k, layer, fit_images, top: what the basis was asked for (the settings a resume must
            match, with the basis's fingerprint).
        style: how the pictures look.
        max_pixels: the pixel budget of an input (larger ones are error records).
    """

    model: Classifier | str
    basis: ConceptBasis
    k: int
    layer: str | None = None
    fit_images: int = DEFAULT_FIT_IMAGES
    top: int = 3
    style: ConceptStyle = field(default_factory=ConceptStyle)
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    name: ClassVar[str] = "concepts"
    records_file: ClassVar[str] = "results.jsonl"
    parts_dir: ClassVar[str] = "parts"

    def settings(self) -> dict[str, Any]:
        return {
            **model_settings(self.model),
            "k": self.k,
            "layer": self.layer,
            "fit_images": self.fit_images,
            "top": self.top,
            "basis": {"layer": self.basis.layer, "sha256": self.basis.fingerprint()},
            "style": asdict(self.style),
            "max_pixels": self.max_pixels,
        }

    def start(self, folder: OutputFolder | None) -> _ConceptsWorker:
        return _ConceptsWorker(self, self.require_folder(folder))

    def fold(self, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Counts: ``{"n_ok", "n_error", "dominant": [images where concept k dominates]}``."""
        dominant = [0] * self.basis.k

        def tallied(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            for record in records:  # one pass: the records are streamed from disk
                if record.get("dominant") is not None:
                    dominant[record["dominant"]] += 1
                yield record

        return {**count_statuses(tallied(records)), "dominant": dominant}


class _ConceptsWorker:
    """The model and the basis; batches of paths in, records (and files) out."""

    def __init__(self, task: ConceptsTask, folder: OutputFolder) -> None:
        self.task = task
        self.folder = folder
        self.classifier = worker_model(task.model)
        self.colors = concept_colors(task.basis.k, task.style.colormap)

    def load(self, item: Item) -> Loaded:
        index, source = item
        return load_input(
            self.classifier,
            index,
            source,
            max_pixels=self.task.max_pixels,
            display_side=self.task.style.overlay_size or None,
        )

    def process(self, batch: Sequence[Item], loaded: Sequence[Loaded]) -> list[dict[str, Any]]:
        good = [item for item in loaded if item.error is None]
        records = {
            item.index: error_record(item.source, item.error) for item in loaded if item.error
        }
        if good:
            x = torch.cat([item.tensor for item in good])
            raw = self.task.basis.transform(self.classifier, x)
            for i, item in enumerate(good):
                records[item.index] = self._write(item, raw[i])
        return [records[index] for index, _ in batch]

    def _write(self, item: Loaded, raw: torch.Tensor) -> dict[str, Any]:
        basis, stem = self.task.basis, output_stem(item.index, item.source)
        shares = concept_shares(raw[None])[0]
        peaks = raw.amax(dim=(-2, -1))
        labels = [legend_label(basis, k, float(shares[k])) for k in range(basis.k)]
        picture = concept_picture(item.image, raw, self.colors, labels, self.task.style.alpha)
        record = {
            "input": item.source,
            "status": "ok",
            "error": None,
            "picture": f"concepts/{stem}.png",
            "raw": f"raw/{stem}.npz",
            "size": list(item.size),
            "layer": basis.layer,
            "dominant": int(shares.argmax()) if float(shares.sum()) > 0 else None,
            "concepts": [
                {
                    "concept": k,
                    "share": round(float(shares[k]), 6),
                    "peak": round(float(peaks[k]), 6),
                }
                for k in range(basis.k)
            ],
        }
        write_png(self.folder.path(record["picture"]), picture)
        write_npz(self.folder.path(record["raw"]), raw=raw.numpy(), shares=shares.numpy())
        return record


def error_record(source: str, message: str | None) -> dict[str, Any]:
    """The record of an input that could not be processed."""
    return {
        "input": source,
        "status": "error",
        "error": message,
        "picture": None,
        "raw": None,
        "dominant": None,
        "concepts": [],
    }


# --- pictures ----------------------------------------------------------------------------------


def concept_colors(k: int, colormap: str = "tab10") -> np.ndarray:
    """K colours (K, 3) uint8 from a matplotlib colormap: the entries in order for a
    qualitative one (at most 32 entries; repeated after the last), else evenly spaced.

    Example:
        >>> concept_colors(2).tolist()  # tab10's blue and orange
        [[31, 119, 180], [255, 127, 14]]
    """
    table = colormap_table(colormap)
    if len(table) <= 32:
        return np.stack([table[i % len(table)] for i in range(k)])
    spots = np.rint(np.linspace(0, len(table) - 1, k)).astype(int) if k > 1 else np.array([0])
    return table[spots]


def concept_overlay(
    image: Image.Image, heat: np.ndarray, colors: np.ndarray, alpha: float = 0.5
) -> Image.Image:
    """Colour each pixel by its strongest concept: ``(1 - a) * image + a * colour`` with
    ``a = alpha * heat[k*]`` and ``k* = argmax_k heat[k]`` at that pixel.

    Parameters:
        image: the picture (W x H).
        heat: (K, H, W) concept strengths in [0, 1], comparable across concepts.
        colors: (K, 3) uint8 colours.
        alpha: opacity where the strongest concept's strength is 1.

    Returns:
        A new RGB image of the same size.

    Example:
        >>> heat = np.zeros((2, 1, 2)); heat[0, 0, 0] = 1.0; heat[1, 0, 1] = 0.5
        >>> colors = np.array([[200, 0, 0], [0, 0, 200]])
        >>> out = concept_overlay(Image.new("RGB", (2, 1)), heat, colors)
        >>> out.getpixel((0, 0)), out.getpixel((1, 0))
        ((100, 0, 0), (0, 0, 50))
    """
    base = np.asarray(image.convert("RGB"))
    if heat.shape[1:] != base.shape[:2]:
        raise ValueError(
            f"heat maps of shape {heat.shape[1:]} do not match the image's (height, width) "
            f"{base.shape[:2]}; resize them to the image first"
        )
    palette = np.asarray(colors, dtype=np.float64)
    blended = np.empty_like(base)
    for start in range(0, base.shape[0], _BLEND_ROWS):  # bounded float64 work on large photos
        rows = slice(start, start + _BLEND_ROWS)
        strongest = heat[:, rows].argmax(axis=0)
        strength = np.take_along_axis(heat[:, rows], strongest[None], axis=0)[0]
        weight = (alpha * np.clip(strength, 0.0, 1.0))[..., None]
        mixed = (1.0 - weight) * base[rows] + weight * palette[strongest]
        blended[rows] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return Image.fromarray(blended, mode="RGB")


def concept_picture(
    image: Image.Image,
    raw: torch.Tensor,
    colors: np.ndarray,
    labels: Sequence[str],
    alpha: float = 0.5,
) -> Image.Image:
    """The image with its concepts coloured (``concept_overlay``), the legend below it.

    Strengths: each concept's map normalised like every camlens map
    (``camlens.localize.normalize_maps``: relu, bilinear upsampling to the image, divided by
    its maximum), times that maximum relative to the strongest concept's in this image, so a
    concept that is barely present stays faint.

    Parameters:
        image: the picture (its size is the output's width and the top part's height).
        raw: (K, h, w) coefficient maps of this image.
        colors: (K, 3) uint8 colours; labels: K legend texts.
        alpha: opacity of the strongest concept.

    Returns:
        An RGB image: the overlay at the top left (pixel for pixel), the legend below it
        (the picture is as wide as the wider of the two; white around them).
    """
    peaks = raw.float().relu().amax(dim=(-2, -1))
    relative = peaks / peaks.max() if float(peaks.max()) > 0 else peaks
    maps = normalize_maps(raw[None].float(), (image.height, image.width))[0]
    heat = (maps * relative[:, None, None]).numpy()
    top = concept_overlay(image, heat, colors, alpha)
    legend = legend_strip(labels, colors)
    width = max(image.width, legend.width)
    canvas = Image.new("RGB", (width, image.height + legend.height), (255, 255, 255))
    canvas.paste(top, (0, 0))
    canvas.paste(legend, (0, image.height))
    return canvas


def legend_strip(labels: Sequence[str], colors: np.ndarray) -> Image.Image:
    """One legend line per concept (a colour patch and its text), as wide as its longest line.

    Example:
        >>> legend_strip(["concept 0: cat 0.80"], concept_colors(1)).mode
        'RGB'
    """
    figure = Figure(figsize=(4, _LEGEND_LINE_PX * len(labels) / 100), dpi=100)
    handles = [Patch(color=np.asarray(c) / 255.0) for c in colors]
    figure.legend(
        handles,
        [str(label).replace("$", r"\$") for label in labels],
        loc="center left",
        frameon=False,
        fontsize=9,
        handlelength=1.5,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", pad_inches=0.08)
    buffer.seek(0)
    with Image.open(buffer) as strip:
        return strip.convert("RGB")


def legend_label(basis: ConceptBasis, k: int, share: float | None = None) -> str:
    """``"concept 0: Egyptian cat 0.81, tabby 0.12 - 40 % of the image"`` (without classes:
    ``"concept 0"``).

    Example:
        >>> from camlens.methods.concepts import TopClass
        >>> basis = ConceptBasis(np.eye(2, dtype=np.float32), np.ones(2, dtype=np.float32),
        ...                      "features", top_classes=((TopClass(3, "cat", 0.8),), ()))
        >>> legend_label(basis, 0, 0.4), legend_label(basis, 1)
        ('concept 0: cat 0.80 - 40 % of the image', 'concept 1')
    """
    text = f"concept {k}"
    classes = basis.top_classes[k] if k < len(basis.top_classes) else ()
    if classes:
        text += ": " + ", ".join(f"{t.label} {t.prob:.2f}" for t in classes)
    if share is not None:
        text += f" - {round(100 * share)} % of the image"
    return text


# --- the concept table -------------------------------------------------------------------------


def concept_table(
    basis: ConceptBasis, colors: np.ndarray, dominant: Sequence[int] | None = None
) -> dict[str, Any]:
    """The table of ``concepts.json``: the basis's identity and, per concept, its id, colour,
    top classes, peak coefficient and the number of images where it dominates.

    Example:
        >>> basis = ConceptBasis(np.eye(2, dtype=np.float32), np.ones(2, dtype=np.float32), "f")
        >>> table = concept_table(basis, concept_colors(2), [3, 1])
        >>> table["concepts"][1]["color"], table["concepts"][1]["dominant_in"]
        ('#ff7f0e', 1)
    """
    dominant = list(dominant) if dominant is not None else [None] * basis.k
    return {
        "k": basis.k,
        "layer": basis.layer,
        "fit_images": basis.n_images,
        "reconstruction_error": basis.reconstruction_error,
        "basis_sha256": basis.fingerprint(),
        "concepts": [
            {
                "concept": k,
                "color": "#{:02x}{:02x}{:02x}".format(*(int(v) for v in colors[k])),
                "top_classes": [t.to_dict() for t in basis.top_classes[k]]
                if k < len(basis.top_classes)
                else [],
                "peak": float(basis.peaks[k]),
                "dominant_in": dominant[k],
            }
            for k in range(basis.k)
        ],
    }


def write_concept_table(
    folder: OutputFolder, basis: ConceptBasis, colors: np.ndarray, dominant: Sequence[int]
) -> dict[str, Any]:
    """Write ``concepts.json`` and ``concepts.csv`` (columns ``concept, color, dominant_in,
    top_classes``, the classes as ``label prob; label prob``); return the table."""
    table = concept_table(basis, colors, dominant)
    write_json(folder.path("concepts.json"), table)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["concept", "color", "dominant_in", "top_classes"])
    for row in table["concepts"]:
        classes = "; ".join(f"{t['label']} {t['prob']:.4f}" for t in row["top_classes"])
        writer.writerow([row["concept"], row["color"], row["dominant_in"], classes])
    write_text(folder.path("concepts.csv"), text.getvalue())
    return table
