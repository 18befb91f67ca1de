"""Ground truth for evaluation: object boxes, class labels and masks, read from common formats.

Every format becomes the same in-memory type, :class:`Annotation`: one image, its object boxes
and labels, and (when the format has them) per-class pixel masks. Boxes are
``(x0, y0, x1, y1)`` floats in *pixel-edge* coordinates of the original image, the convention
of :mod:`camlens.localize`: the box covers columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``,
so a box around the whole ``W x H`` image is ``(0, 0, W, H)``.

Formats (:func:`load_annotations` tells them apart):

* **CSV** (``*.csv``): header ``image,x0,y0,x1,y1,label`` (any column order, extra columns
  ignored), one row per object, several rows per image. Coordinates in camlens' pixel-edge
  convention. ``image`` is absolute or relative to the CSV's folder (or to ``image_root``).
* **Pascal VOC** (one ``*.xml`` file, a folder of them, or a VOC root with ``Annotations/``
  and ``JPEGImages/``): ``<object><name>`` and ``<bndbox>``. VOC's 1-based inclusive pixel
  indices are converted: ``x0 = xmin - 1``, ``x1 = xmax``.
* **COCO** (``*.json``): ``images``, ``annotations`` and ``categories``; ``bbox`` is
  ``[x, y, width, height]`` (so ``x1 = x + width``). Polygon segmentations are rasterised with
  ``PIL.ImageDraw``; run-length encoded ones (``{"counts", "size"}``, plain or compressed
  string) are decoded. ``file_name`` is relative to ``image_root``, else to the JSON's folder
  or its ``images/`` subfolder. Images without annotations are skipped.
* **Mask PNG folders** (a folder with ``images/`` and ``masks/``): ``masks/<rel>.png`` is the
  mask of the image ``images/<rel>.<any image suffix>``; nonzero pixels are the object. When
  the files sit in class subfolders (``masks/<class>/x.png``, the ImageFolder layout that
  ``camlens make-dataset`` writes), the subfolder is the label, else the label is ``None``
  (evaluate then explains the model's top-1 class). The box is the bounding box of the mask.
  Images without a mask are not annotated.

Anything wrong or inconsistent (a missing column, a box with ``x1 <= x0``, a box outside the
image, a label that is empty, a mask of another size than its image, an image file that does
not exist) raises :class:`camlens.errors.ConfigError` naming the file and the row or entry.
"""

from __future__ import annotations

import csv
import json
import math
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from camlens.errors import ConfigError
from camlens.io.images import IMAGE_EXTENSIONS

__all__ = [
    "CSV_COLUMNS",
    "Annotation",
    "BoxF",
    "decode_coco_rle",
    "load_annotations",
    "mask_box",
    "read_coco",
    "read_csv",
    "read_mask_folder",
    "read_voc",
]

BoxF = tuple[float, float, float, float]
Masks = dict[str | None, np.ndarray]

#: The columns of the CSV format, in the order camlens writes them.
CSV_COLUMNS = ("image", "x0", "y0", "x1", "y1", "label")

#: Boxes may stick out of the image by this many pixels (rounding in annotation tools); they
#: are clipped. Anything further out is an error: the box was drawn for another image size.
EDGE_TOLERANCE = 1.0

_EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass
class Annotation:
    """The ground truth of one image.

    Attributes:
        image: path of the image file.
        boxes: ``(x0, y0, x1, y1)`` per object, original-image pixels, pixel-edge coordinates.
        labels: the class name of each box; ``None`` means "not given" (the model's top-1
            class is evaluated).
        sources: where each box was read (``"boxes.csv row 3"``), for error messages.
        size: ``(width, height)`` of the image after EXIF orientation, when known.
        masks: per-label boolean masks (H, W), or a function returning them (read lazily, so a
            large data set does not hold every mask in memory); ``None`` when there are none.

    Example:
        >>> a = Annotation(Path("cat.png"), boxes=[(10, 20, 110, 220)], labels=["tabby"])
        >>> a.classes(), a.boxes_for("tabby")
        (['tabby'], [(10, 20, 110, 220)])
    """

    image: Path
    boxes: list[BoxF]
    labels: list[str | None]
    sources: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None
    masks: Masks | Callable[[], Masks] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        if len(self.boxes) != len(self.labels):
            raise ConfigError(
                f"annotation of {self.image}: {len(self.boxes)} boxes but {len(self.labels)} "
                "labels; give one label per box"
            )
        if not self.sources:
            self.sources = [f"{self.image} object {i + 1}" for i in range(len(self.boxes))]

    def classes(self) -> list[str | None]:
        """The distinct labels, in the order they first appear."""
        return list(dict.fromkeys(self.labels))

    def boxes_for(self, label: str | None) -> list[BoxF]:
        """The boxes of class ``label``."""
        return [box for box, lab in zip(self.boxes, self.labels, strict=True) if lab == label]

    def source_of(self, label: str | None) -> str:
        """Where the first box of ``label`` was read (for error messages)."""
        return self.sources[self.labels.index(label)]

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def class_masks(self) -> Masks:
        """Per-label masks, (H, W) bool at the original image size; ``{}`` when there are none."""
        if self.masks is None:
            return {}
        return self.masks() if callable(self.masks) else self.masks

    def mask_for(self, label: str | None) -> np.ndarray | None:
        """The mask of ``label``; the union of all masks when ``label`` is None and no mask is
        stored under None; ``None`` without masks."""
        masks = self.class_masks()
        if label in masks:
            return masks[label]
        return self.mask if label is None else None

    @property
    def mask(self) -> np.ndarray | None:
        """The union of all object masks, (H, W) bool, or ``None`` without masks."""
        masks = list(self.class_masks().values())
        return np.logical_or.reduce(masks) if masks else None


def load_annotations(
    path: str | os.PathLike, *, image_root: str | os.PathLike | None = None
) -> list[Annotation]:
    """Read annotations from a CSV, a COCO JSON, Pascal VOC XML or a mask PNG folder.

    Parameters:
        path: a ``.csv``, ``.json`` or ``.xml`` file, or a folder (VOC XML files, a VOC root
            with ``Annotations/``, or a mask folder with ``images/`` and ``masks/``).
        image_root: resolve relative image paths against this folder instead of the default
            (the CSV's folder, the JSON's folder, VOC's ``JPEGImages``).

    Returns:
        One :class:`Annotation` per annotated image, in file order.

    Raises:
        ConfigError: the format cannot be recognised, or an annotation is bad or inconsistent;
            the message names the file and row.

    Example:
        >>> print(open("boxes.csv").read().splitlines()[1])
        photos/cat.jpg,0,0,398,300,Egyptian cat
        >>> items = load_annotations("boxes.csv")  # image paths relative to the CSV's folder
        >>> len(items), str(items[0].image), items[0].labels, items[0].size
        (3, 'photos/cat.jpg', ['Egyptian cat'], (451, 300))
        >>> items[2].classes(), items[2].boxes_for("crash helmet")
        (['space shuttle', 'crash helmet'], [(275.0, 343.0, 508.0, 512.0)])
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"image folder '{root}' does not exist or is not a folder")
    if not path.exists():
        raise ConfigError(f"annotation file or folder '{path}' does not exist")
    suffix = path.suffix.lower()
    if path.is_file():
        readers = {".csv": read_csv, ".json": read_coco, ".xml": read_voc}
        if suffix not in readers:
            raise ConfigError(
                f"cannot tell the annotation format of '{path}': use a .csv "
                f"({','.join(CSV_COLUMNS)}), a COCO .json, a Pascal VOC .xml, or a folder"
            )
        return readers[suffix](path, image_root=root)
    if (path / "masks").is_dir():
        return read_mask_folder(path, image_root=root)
    if (path / "Annotations").is_dir() or any(path.glob("*.xml")):
        return read_voc(path, image_root=root)
    raise ConfigError(
        f"cannot tell the annotation format of folder '{path}': expected Pascal VOC .xml files "
        "(or an Annotations/ subfolder) or a mask folder with images/ and masks/ subfolders; "
        "pass a .csv or COCO .json file directly"
    )


# --- CSV -----------------------------------------------------------------------------------


def read_csv(path: str | os.PathLike, *, image_root: Path | None = None) -> list[Annotation]:
    """Read the CSV format ``image,x0,y0,x1,y1,label`` (see the module docstring)."""
    path = Path(path)
    base = image_root or path.parent
    grouped: dict[Path, Annotation] = {}
    sizes = _SizeCache()
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise ConfigError(
                    f"'{path}': missing column(s) {', '.join(missing)}; the header must name "
                    f"{','.join(CSV_COLUMNS)} (found: {','.join(header) or 'nothing'})"
                )
            reader.fieldnames = header
            for row in reader:
                where = f"'{path}' row {reader.line_num}"
                image, box, label = _csv_row(row, where)
                image_path = _resolve_image(image, [base], where, image_root)
                box = _checked_box(box, sizes.get(image_path), where)
                entry = grouped.get(image_path)
                if entry is None:
                    grouped[image_path] = entry = Annotation(
                        image_path, [], [], size=sizes.get(image_path)
                    )
                entry.boxes.append(box)
                entry.labels.append(label)
                entry.sources.append(where)
    except UnicodeDecodeError as error:
        raise ConfigError(f"'{path}' is not a UTF-8 text file: {error}") from error
    except csv.Error as error:
        raise ConfigError(f"'{path}' is not valid CSV: {error}") from error
    if not grouped:
        raise ConfigError(f"'{path}' has a header but no annotation rows")
    return list(grouped.values())


def _csv_row(row: dict[str, Any], where: str) -> tuple[str, BoxF, str]:
    if None in row:  # more fields than header columns
        raise ConfigError(f"{where}: more fields than the header has columns")
    values = {key: (row.get(key) or "").strip() for key in CSV_COLUMNS}
    if not values["image"]:
        raise ConfigError(f"{where}: the image column is empty")
    if not values["label"]:
        raise ConfigError(f"{where}: the label column is empty; every box needs a class name")
    coords = []
    for key in ("x0", "y0", "x1", "y1"):
        try:
            coords.append(float(values[key]))
        except ValueError:
            raise ConfigError(
                f"{where}: column {key} must be a number, got {values[key]!r}"
            ) from None
    return values["image"], tuple(coords), values["label"]


# --- Pascal VOC ------------------------------------------------------------------------------


def read_voc(path: str | os.PathLike, *, image_root: Path | None = None) -> list[Annotation]:
    """Read Pascal VOC XML: one file, a folder of ``*.xml``, or a root with ``Annotations/``."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        folder = path / "Annotations" if (path / "Annotations").is_dir() else path
        files = sorted(folder.glob("*.xml"))
        if not files:
            raise ConfigError(f"no Pascal VOC .xml files in '{folder}'")
    sizes = _SizeCache()
    return [_voc_file(file, image_root, sizes) for file in files]


