"""Synthetic shapes with ground truth, and an optional planted shortcut.

Each image shows one coloured shape (circle, square, triangle, star, cross) at a random
position and scale, turned a little from upright (15 degrees either way by default), on a
textured, noisy background. Colours are drawn at random for
every image, independently of the class, so that only the *shape* identifies the class. Every
image comes with its object mask and bounding box.

A *shortcut* reproduces the "horse source tag" of Lapuschkin et al. 2019 (and the lead "L"
token of Zech et al. 2018): a small distinctive mark on ``shortcut_rate`` of the images of one
class (and on ``shortcut_other_rate`` of the others, 0 by default). A classifier trained on
such data can score well by looking at the mark instead of the object; its class activation
maps show it.

Kinds of shortcut:

* ``corner-tag``: a white square with a dark checker pattern in a fixed corner.
* ``stripe``: a yellow and black dashed band along the top or bottom edge.
* ``token``: a white "L" on a dark square at a random place that does not cover the object.
* ``coin``: a bright ring on a dark square (a coin, a round lead marker), placed like the token.

Output layout (``make_shapes_dataset``)::

    OUT/images/<class>/<class>_0000.png     the images
    OUT/masks/<class>/<class>_0000.png      object masks (0 or 255)
    OUT/annotations.csv                     image,x0,y0,x1,y1,label  (one row per object)
    OUT/dataset.json                        all parameters and one record per image

With ``per_image`` = 2 or more (multi-label data), each image shows that many shapes of
different classes (chosen at random per image, smaller: radius 0.75 x that of single shapes,
never overlapping), and the layout is::

    OUT/images/image_0000.png               the images
    OUT/masks/image_0000_<class>.png        one mask per object (0 or 255)
    OUT/annotations.csv                     image,x0,y0,x1,y1,label  (one row per object)
    OUT/labels.csv                          image,labels  (classes separated by ";"), for
                                            camlens train OUT/labels.csv --multilabel
    OUT/dataset.json                        all parameters and one record per image

Boxes are ``[x0, y0, x1, y1]`` in pixel-edge coordinates (``x1``, ``y1`` exclusive), as in
``camlens.localize``; image paths in the CSV and JSON are relative to ``OUT``.

``OUT`` follows the folder rules of every camlens command (``camlens.pipeline.folder``): a
folder that is not empty is refused unless ``overwrite`` (which removes exactly the files an
earlier ``make_shapes_dataset`` wrote there, so no image of an older data set is left beside
the new ones, and keeps everything else); ``OUT/.camlens/`` lists what camlens wrote.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from camlens.data.catalog import DEFAULT_CLASSES, POSITIONS, SHAPES, SHORTCUTS
from camlens.errors import ConfigError
from camlens.io.annotations import mask_box
from camlens.io.imagefolder import LABEL_SEPARATOR
from camlens.pipeline import OutputFolder, spelling
from camlens.writers import write_json, write_png, write_text

CORNERS = POSITIONS[:4]

#: Shortcut kinds drawn at a random free place on every image (not at a fixed place).
MOVING = ("token", "coin")

#: The task name a generated data set records in its output folder's settings.
TASK = "make-dataset"

Box = tuple[int, int, int, int]

_SUPERSAMPLE = 4
_RADIUS_RANGE = (0.15, 0.28)  # shape radius as a fraction of the image side
_MULTI_RADIUS_SCALE = 0.75  # shapes are smaller when an image holds several


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of a shapes data set (all of them end up in ``dataset.json``).

    Attributes:
        n: number of images, spread evenly over the classes.
        size: image side in pixels.
        classes: shape names, from ``SHAPES``.
        seed: the same seed gives byte-identical files.
        shortcut: ``None`` or one of ``SHORTCUTS``.
        shortcut_class: the class that carries the shortcut (default: the first class).
        shortcut_rate: fraction of that class's images that carry it.
        shortcut_other_rate: fraction of every other class's images that carry it.
        shortcut_position: a corner, or ``"random-corner"``; the stripe uses its top/bottom
            part, the token and the coin ignore it.
        max_rotation: shapes are turned by up to this many degrees either way from upright
            (180: any orientation, a much harder task for small data sets).
        noise: standard deviation of the pixel noise, in [0, 1] intensity units.
        per_image: shapes per image, each of a different class (1: the ImageFolder layout;
            2 or more: multi-label data, see the module docstring; no shortcut then).
    """

    n: int = 600
    size: int = 64
    classes: tuple[str, ...] = DEFAULT_CLASSES
    seed: int = 0
    shortcut: str | None = None
    shortcut_class: str | None = None
    shortcut_rate: float = 0.9
    shortcut_other_rate: float = 0.0
    shortcut_position: str = "bottom-left"
    max_rotation: float = 15.0
    noise: float = 0.04
    per_image: int = 1

    def validated(self) -> ShapesConfig:
        """This configuration with defaults filled in; raises ConfigError when it is invalid."""
        classes = tuple(c.strip().lower() for c in self.classes if c.strip())
        unknown = [c for c in classes if c not in SHAPES]
        if unknown:
            raise ConfigError(
                f"unknown shape class(es) {', '.join(unknown)}; choose from {', '.join(SHAPES)}"
            )
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise ConfigError(
                f"need at least two different classes, got {list(classes)}; "
                f"choose from {', '.join(SHAPES)}"
            )
        if self.n < len(classes):
            raise ConfigError(
                f"{self.n} images are fewer than one image per class ({len(classes)} classes)"
            )
        if not 1 <= self.per_image <= len(classes):
            raise ConfigError(
                f"per_image={self.per_image}: an image holds 1 to {len(classes)} shapes (one "
                f"per class, {len(classes)} classes); use fewer or add classes"
            )
        if self.per_image > 1 and self.shortcut is not None:
            raise ConfigError(
                "shortcuts are planted on single-shape data sets only; use per_image=1 "
                "(--per-image 1) with a shortcut"
            )
        if self.size < 16:
            raise ConfigError(f"size={self.size} is too small; use at least 16 pixels")
        if self.shortcut is not None and self.shortcut not in SHORTCUTS:
            raise ConfigError(
                f"unknown shortcut {self.shortcut!r}; choose from {', '.join(SHORTCUTS)}"
            )
        if self.shortcut_position not in POSITIONS:
            raise ConfigError(
                f"unknown shortcut position {self.shortcut_position!r}; "
                f"choose from {', '.join(POSITIONS)}"
            )
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ConfigError(f"max_rotation={self.max_rotation} must lie in [0, 180] degrees")
        for name in ("shortcut_rate", "shortcut_other_rate", "noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        shortcut_class = self.shortcut_class
        if self.shortcut is not None:
            shortcut_class = (shortcut_class or classes[0]).strip().lower()
            if shortcut_class not in classes:
                raise ConfigError(
                    f"shortcut class {shortcut_class!r} is not one of the classes "
                    f"{', '.join(classes)}"
                )
        return ShapesConfig(
            **{**asdict(self), "classes": classes, "shortcut_class": shortcut_class}
        )


@dataclass(frozen=True)
class ShapeSample:
    """One generated image and its ground truth.

    Attributes:
        image: (size, size, 3) uint8.
        mask: (size, size) bool, the object's pixels.
        label: the class name.
        box: the object's bounding box (x0, y0, x1, y1), exclusive ends.
        shortcut_box: where the shortcut was drawn, or None.
    """

    image: np.ndarray
    mask: np.ndarray
    label: str
    box: Box
    shortcut_box: Box | None


def make_shapes_dataset(
    out: str | Path,
    config: ShapesConfig | None = None,
    *,
    overwrite: bool = False,
    cli: bool = False,
) -> dict:
    """Generate a shapes data set into ``out`` (see the module docstring for the layout).

    Parameters:
        out: output folder; created. A folder that is not empty is refused unless
            ``overwrite``; nothing is created before the parameters are checked.
        config: the parameters (default ``ShapesConfig()``: 600 images of 64 px, 3 classes,
            no shortcut).
        overwrite: remove the files an earlier data set wrote into ``out`` (and nothing else:
            files of yours are kept), then generate.
        cli: error messages name command-line options (``--overwrite``) instead of Python
            arguments (``overwrite=True``); set by ``camlens make-dataset``.

    Returns:
        The content of ``dataset.json``: the parameters, the shortcut summary and one record
        per image (``image``, ``mask``, ``label``, ``box``, ``shortcut``, ``shortcut_box``).

    Raises:
        ConfigError: invalid parameters; ``out`` is a file, or a folder that is not empty
            without ``overwrite``, or holds a file of yours where the data set writes one.

    Example:
        >>> import os
        >>> info = make_shapes_dataset("tagged", ShapesConfig(n=60, size=32, shortcut="corner-tag",
        ...                            shortcut_class="square", shortcut_rate=0.9))
        >>> info["shortcut"]["per_class"], info["shortcut"]["position"]
        ({'circle': 0, 'square': 18, 'triangle': 0}, 'bottom-left')
        >>> sorted(os.listdir("tagged"))
        ['.camlens', 'annotations.csv', 'dataset.json', 'images', 'masks']
        >>> sorted(os.listdir("tagged/images"))
        ['circle', 'square', 'triangle']
    """
    folder = OutputFolder(out, spell=spelling(cli, "out"))
    folder.check(resume=False, overwrite=overwrite, resumable=False)
    config = (config or ShapesConfig()).validated()
    plan = _plan(config)
    parameters = {**asdict(config), "classes": list(config.classes)}
    folder.open(TASK, {"parameters": parameters}, resume=False, overwrite=overwrite)
    try:
        if config.per_image > 1:
            info = _write_multilabel_dataset(folder, config, parameters)
        else:
            info = _write_dataset(folder, config, plan, parameters)
    except Exception:
        folder.discard()  # e.g. a file of yours where an image goes: leave nothing half-made
        raise
    finally:
        folder.close()
    return info


def _write_dataset(
    folder: OutputFolder,
    config: ShapesConfig,
    plan: list[tuple[str, int, bool]],
    parameters: dict,
) -> dict:
    records = []
    csv_rows = [["image", "x0", "y0", "x1", "y1", "label"]]
    for index, (label, number, carries) in enumerate(plan):
        sample = render_shape_image(config, index, label, carries)
        image_path = f"images/{label}/{label}_{number:04d}.png"
        mask_path = f"masks/{label}/{label}_{number:04d}.png"
        write_png(folder.path(image_path), Image.fromarray(sample.image))
        write_png(folder.path(mask_path), Image.fromarray(sample.mask.astype(np.uint8) * 255))
        csv_rows.append([image_path, *sample.box, label])
        records.append(
            {
                "image": image_path,
                "mask": mask_path,
                "label": label,
                "box": list(sample.box),
                "shortcut": carries,
                "shortcut_box": list(sample.shortcut_box) if sample.shortcut_box else None,
            }
        )
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(csv_rows)
    write_text(folder.path("annotations.csv"), buffer.getvalue())
    info = {
        "generator": "camlens make-dataset shapes",
        "parameters": parameters,
        "classes": list(config.classes),
        "shortcut": _shortcut_summary(config, records),
        "images": records,
    }
    write_json(folder.path("dataset.json"), info)
    return info


def _write_multilabel_dataset(folder: OutputFolder, config: ShapesConfig, parameters: dict) -> dict:
    """Images of ``config.per_image`` shapes each, their masks, annotations.csv, labels.csv."""
    records = []
    boxes = [["image", "x0", "y0", "x1", "y1", "label"]]
    labels = [["image", "labels"]]
    for index in range(config.n):
        sample = render_multishape_image(config, index)
        stem = f"image_{index:04d}"
        image_path = f"images/{stem}.png"
        write_png(folder.path(image_path), Image.fromarray(sample.image))
        objects = []
        for label, mask, box in zip(sample.labels, sample.masks, sample.boxes, strict=True):
            mask_path = f"masks/{stem}_{label}.png"
            write_png(folder.path(mask_path), Image.fromarray(mask.astype(np.uint8) * 255))
            boxes.append([image_path, *box, label])
            objects.append({"label": label, "box": list(box), "mask": mask_path})
        labels.append([image_path, LABEL_SEPARATOR.join(sample.labels)])
        records.append({"image": image_path, "labels": list(sample.labels), "objects": objects})
    for name, rows in (("annotations.csv", boxes), ("labels.csv", labels)):
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        write_text(folder.path(name), buffer.getvalue())
    info = {
        "generator": "camlens make-dataset shapes",
        "parameters": parameters,
        "classes": list(config.classes),
        "shortcut": None,
        "images": records,
    }
    write_json(folder.path("dataset.json"), info)
    return info


@dataclass(frozen=True)
class MultiShapeSample:
    """One generated image with several shapes, and their ground truth.

    Attributes:
        image: (size, size, 3) uint8.
        labels: the class of each shape (different classes).
        masks: (size, size) bool per shape, its visible pixels.
        boxes: the bounding box (x0, y0, x1, y1) of each shape, exclusive ends.
    """

    image: np.ndarray
    labels: tuple[str, ...]
    masks: tuple[np.ndarray, ...]
    boxes: tuple[Box, ...]


def render_multishape_image(config: ShapesConfig, index: int) -> MultiShapeSample:
    """Draw image ``index`` of a multi-label data set: ``config.per_image`` shapes of different
    classes (sorted by class order), placed so that they do not overlap.

    Deterministic: the random stream is seeded by ``(config.seed, index)``.

    Example:
        >>> sample = render_multishape_image(ShapesConfig(n=4, per_image=2), 0)
        >>> len(sample.labels), sample.image.shape
        (2, (64, 64, 3))
    """
    rng = np.random.default_rng([config.seed, index])
    size = config.size
    chosen = sorted(rng.choice(len(config.classes), config.per_image, replace=False).tolist())
    labels = tuple(config.classes[i] for i in chosen)
    image = _background(rng, size)
    alphas: list[np.ndarray] = []
    keepout: list[Box] = []
    for label in labels:
        alpha = _shape_alpha(
            rng, label, size, keepout, config.max_rotation, radius_scale=_MULTI_RADIUS_SCALE
        )
        colour = _contrasting_colour(rng, image, alpha)
        shading = 1.0 + 0.15 * _smooth_noise(rng, size, cells=3)[..., None]
        image = image * (1.0 - alpha[..., None]) + (colour * shading) * alpha[..., None]
        alphas.append(alpha)
        box = mask_box(alpha >= 0.5)
        if box is not None:
            keepout.append(box)
    image = image + rng.normal(0.0, config.noise, image.shape)
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    masks = []
    for k, alpha in enumerate(alphas):
        mask = alpha >= 0.5
        for later in alphas[k + 1 :]:
            mask &= later < 0.5  # a later shape covers it there
        masks.append(mask)
    boxes = tuple(mask_box(m) or (0, 0, 0, 0) for m in masks)
    return MultiShapeSample(pixels, labels, tuple(masks), boxes)


def render_shape_image(config: ShapesConfig, index: int, label: str, shortcut: bool) -> ShapeSample:
    """Draw image ``index`` of a data set: background, one ``label`` shape, maybe the shortcut.

    Deterministic: the random stream is seeded by ``(config.seed, index)``.
    """
    rng = np.random.default_rng([config.seed, index])
    size = config.size
    background = _background(rng, size)
    keepout = _keepout_boxes(config)
    alpha = _shape_alpha(rng, label, size, keepout, config.max_rotation)
    colour = _contrasting_colour(rng, background, alpha)
    shading = 1.0 + 0.15 * _smooth_noise(rng, size, cells=3)[..., None]
    image = background * (1.0 - alpha[..., None]) + (colour * shading) * alpha[..., None]
    image = image + rng.normal(0.0, config.noise, image.shape)
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    mask = alpha >= 0.5
    box = mask_box(mask)  # never None: the shape covers pixels
    shortcut_box = None
    if shortcut and config.shortcut is not None:
        shortcut_box = _draw_shortcut(pixels, config, rng, box)
    return ShapeSample(pixels, mask, label, box, shortcut_box)


def shortcut_patch(kind: str, side: int) -> np.ndarray:
    """The shortcut's pixels, (h, w, 3) uint8: the tag, the token or the coin (``side`` x
    ``side``).

    Used to paste the mark onto other images (e.g. to test whether it flips a prediction).
    The stripe is not a patch; it spans the image width (see ``stripe_patch``).
    """
    if kind == "corner-tag":
        cell = max(1, side // 4)
        grid = (np.arange(side)[:, None] // cell + np.arange(side)[None, :] // cell) % 2 == 0
        patch = np.where(grid[..., None], 30, 250).astype(np.uint8).repeat(3, axis=2)
        patch[0, :], patch[-1, :], patch[:, 0], patch[:, -1] = 30, 30, 30, 30
        return patch
    if kind == "token":
        patch = np.full((side, side, 3), 25, dtype=np.uint8)
        stroke = max(1, side // 4)
        inner = slice(max(1, side // 6), side - max(1, side // 6))
        patch[inner, max(1, side // 6) : max(1, side // 6) + stroke] = 245
        patch[side - max(1, side // 6) - stroke : side - max(1, side // 6), inner] = 245
        return patch
    if kind == "coin":
        centre = (side - 1) / 2
        yy, xx = np.mgrid[0:side, 0:side]
        distance = np.hypot(yy - centre, xx - centre)
        ring = (distance <= side / 2 - 0.5) & (distance >= side / 2 - 0.5 - max(1.0, side / 5))
        patch = np.full((side, side, 3), 25, dtype=np.uint8)
        patch[ring] = (245, 215, 90)
        return patch
    raise ConfigError(f"{kind!r} has no patch; patches exist for corner-tag, token and coin")


def stripe_patch(width: int, height: int) -> np.ndarray:
    """The stripe shortcut: a yellow and black dashed band, (height, width, 3) uint8."""
    dash = max(2, height)
    on = (np.arange(width) // dash) % 2 == 0
    row = np.where(on[:, None], [250, 210, 20], [20, 20, 20]).astype(np.uint8)
    return np.broadcast_to(row[None], (height, width, 3)).copy()


def tag_side(size: int) -> int:
    """Side of the corner tag and of the token, in pixels, for ``size`` x ``size`` images."""
    return max(6, round(size * 0.14))


def corner_box(size: int, corner: str) -> Box:
    """Where the corner tag goes in a ``size`` x ``size`` image, for one of ``CORNERS``."""
    side, margin = tag_side(size), max(1, round(size * 0.03))
    x0 = margin if corner.endswith("left") else size - margin - side
    y0 = margin if corner.startswith("top") else size - margin - side
    return (x0, y0, x0 + side, y0 + side)


def stripe_box(size: int, edge: str) -> Box:
    """Where the stripe goes: along the ``"top"`` or ``"bottom"`` edge."""
    height = max(2, round(size * 0.06))
    y0 = 0 if edge == "top" else size - height
    return (0, y0, size, y0 + height)


def _plan(config: ShapesConfig) -> list[tuple[str, int, bool]]:
    """(label, number within class, carries shortcut) per image, classes interleaved."""
    k = len(config.classes)
    counts = [config.n // k + (1 if c < config.n % k else 0) for c in range(k)]
    rng = np.random.default_rng([config.seed, 2**31 - 1])
    carries: dict[str, np.ndarray] = {}
    for label, count in zip(config.classes, counts, strict=True):
        rate = (
            config.shortcut_rate if label == config.shortcut_class else config.shortcut_other_rate
        )
        chosen = np.zeros(count, dtype=bool)
        if config.shortcut is not None:
            chosen[rng.permutation(count)[: round(rate * count)]] = True
        carries[label] = chosen
    plan = []
    for number in range(max(counts)):
        for label, count in zip(config.classes, counts, strict=True):
            if number < count:
                plan.append((label, number, bool(carries[label][number])))
    return plan


def _shortcut_summary(config: ShapesConfig, records: list[dict]) -> dict | None:
    if config.shortcut is None:
        return None
    carrying = [r["image"] for r in records if r["shortcut"]]
    per_class = {
        c: sum(1 for r in records if r["shortcut"] and r["label"] == c) for c in config.classes
    }
    return {
        "kind": config.shortcut,
        "class": config.shortcut_class,
        "rate": config.shortcut_rate,
        "other_rate": config.shortcut_other_rate,
        "position": config.shortcut_position if config.shortcut not in MOVING else "random",
        "n_images": len(carrying),
        "per_class": per_class,
        "images": carrying,
    }


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A two-colour gradient with smooth blotches and faint stripes, (size, size, 3) in [0, 1]."""
    low, high = rng.uniform(0.15, 0.85, 3), rng.uniform(0.15, 0.85, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9)
    image = low + (high - low) * ramp[..., None]
    image += 0.12 * _smooth_noise(rng, size, cells=int(rng.integers(3, 7)))[..., None]
    frequency, phase = rng.uniform(3, 9), rng.uniform(0, 2 * math.pi)
    direction = rng.uniform(0, 2 * math.pi)
    waves = np.sin(
        2 * math.pi * frequency * (np.cos(direction) * xx + np.sin(direction) * yy) + phase
    )
    image += 0.05 * waves[..., None] * rng.uniform(-1, 1, 3)
    return np.clip(image, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a ``cells`` x ``cells`` grid, upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    smooth = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(smooth, dtype=np.float64)


def _keepout_boxes(config: ShapesConfig) -> list[Box]:
    """Regions the object never covers (in *every* image, so placement does not leak the class)."""
    if config.shortcut == "corner-tag":
        corners = (
            CORNERS if config.shortcut_position == "random-corner" else [config.shortcut_position]
        )
        return [corner_box(config.size, c) for c in corners]
    if config.shortcut == "stripe":
        edges = (
            ("top", "bottom")
            if config.shortcut_position == "random-corner"
            else [config.shortcut_position.split("-")[0]]
        )
        return [stripe_box(config.size, e) for e in edges]
    return []


def _shape_alpha(
    rng: np.random.Generator,
    label: str,
    size: int,
    keepout: Sequence[Box],
    max_rotation: float,
    *,
    radius_scale: float = 1.0,
) -> np.ndarray:
    """Anti-aliased coverage (size, size) in [0, 1] of one shape, placed outside ``keepout``
    (its radius drawn from ``_RADIUS_RANGE`` times ``radius_scale``)."""
    radius = rng.uniform(*_RADIUS_RANGE) * size * radius_scale
    upright = -math.pi / 2 if label in ("triangle", "star") else 0.0  # a point up
    rotation = upright + math.radians(rng.uniform(-max_rotation, max_rotation))
    margin = 1.0
    for _ in range(100):
        cx, cy = rng.uniform(radius + margin, size - radius - margin, 2)
        if not any(_circle_meets_box(cx, cy, radius, box) for box in keepout):
            break
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    if label == "circle":
        draw.ellipse(
            [
                (cx - radius) * scale,
                (cy - radius) * scale,
                (cx + radius) * scale,
                (cy + radius) * scale,
            ],
            fill=255,
        )
    else:
        points = [
            ((cx + x) * scale, (cy + y) * scale) for x, y in _polygon(label, radius, rotation)
        ]
        draw.polygon(points, fill=255)
    alpha = canvas.resize((size, size), Image.BOX)
    return np.asarray(alpha, dtype=np.float64) / 255.0


def _polygon(label: str, radius: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices (relative to the centre) of a shape whose farthest point is ``radius`` away."""
    if label == "square":
        polar = [(radius, rotation + math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif label == "triangle":
        polar = [(radius, rotation + k * 2 * math.pi / 3) for k in range(3)]
    elif label == "star":
        polar = [
            (radius if k % 2 == 0 else 0.45 * radius, rotation + k * math.pi / 5) for k in range(10)
        ]
    elif label == "cross":
        arm = 0.32  # half-width of an arm, relative to the arm length
        corners = [
            (1, arm),
            (arm, arm),
            (arm, 1),
            (-arm, 1),
            (-arm, arm),
            (-1, arm),
            (-1, -arm),
            (-arm, -arm),
            (-arm, -1),
            (arm, -1),
            (arm, -arm),
            (1, -arm),
        ]
        scale = radius / math.hypot(1, arm)
        polar = [(math.hypot(x, y) * scale, math.atan2(y, x) + rotation) for x, y in corners]
    else:  # pragma: no cover - validated before
        raise ConfigError(f"unknown shape {label!r}")
    return [(r * math.cos(a), r * math.sin(a)) for r, a in polar]


def _contrasting_colour(
    rng: np.random.Generator, background: np.ndarray, alpha: np.ndarray
) -> np.ndarray:
    """A random colour, redrawn until it stands out from the background under the shape."""
    under = (background * alpha[..., None]).sum(axis=(0, 1)) / max(float(alpha.sum()), 1e-9)
    colour = rng.uniform(0.0, 1.0, 3)
    for _ in range(50):
        if np.abs(colour - under).max() >= 0.35:
            break
        colour = rng.uniform(0.0, 1.0, 3)
    return colour


def _circle_meets_box(cx: float, cy: float, radius: float, box: Box) -> bool:
    x0, y0, x1, y1 = box
    nearest_x, nearest_y = min(max(cx, x0), x1), min(max(cy, y0), y1)
    return math.hypot(cx - nearest_x, cy - nearest_y) < radius + 1.0


def _draw_shortcut(
    pixels: np.ndarray, config: ShapesConfig, rng: np.random.Generator, box: Box
) -> Box:
    """Draw the configured shortcut into ``pixels`` (in place); return where it went."""
    size, position = config.size, config.shortcut_position
    if config.shortcut == "stripe":
        edge = (
            position.split("-")[0] if position != "random-corner" else rng.choice(["top", "bottom"])
        )
        where = stripe_box(size, str(edge))
        x0, y0, x1, y1 = where
        pixels[y0:y1, x0:x1] = stripe_patch(x1 - x0, y1 - y0)
        return where
    side = tag_side(size)
    if config.shortcut == "corner-tag":
        corner = position if position != "random-corner" else str(rng.choice(CORNERS))
        where = corner_box(size, corner)
    else:  # token, coin: anywhere the object is not
        where = _free_spot(rng, size, side, box)
    x0, y0, x1, y1 = where
    pixels[y0:y1, x0:x1] = shortcut_patch(str(config.shortcut), side)
    return where


def _free_spot(rng: np.random.Generator, size: int, side: int, avoid: Box) -> Box:
    for _ in range(200):
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        candidate = (x0, y0, x0 + side, y0 + side)
        if not _boxes_overlap(candidate, avoid):
            return candidate
    return candidate  # the object fills the image: the token overlaps it


def _boxes_overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
