"""Output files: every file is written atomically (temporary file in the same folder + rename).

A reader never sees a half-written PNG, ``.npz`` or HTML file: either the old file or the
complete new one. (A run's records are appended by ``camlens.pipeline.RecordLog``.) Also
here: :func:`safe_name`, a text as a file-name part, and :class:`Closing`, the ``with`` side of
objects that hold a (temporary) file open.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np
from PIL import Image

from camlens.defaults import PNG_COMPRESS_LEVEL, PNG_COMPRESS_TYPE


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def safe_name(text: str, limit: int = 60, fallback: str = "input") -> str:
    """``text`` as a file-name part: runs of anything but letters, digits, ``.``, ``_`` and
    ``-`` become ``_``; at most ``limit`` characters; ``fallback`` when nothing is left.

    Example:
        >>> safe_name("my photo (1)"), safe_name("gradcam++"), safe_name("", fallback="x")
        ('my_photo_1_', 'gradcam_', 'x')
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit] or fallback


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Example:
        >>> with atomic_path("out/a.png") as tmp:
        ...     Image.new("RGB", (8, 8)).save(tmp, format="PNG")
        >>> with atomic_path("out/a.png") as tmp:  # a failed write keeps the old file
        ...     Image.new("RGB", (16, 16)).save(tmp, format="PNG")
        ...     raise OSError("disk full")
        Traceback (most recent call last):
        OSError: disk full
        >>> os.listdir("out"), Image.open("out/a.png").size
        (['a.png'], (8, 8))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_png(
    path: str | os.PathLike, image: Image.Image, *, compress_level: int = PNG_COMPRESS_LEVEL
) -> Path:
    """Save a PIL image as PNG at ``path`` atomically (zlib ``compress_level``, 0-9, and
    strategy: the defaults favour speed, see ``camlens.defaults.PNG_COMPRESS_LEVEL``)."""
    with atomic_path(path) as tmp:
        image.save(
            tmp, format="PNG", compress_level=compress_level, compress_type=PNG_COMPRESS_TYPE
        )
    return Path(path)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Save arrays to a compressed ``.npz`` at ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(path)


class Closing:
    """Something that holds a file open until :meth:`close`; as a context manager, it closes
    itself on leaving the ``with`` block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save a 3-D array as NIfTI-1 (``.nii`` or, gzipped, ``.nii.gz``) at ``path`` atomically.

    ``data`` is indexed (i, j, k) as NIfTI stores it and ``affine`` maps (i, j, k, 1) to world
    millimetres (RAS+); both the qform and the sform are set to it (code 1, scanner).

    Example:
        >>> write_nifti("map.nii.gz", np.zeros((4, 3, 2), np.float32), np.eye(4)).name
        'map.nii.gz'
    """
    import nibabel

    path = Path(path)
    image = nibabel.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    with atomic_path(path) as tmp:
        named = tmp.with_name(tmp.name + suffix)  # nibabel picks gzip from the name
        try:
            nibabel.save(image, os.fspath(named))
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)
    return path