def _voc_file(file: Path, image_root: Path | None, sizes: _SizeCache) -> Annotation:
    try:
        root = ElementTree.parse(file).getroot()
    except ElementTree.ParseError as error:
        raise ConfigError(f"'{file}' is not valid XML: {error}") from error
    filename = (root.findtext("filename") or "").strip()
    if not filename:
        raise ConfigError(f"'{file}': no <filename> element; VOC files name their image there")
    bases = [file.parent.parent / "JPEGImages", file.parent]
    image = _resolve_image(filename, bases, f"'{file}'", image_root)
    size = sizes.get(image)
    _check_declared_size(root.find("size"), size, f"'{file}'")
    annotation = Annotation(image, [], [], size=size)
    objects = root.findall("object")
    if not objects:
        raise ConfigError(f"'{file}' has no <object>; nothing to evaluate in {filename}")
    for i, obj in enumerate(objects, 1):
        where = f"'{file}' object {i}"
        label = (obj.findtext("name") or "").strip()
        if not label:
            raise ConfigError(f"{where}: empty or missing <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ConfigError(f"{where}: no <bndbox>")
        xmin, ymin, xmax, ymax = (_xml_number(bndbox, tag, where) for tag in _VOC_TAGS)
        box = _checked_box((xmin - 1.0, ymin - 1.0, xmax, ymax), size, where)
        annotation.boxes.append(box)
        annotation.labels.append(label)
        annotation.sources.append(where)
    return annotation


_VOC_TAGS = ("xmin", "ymin", "xmax", "ymax")


def _xml_number(element: ElementTree.Element, tag: str, where: str) -> float:
    text = (element.findtext(tag) or "").strip()
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where}: <{tag}> must be a number, got {text!r}") from None


