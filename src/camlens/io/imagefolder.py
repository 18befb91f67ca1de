"""Image classification data in the ImageFolder layout: ``ROOT/<class>/<image>``.

``scan_image_folder`` lists the classes (sorted subfolder names) and their image files;
``load_images`` decodes them once, resized to the training size, into one uint8 tensor, and
skips (and counts) the files that cannot be read; ``stratified_split`` makes a seeded
train/validation split with the same class proportions on both sides.

Multi-label data (several classes per image) is a CSV file instead, read by
``scan_label_csv``: a header ``image,labels``, then one row per image with its path (relative
to the CSV's folder) and its class names separated by ``;`` (``a.png,circle;square``; an
empty field: no class present).

Images are resized exactly as ``Classifier.preprocess`` resizes them (the whole image,
bilinear, no crop), so that a trained model sees the same pixels at training and at
explanation time.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from camlens.errors import ConfigError
from camlens.io import ImageLoadError, collect_inputs, load_image, resized_pixels


@dataclass(frozen=True)
class ImageFolder:
    """The files of an ImageFolder data set.

    Attributes:
        root: the data set folder.
        classes: class names (subfolder names, sorted); the class index is the position.
        paths: image files, grouped by class, sorted within each class.
        targets: class index of each path; for multi-label data (``scan_label_csv``) one
            0/1 list per path (1: the class is present).
    """

    root: Path
    classes: list[str]
    paths: list[Path]
    targets: list[int] | list[list[int]]

    @property
    def multilabel(self) -> bool:
        """Whether the targets are 0/1 lists (several classes per image)."""
        return bool(self.targets) and isinstance(self.targets[0], list)


@dataclass
class LoadedImages:
    """Decoded images of one data set, ready to batch.

    Attributes:
        images: (N, 3, H, W) uint8.
        targets: (N,) long class indices.
        paths: the source file of each image.
        skipped: ``(path, reason)`` for each file that could not be read.
    """

    images: torch.Tensor
    targets: torch.Tensor
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def scan_image_folder(root: str | os.PathLike) -> ImageFolder:
    """List the classes and image files of an ImageFolder data set.

    Parameters:
        root: a folder with one subfolder per class (hidden folders are ignored); the image
            files of a class may be nested deeper.

    Returns:
        An ``ImageFolder``.

    Raises:
        ConfigError: ``root`` is not a folder, has fewer than two class folders, or a class
            folder has no image files.

    Example:
        >>> data = scan_image_folder("shapes/images")  # shapes/images/<class>/<image>
        >>> data.classes, len(data.paths), data.targets[:3]
        (['circle', 'square', 'triangle'], 60, [0, 0, 0])
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data folder {str(root)!r} does not exist or is not a folder")
    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if len(class_dirs) < 2:
        found = f"only {class_dirs[0].name!r}" if class_dirs else "none"
        raise ConfigError(
            f"{str(root)!r} needs one subfolder per class and at least two classes "
            f"(found {found}); expected ROOT/<class>/<image> (the ImageFolder layout)"
        )
    classes, paths, targets = [], [], []
    empty = []
    for index, folder in enumerate(class_dirs):
        files = collect_inputs([folder])
        if not files:
            empty.append(folder.name)
        classes.append(folder.name)
        paths.extend(files)
        targets.extend([index] * len(files))
    if empty:
        raise ConfigError(
            f"class folder(s) {', '.join(repr(e) for e in empty)} in {str(root)!r} contain no "
            "image files; add images or remove the folder(s)"
        )
    return ImageFolder(root=root, classes=classes, paths=paths, targets=targets)


#: Separates the class names of one image in a multi-label CSV.
LABEL_SEPARATOR = ";"


