"""Which images an audit looks at, and which class each one belongs to.

``DATA`` is either an ImageFolder (``DATA/<class>/<image>``: the true class of every image is
its folder, matched by name to the model's labels) or a plain folder of images (the class of
every image is the model's prediction). ``labels_from="auto"`` takes the ImageFolder reading
when ``DATA`` holds at least two subfolders and no image files of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camlens.defaults import LABEL_SOURCES
from camlens.errors import PYTHON_SPELLING, ConfigError
from camlens.io import IMAGE_EXTENSIONS, collect_inputs
from camlens.io.imagefolder import scan_image_folder
from camlens.targets import similar_classes

__all__ = ["LABEL_SOURCES", "AuditItems", "resolve_audit_classes", "resolve_audit_items"]


@dataclass(frozen=True)
class AuditItems:
    """The images of an audit.

    Attributes:
        paths: image files, in a fixed order.
        classes: the model class index of each image (its folder), or None when the classes
            come from the model's predictions.
        labels_from: ``"folders"`` or ``"predictions"``.
        n_found: images found before ``max_images`` sampling.
    """

    paths: list[Path]
    classes: list[int] | None
    labels_from: str
    n_found: int


def resolve_audit_items(
    data: str | os.PathLike,
    labels: Sequence[str],
    *,
    labels_from: str = "auto",
    max_images: int | None = None,
    seed: int = 0,
    spell: Callable[..., str] = PYTHON_SPELLING,
) -> AuditItems:
    """List the images of ``data`` and their classes (see the module docstring).

    Parameters:
        data: an ImageFolder root or a folder of images.
        labels: the model's class names.
        labels_from: ``"auto"``, ``"folders"`` or ``"predictions"``.
        max_images: audit a seeded random sample of at most this many images.
        seed: seeds the sample.

    Raises:
        ConfigError: ``data`` is not a folder or holds no images, or a class folder does not
            name a class of the model.

    Example:
        >>> labels = ["circle", "square", "triangle"]
        >>> items = resolve_audit_items("shapes/images", labels)  # shapes/images/<class>/...
        >>> items.labels_from, len(items.paths), items.classes[:3]
        ('folders', 60, [0, 0, 0])
        >>> items = resolve_audit_items("shapes/images", labels, max_images=10)
        >>> len(items.paths), items.n_found
        (10, 60)
        >>> items = resolve_audit_items("photos", labels)  # no class folders
        >>> items.labels_from, len(items.paths), items.classes
        ('predictions', 3, None)
    """
    if labels_from not in LABEL_SOURCES:
        raise ConfigError(
            f"unknown label source {labels_from!r}; choose one of {', '.join(LABEL_SOURCES)}"
        )
    root = Path(data)
    if not root.is_dir():
        raise ConfigError(f"DATA {str(root)!r} does not exist or is not a folder of images")
    if labels_from == "auto":
        labels_from = "folders" if _looks_like_image_folder(root) else "predictions"
    if labels_from == "folders":
        folder = scan_image_folder(root)
        mapping = [_model_class(name, labels, root, spell) for name in folder.classes]
        paths, classes = list(folder.paths), [mapping[t] for t in folder.targets]
    else:
        paths, classes = collect_inputs([root]), None
        if not paths:
            raise ConfigError(f"no image files found in {str(root)!r}")
    n_found = len(paths)
    if max_images is not None and n_found > max_images:
        if max_images < 1:
            raise ConfigError(f"max_images must be at least 1, got {max_images}")
        chosen = np.sort(np.random.default_rng(seed).choice(n_found, max_images, replace=False))
        paths = [paths[i] for i in chosen]
        classes = [classes[i] for i in chosen] if classes is not None else None
    return AuditItems(paths, classes, labels_from, n_found)


def resolve_audit_classes(
    names: Sequence[str] | None,
    labels: Sequence[str],
    spell: Callable[..., str] = PYTHON_SPELLING,
) -> set[int] | None:
    """Model class indices of ``names`` (names or indices), or None for "every class"."""
    if not names:
        return None
    return {_model_class(name, labels, None, spell) for name in names}


def _looks_like_image_folder(root: Path) -> bool:
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    subfolders = [p for p in entries if p.is_dir()]
    own_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return len(subfolders) >= 2 and not own_images


def _model_class(
    name: str, labels: Sequence[str], root: Path | None, spell: Callable[..., str]
) -> int:
    lowered = [label.lower() for label in labels]
    key = name.strip().lower()
    if key in lowered:
        return lowered.index(key)
    if key.isdigit() and int(key) < len(labels):
        return int(key)
    where = f"the class folder {name!r} of {str(root)!r}" if root else f"the class {name!r}"
    close = similar_classes(name, labels, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    shown = ", ".join(labels[:8]) + (" ..." if len(labels) > 8 else "")
    todo = (
        "Rename the folder, or audit by the model's predictions "
        f"({spell('labels_from', 'predictions')})"
        if root
        else f"Name classes of the model in {spell('classes', '')}"
    )
    raise ConfigError(
        f"{where} is not a class of the model (its {len(labels)} classes: {shown}).{hint} {todo}"
    )