def _check_declared_size(
    element: ElementTree.Element | None, size: tuple[int, int] | None, where: str
) -> None:
    if element is None or size is None:
        return
    try:
        declared = (int(element.findtext("width") or 0), int(element.findtext("height") or 0))
    except ValueError:
        return
    if all(declared) and declared != size:
        raise ConfigError(
            f"{where}: <size> says {declared[0]}x{declared[1]} but the image file is "
            f"{size[0]}x{size[1]}; the annotation belongs to another version of the image"
        )


# --- COCO ------------------------------------------------------------------------------------


def read_coco(path: str | os.PathLike, *, image_root: Path | None = None) -> list[Annotation]:
    """Read COCO JSON (boxes, and masks from polygon or RLE segmentations when present)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"'{path}' is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations")):
        raise ConfigError(f"'{path}' is not COCO: expected keys 'images' and 'annotations'")
    categories = {}
    for i, category in enumerate(data.get("categories") or []):
        where = f"'{path}' categories[{i}]"
        _require(category, ("id", "name"), where)
        categories[category["id"]] = str(category["name"])
    images = {}
    for i, entry in enumerate(data["images"]):
        _require(entry, ("id", "file_name"), f"'{path}' images[{i}]")
        images[entry["id"]] = entry
    objects: dict[Any, list[tuple[int, dict]]] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"'{path}' annotations[{i}]"
        _require(ann, ("image_id", "category_id"), where)
        if ann["image_id"] not in images:
            raise ConfigError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in categories:
            raise ConfigError(f"{where}: category_id {ann['category_id']!r} is not a category")
        objects.setdefault(ann["image_id"], []).append((i, ann))
    sizes = _SizeCache()
    bases = [path.parent, path.parent / "images"]
    result = []
    for image_id, entries in objects.items():
        info = images[image_id]
        where = f"'{path}' image id {image_id!r}"
        image = _resolve_image(str(info["file_name"]), bases, where, image_root)
        size = _coco_size(info, sizes.get(image), where)
        result.append(_coco_annotation(path, image, size, entries, categories))
    return result


def _coco_size(info: dict, actual: tuple[int, int] | None, where: str) -> tuple[int, int]:
    declared = (info.get("width"), info.get("height"))
    if actual is not None and all(declared) and tuple(declared) != actual:
        raise ConfigError(
            f"{where}: width/height {declared[0]}x{declared[1]} differ from the image file "
            f"({actual[0]}x{actual[1]})"
        )
    if actual is not None:
        return actual
    if not all(isinstance(v, int) and v > 0 for v in declared):
        raise ConfigError(f"{where}: the image cannot be read and has no width/height")
    return (int(declared[0]), int(declared[1]))


def _coco_annotation(
    path: Path,
    image: Path,
    size: tuple[int, int],
    entries: list[tuple[int, dict]],
    categories: dict[Any, str],
) -> Annotation:
    annotation = Annotation(image, [], [], size=size)
    segments: list[tuple[str, Any]] = []
    for i, ann in entries:
        where = f"'{path}' annotations[{i}] (id {ann.get('id', '?')})"
        label = categories[ann["category_id"]]
        segmentation = ann.get("segmentation") or None
        if segmentation is not None:
            _check_segmentation(segmentation, size, where)
            segments.append((label, segmentation))
        if ann.get("bbox") is not None:
            box = _coco_box(ann["bbox"], where)
        elif segmentation is not None:
            box = _mask_box(_rasterise(segmentation, size), where)
        else:
            raise ConfigError(f"{where}: neither 'bbox' nor 'segmentation'")
        annotation.boxes.append(_checked_box(box, size, where))
        annotation.labels.append(label)
        annotation.sources.append(where)
    # Pixel metrics need every object of a class outlined; classes with a box-only object
    # get no mask rather than an incomplete one.
    outlined = {
        label
        for label in annotation.labels
        if sum(1 for lab, _ in segments if lab == label) == annotation.labels.count(label)
    }
    if outlined:
        kept = [(label, seg) for label, seg in segments if label in outlined]
        annotation.masks = _LazyCocoMasks(kept, size)
    return annotation


def _require(entry: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(repr(k) for k in missing)}")


def _coco_box(bbox: Any, where: str) -> BoxF:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ConfigError(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
    try:
        x, y, width, height = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: 'bbox' must hold 4 numbers, got {bbox!r}") from None
    return (x, y, x + width, y + height)


def _check_segmentation(segmentation: Any, size: tuple[int, int], where: str) -> None:
    if isinstance(segmentation, dict):
        counts, rle_size = segmentation.get("counts"), segmentation.get("size")
        if not isinstance(counts, (list, str)) or not isinstance(rle_size, (list, tuple)):
            raise ConfigError(f"{where}: RLE segmentation needs 'counts' and 'size'")
        if tuple(rle_size) != (size[1], size[0]):
            raise ConfigError(
                f"{where}: RLE size {list(rle_size)} (height, width) differs from the image "
                f"({size[1]}, {size[0]})"
            )
        runs = _rle_string_counts(counts) if isinstance(counts, str) else counts
        if any(not isinstance(r, int) or r < 0 for r in runs) or sum(runs) != size[0] * size[1]:
            raise ConfigError(
                f"{where}: RLE counts cover {sum(r for r in runs if isinstance(r, int))} "
                f"pixels, but the image has {size[0] * size[1]}"
            )
        return
    if not isinstance(segmentation, list):
        raise ConfigError(f"{where}: 'segmentation' must be polygons or RLE")
    for polygon in segmentation:
        ok = isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
        if not ok or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in polygon):
            raise ConfigError(
                f"{where}: each polygon must be a flat list [x1, y1, x2, y2, ...] of at least "
                "3 points"
            )


def _rasterise(segmentation: Any, size: tuple[int, int]) -> np.ndarray:
    """A COCO segmentation as an (H, W) bool mask."""
    width, height = size
    if isinstance(segmentation, dict):
        return decode_coco_rle(segmentation["counts"], (height, width))
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in segmentation:
        draw.polygon([(polygon[j], polygon[j + 1]) for j in range(0, len(polygon), 2)], fill=1)
    return np.asarray(canvas, dtype=bool)


class _LazyCocoMasks:
    """Rasterise an image's COCO segmentations into per-label masks when first asked."""

    def __init__(self, segments: list[tuple[str, Any]], size: tuple[int, int]) -> None:
        self.segments = segments
        self.size = size

    def __call__(self) -> Masks:
        masks: Masks = {}
        for label, segmentation in self.segments:
            mask = _rasterise(segmentation, self.size)
            masks[label] = masks[label] | mask if label in masks else mask
        return masks