def scan_label_csv(path: str | os.PathLike) -> ImageFolder:
    """Read a multi-label data set: a CSV file ``image,labels`` (see the module docstring).

    Parameters:
        path: the CSV file; image paths in it are relative to its folder (or absolute).

    Returns:
        An ``ImageFolder`` whose ``root`` is the CSV's folder, ``classes`` the sorted class
        names found in it, and ``targets`` one 0/1 list per image.

    Raises:
        ConfigError: no such file, no ``image`` and ``labels`` columns, no rows, or fewer than
            two classes.

    Example:
        >>> _ = Path("labels.csv").write_text("image,labels\\na.png,circle;square\\nb.png,star\\n")
        >>> data = scan_label_csv("labels.csv")
        >>> data.classes, data.targets
        (['circle', 'square', 'star'], [[1, 1, 0], [0, 0, 1]])
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"multi-label data {str(path)!r} is not a file; pass a CSV with the header "
            f"image,labels and labels separated by {LABEL_SEPARATOR!r} (e.g. the labels.csv "
            "of `camlens make-dataset shapes --per-image 2`)"
        )
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConfigError(f"cannot read {path}: {error}") from error
    if not rows or not {"image", "labels"} <= set(rows[0]):
        raise ConfigError(
            f"{path} needs a header with the columns image,labels and at least one row; "
            f"labels are class names separated by {LABEL_SEPARATOR!r}, e.g. "
            "images/0001.png,circle;square"
        )
    names = [
        [n.strip() for n in (row["labels"] or "").split(LABEL_SEPARATOR) if n.strip()]
        for row in rows
    ]
    classes = sorted({n for row_names in names for n in row_names})
    if len(classes) < 2:
        raise ConfigError(
            f"{path} names {len(classes)} class(es) ({', '.join(classes) or 'none'}); "
            "a classifier needs at least two"
        )
    index = {name: i for i, name in enumerate(classes)}
    paths, targets = [], []
    for row, row_names in zip(rows, names, strict=True):
        image = Path(row["image"] or "")
        paths.append(image if image.is_absolute() else path.parent / image)
        hot = [0] * len(classes)
        for name in row_names:
            hot[index[name]] = 1
        targets.append(hot)
    return ImageFolder(root=path.parent, classes=classes, paths=paths, targets=targets)


def load_images(
    paths: Sequence[Path],
    targets: Sequence[int] | Sequence[Sequence[int]],
    size: tuple[int, int],
    *,
    progress: bool = False,
) -> LoadedImages:
    """Decode ``paths``, resized to ``size`` = (height, width), into one uint8 tensor.

    Files that cannot be read (broken, truncated, not images) are skipped and listed in
    ``skipped``; images of any size and mode are converted to RGB and resized.

    Example:
        >>> data = scan_image_folder("shapes/images")
        >>> loaded = load_images(data.paths, data.targets, (32, 32))
        >>> loaded.images.shape, loaded.images.dtype, len(loaded.skipped)
        (torch.Size([60, 3, 32, 32]), torch.uint8, 0)
        >>> _ = Path("broken.png").write_bytes(b"not a png")
        >>> loaded = load_images([data.paths[0], Path("broken.png")], [0, 1], (32, 32))
        >>> len(loaded.images), loaded.skipped[0][0]
        (1, PosixPath('broken.png'))
    """
    height, width = size
    arrays, kept_targets, kept_paths, skipped = [], [], [], []
    items = zip(paths, targets, strict=True)
    for path, target in tqdm(items, total=len(paths), desc="loading", disable=not progress):
        try:
            image = load_image(path)
        except ImageLoadError as error:
            skipped.append((Path(path), error.message))
            continue
        arrays.append(resized_pixels(image, size))  # as Classifier.preprocess resizes
        kept_targets.append(target)
        kept_paths.append(Path(path))
    images = (
        torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        if arrays
        else torch.zeros((0, 3, height, width), dtype=torch.uint8)
    )
    return LoadedImages(
        images=images,
        targets=torch.tensor(kept_targets, dtype=torch.long),
        paths=kept_paths,
        skipped=skipped,
    )


def stratified_split(
    targets: Sequence[int] | torch.Tensor, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded train/validation split with the same class proportions on both sides.

    Each class with at least two images gives ``round(val_fraction * count)`` of them (at
    least one, at most all but one) to validation; a class with one image stays in training.

    Parameters:
        targets: class index per sample.
        val_fraction: in [0, 1); 0 gives no validation set.
        seed: the same seed and targets give the same split.

    Returns:
        ``(train_indices, val_indices)``, each sorted.

    Example:
        >>> stratified_split([0, 0, 0, 0, 1, 1, 1, 1], 0.25, seed=0)
        ([0, 1, 3, 4, 5, 6], [2, 7])
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"the validation fraction must lie in [0, 1), got {val_fraction}")
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        members = members[rng.permutation(len(members))]
        n_val = 0
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(val)