def decode_coco_rle(counts: list[int] | str, shape: tuple[int, int]) -> np.ndarray:
    """Decode COCO run-length encoding into an (H, W) bool mask.

    Runs alternate background / object, starting with background, over the pixels in
    column-major order. ``counts`` is the plain list of run lengths, or COCO's compressed
    string (pycocotools' ``rleToString``: 5 bits per character, offset 48, with runs from the
    fourth on stored as differences to the run two before).

    Example:
        >>> decode_coco_rle([1, 2, 1], (2, 2)).astype(int).tolist()
        [[0, 1], [1, 0]]
    """
    runs = _rle_string_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    height, width = shape
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ConfigError(
            f"RLE counts cover {sum(runs)} pixels with runs {runs[:6]}..., "
            f"but the mask has {height * width}"
        )
    values = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return values.reshape(width, height).T.copy()


def _rle_string_counts(text: str) -> list[int]:
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ConfigError(f"truncated compressed RLE string {text[:20]!r}...")
            c = ord(text[position]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            position += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


# --- Mask PNG folders -----------------------------------------------------------------------


def read_mask_folder(
    path: str | os.PathLike, *, image_root: Path | None = None
) -> list[Annotation]:
    """Read a folder with ``images/`` and ``masks/`` (see the module docstring)."""
    path = Path(path)
    mask_dir = path / "masks"
    image_dir = image_root or path / "images"
    files = sorted(p for p in mask_dir.rglob("*.png") if not p.name.startswith("."))
    if not files:
        raise ConfigError(f"no .png masks in '{mask_dir}'")
    sizes = _SizeCache()
    grouped: dict[Path, Annotation] = {}
    for file in files:
        relative = file.relative_to(mask_dir)
        where = f"mask '{file}'"
        image = _image_for_mask(image_dir, relative, where)
        label = relative.parent.name if relative.parent != Path() else None
        size = sizes.get(image)
        mask = _read_mask(file)
        if size is not None and (mask.shape[1], mask.shape[0]) != size:
            raise ConfigError(
                f"{where} is {mask.shape[1]}x{mask.shape[0]} but its image '{image}' is "
                f"{size[0]}x{size[1]}; masks must have the size of their image"
            )
        box = _mask_box(mask, where)
        entry = grouped.get(image)
        if entry is None:
            grouped[image] = entry = Annotation(image, [], [], size=size)
            entry.masks = _LazyMaskFiles()
        entry.boxes.append(box)
        entry.labels.append(label)
        entry.sources.append(where)
        entry.masks.files.append((label, file))
    return list(grouped.values())


class _LazyMaskFiles:
    def __init__(self) -> None:
        self.files: list[tuple[str | None, Path]] = []

    def __call__(self) -> Masks:
        masks: Masks = {}
        for label, file in self.files:
            mask = _read_mask(file)
            masks[label] = masks[label] | mask if label in masks else mask
        return masks


def _image_for_mask(image_dir: Path, relative: Path, where: str) -> Path:
    stem = image_dir / relative.with_suffix("")
    candidates = [stem.with_name(stem.name + ext) for ext in sorted(IMAGE_EXTENSIONS)]
    candidates += [c.with_name(c.name[: -len(c.suffix)] + c.suffix.upper()) for c in candidates]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"{where}: no image '{stem}.*' for it in '{image_dir}'; a mask masks/<rel>.png belongs "
        "to the image images/<rel> with any image suffix"
    )


def _read_mask(file: Path) -> np.ndarray:
    try:
        with Image.open(file) as opened:
            values = np.asarray(opened)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read mask '{file}': {error}") from error
    return values.any(axis=-1) if values.ndim == 3 else values > 0


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The bounding box ``(x0, y0, x1, y1)`` of the nonzero pixels of a (H, W) mask, in
    pixel-edge coordinates (``x1``, ``y1`` exclusive); ``None`` for an empty mask.

    Example:
        >>> m = np.zeros((4, 5), dtype=bool); m[1:3, 2:4] = True
        >>> mask_box(m), mask_box(np.zeros((2, 2)))
        ((2, 1, 4, 3), None)
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _mask_box(mask: np.ndarray, where: str) -> BoxF:
    box = mask_box(mask)
    if box is None:
        raise ConfigError(f"{where}: the mask is empty (no object pixel)")
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


# --- shared checks ---------------------------------------------------------------------------


class _SizeCache:
    """``(width, height)`` of image files after EXIF orientation, read from headers once."""

    def __init__(self) -> None:
        self.sizes: dict[Path, tuple[int, int] | None] = {}

    def get(self, path: Path) -> tuple[int, int] | None:
        if path not in self.sizes:
            self.sizes[path] = _oriented_size(path)
        return self.sizes[path]


def _oriented_size(path: Path) -> tuple[int, int] | None:
    """The size ``load_image`` will give, or None when the header cannot be read (the
    evaluation then reports the unreadable image)."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            orientation = opened.getexif().get(_EXIF_ORIENTATION)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (height, width) if orientation in _SWAPPED_ORIENTATIONS else (width, height)


def _resolve_image(name: str, bases: Iterable[Path], where: str, image_root: Path | None) -> Path:
    candidate = Path(name)
    if candidate.is_absolute():
        tried = [candidate]
    elif image_root is not None:
        tried = [image_root / candidate]
    else:
        tried = [base / candidate for base in bases]
    for path in tried:
        if path.is_file():
            return path
    looked = ", ".join(f"'{p}'" for p in tried)
    raise ConfigError(
        f"{where}: image {name!r} not found (looked at {looked}); relative paths are resolved "
        "against the annotation file's folder, or pass image_root (--images DIR)"
    )


def _checked_box(box: Sequence[float], size: tuple[int, int] | None, where: str) -> BoxF:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ConfigError(f"{where}: box coordinates must be finite, got {list(box)}")
    if x1 <= x0 or y1 <= y0:
        raise ConfigError(
            f"{where}: empty box ({x0:g}, {y0:g}, {x1:g}, {y1:g}); need x0 < x1 and y0 < y1 "
            "(pixel edges: a box around the whole W x H image is 0, 0, W, H)"
        )
    if size is None:
        return (x0, y0, x1, y1)
    width, height = size
    tol = EDGE_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise ConfigError(
            f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) extends beyond the image "
            f"({width}x{height}); was it drawn on a resized copy?"
        )
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise ConfigError(f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the image")
    return clipped
