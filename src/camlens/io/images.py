"""Image input that survives the real world.

:func:`load_image` turns a path or a PIL image into a fully decoded, EXIF-oriented,
8-bit RGB :class:`PIL.Image.Image`. Every way a file can be unusable (missing, a folder,
empty, truncated, not an image, a decompression bomb) raises :class:`ImageLoadError` with a
message that names the file, says what is wrong and, where there is something to do, what.

:func:`collect_inputs` expands folders (recursively, sorted) into the image files below them.
"""

from __future__ import annotations

import math
import os
import re
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from camlens.defaults import DEFAULT_MAX_PIXELS
from camlens.errors import CamlensError
from camlens.io.medical import (
    DICOM_SUFFIXES,
    DicomError,
    apply_window,
    has_dicom_preamble,
    min_max_window,
    read_dicom_image,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "collect_inputs",
    "load_image",
    "resized_pixels",
    "to_rgb",
]

#: File suffixes (lowercase, with the dot) that :func:`collect_inputs` picks up in folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
    | DICOM_SUFFIXES
)


#: The end of the message for an image over the pixel budget (the server replaces it: its
#: users cannot change the budget).
BUDGET_HINT = (
    "if you trust the file, raise the budget: --max-pixels on the command line, max_pixels= "
    "in Python"
)

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_BOMB_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


class ImageLoadError(CamlensError):
    """An image could not be loaded.

    Parameters
    ----------
    message : str
        Full, human-readable explanation; it names the file.
    path : str or None, optional
        The offending file, or ``None`` for in-memory images without a file name.

    Attributes
    ----------
    path : str or None
        The offending file, as given.
    message : str
        The explanation (also ``str(error)``).

    Examples
    --------
    >>> try:
    ...     load_image("missing.png")
    ... except ImageLoadError as error:
    ...     print(error.path)
    missing.png
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def to_rgb(image: Image.Image, *, window: tuple[float, float] | None = None) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB; the input is not modified.

    Transparent images (RGBA, LA, PA, palette or grey/RGB with a ``transparency`` entry) are
    composited onto a white background. 16-bit integer images (``I;16*``, and ``I``, which is
    read as 16-bit: values are clipped to 0..65535) keep their range: they are windowed
    (:func:`camlens.io.medical.apply_window`, DICOM's linear formula) with ``window``, or by
    default from their own minimum (0) to maximum (255), so a 12-bit image (0..4095) uses all
    256 grey levels rather than being clipped as by ``Image.convert("RGB")``. Float images
    (``F``) whose
    values all lie in 0..1 are scaled by 255, otherwise clipped to 0..255. Every other mode
    (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``) uses Pillow's
    conversion. Embedded ICC profiles are not applied.

    Parameters
    ----------
    image : PIL.Image.Image
        Any image; it is loaded if it has not been yet.
    window : (float, float) or None, optional
        ``(center, width)`` of the grey-level window of a 16-bit image (the command line's
        ``--window C,W``); ignored for 8-bit and float images.

    Returns
    -------
    PIL.Image.Image
        A new ``RGB`` image of the same size (a copy, even if ``image`` is already RGB); for
        a 16-bit image ``info["window"]`` is the (centre, width) applied.

    Examples
    --------
    >>> to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0))
    (255, 255, 255)
    >>> twelve_bit = Image.fromarray(np.array([[0, 1000, 4095]], dtype=np.uint16))
    >>> np.asarray(to_rgb(twelve_bit))[0, :, 0].tolist()  # 255 * x / 4095, rounded
    [0, 62, 255]
    >>> np.asarray(to_rgb(twelve_bit, window=(1000, 1000)))[0, :, 0].tolist()  # 500..1500
    [0, 128, 255]
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy()
    if mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        applied = window or min_max_window(values)
        rgb = Image.fromarray(apply_window(values, *applied)).convert("RGB")
        rgb.info["window"] = applied
        return rgb
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    has_alpha = (
        mode in {"RGBA", "RGBa", "LA", "La", "PA"}
        or (mode in {"P", "L", "RGB", "1"} and "transparency" in image.info)
        or (mode == "P" and image.palette is not None and image.palette.mode == "RGBA")
    )
    if has_alpha:
        source = image.convert("LA") if mode == "La" else image
        rgba = source.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    source: str | os.PathLike | Image.Image,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    needed_side: int | None = None,
    copy: bool = True,
    window: tuple[float, float] | None = None,
) -> Image.Image:
    """Load an image as a fully decoded, EXIF-oriented, 8-bit RGB image.

    The file is decoded completely here (so truncation is detected here, not later) and
    closed before returning. The EXIF orientation tag is applied. Mode conversion is
    :func:`to_rgb`. A PIL image input is never modified: the result is a converted copy.
    DICOM files (a ``.dcm`` / ``.dicom`` suffix, or any file Pillow does not know that has
    the DICOM preamble) are read by :func:`camlens.io.medical.read_dicom_image`: rescaled,
    windowed, ``MONOCHROME1`` inverted; a multi-frame file is refused (it is a volume).

    Parameters
    ----------
    source : str, os.PathLike or PIL.Image.Image
        A file path, or an image already in memory.
    max_pixels : int or None, optional
        Refuse images with more pixels than this: the pixel budget, which bounds memory and
        stops decompression bombs (default 40,000,000, ``camlens.defaults.DEFAULT_MAX_PIXELS``;
        the command line's ``--max-pixels``). ``None`` disables this check; Pillow's hard
        limit of twice ``PIL.Image.MAX_IMAGE_PIXELS`` still applies to files unless the
        application changes that setting itself.
    needed_side : int or None, optional
        The longest side the caller needs: a JPEG is decoded at the smallest of Pillow's
        reduced scales (1/2, 1/4, 1/8: ``Image.draft``) whose longest side is still at least
        this, which saves time and memory on large photos. Other formats are decoded whole.
        The size of the file's image, after EXIF rotation, is in ``image.info["original_size"]``
        either way.
    copy : bool, optional
        For a PIL image ``source``: ``True`` (the default) leaves it untouched and returns a
        converted copy; ``False`` lets it be oriented in place and returned itself when it is
        already RGB (for an image the caller has just decoded and will not use again: a large
        image is then held once, not three times). A file is always decoded without copies.
    window : (float, float) or None, optional
        ``(center, width)``: the grey-level window of 16-bit images and DICOM files (in the
        file's modality units, e.g. Hounsfield units; the command line's ``--window C,W``).
        Default: a DICOM file's own VOI LUT or window, else the image's min..max. 8-bit and
        colour images are not windowed.

    Returns
    -------
    PIL.Image.Image
        A new, loaded image in mode ``RGB``; its size is after EXIF rotation.

    Raises
    ------
    ImageLoadError
        The path is missing, a folder, unreadable, empty, not a decodable image, truncated or
        corrupt, has no pixels, or has more than ``max_pixels`` pixels; a DICOM file that
        cannot be decoded here (the message names the package to install) or that holds
        several frames.

    Examples
    --------
    >>> image = load_image("photos/cat.jpg")
    >>> image.mode, image.size
    ('RGB', (451, 300))
    >>> _ = Path("notes.jpg").write_text("shopping list")
    >>> load_image("notes.jpg")
    Traceback (most recent call last):
    ...
    camlens.io.images.ImageLoadError: cannot read 'notes.jpg': it is not an image Pillow can decode ...
    """
    if isinstance(source, Image.Image):
        return _load_pil(source, max_pixels, owned=not copy, window=window)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load_image expects a path or a PIL.Image.Image, not {type(source).__name__}"
        )
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    name = f"'{path}'"
    _check_file(path, name)
    if os.path.splitext(path)[1].lower() in DICOM_SUFFIXES:
        return _load_dicom(path, window, max_pixels)
    with warnings.catch_warnings():
        _bomb_warnings_filter(max_pixels)
        try:
            with Image.open(path) as opened:
                _check_pixels(opened.size, max_pixels, path, name)
                stored = opened.size
                if needed_side and opened.format == "JPEG" and max(stored) > needed_side:
                    scale = needed_side / max(stored)
                    opened.draft(
                        "RGB", (math.ceil(stored[0] * scale), math.ceil(stored[1] * scale))
                    )
                decoded = opened.size
                opened.load()
                image = _finish(opened, name, stacklevel=4, owned=True, window=window)
                turned = image.size != decoded  # EXIF turned it by 90 degrees
                image.info["original_size"] = stored[::-1] if turned else stored
                return image
        except ImageLoadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _bomb_error(error, max_pixels, path, name) from error
        except UnidentifiedImageError as error:
            if not has_dicom_preamble(path):
                raise ImageLoadError(
                    f"cannot read {name}: it is not an image Pillow can decode (unknown "
                    "format or a damaged header); check that it is really an image file",
                    path,
                ) from error
        except PermissionError as error:
            raise ImageLoadError(
                f"cannot read {name}: permission denied; check the file's permissions", path
            ) from error
        except FileNotFoundError as error:
            raise ImageLoadError(f"cannot read {name}: the file does not exist", path) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise _decode_error(error, path, name) from error
    return _load_dicom(path, window, max_pixels)  # a DICOM file without the suffix


def _load_dicom(
    path: str, window: tuple[float, float] | None, max_pixels: int | None
) -> Image.Image:
    """A DICOM file as 8-bit RGB (:func:`camlens.io.medical.read_dicom_image`)."""
    try:
        return read_dicom_image(path, window=window, max_pixels=max_pixels)
    except DicomError as error:
        raise ImageLoadError(error.message, path) from error


def resized_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The pixels a model sees: the whole image (no crop) resized to ``size`` = (height,
    width), bilinear, as an (H, W, 3) uint8 array (``Classifier.preprocess`` and the training
    data of ``camlens.io.imagefolder`` both make them so).

    Example:
        >>> resized_pixels(Image.new("RGB", (640, 480)), (224, 224)).shape
        (224, 224, 3)
    """
    height, width = size
    return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.uint8)


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders into the image files below them; keep everything else as given.

    Each input that is a folder becomes every file under it, recursively, whose suffix
    (case-insensitive) is in :data:`IMAGE_EXTENSIONS` (``.dcm`` included), or that has no
    suffix or a numeric one (``IM0001``, ``1.2.840.5``) and the DICOM preamble, sorted by
    path string. Files and
    folders whose name starts with ``.`` below the given folder are skipped; symbolic links
    to folders are not followed. Any other input (a file, whatever its suffix, or a path that
    does not exist) is kept as given, so that :func:`load_image` can report a problem with it.
    Inputs keep their order; duplicates are not removed.

    Parameters
    ----------
    inputs : iterable of str or os.PathLike
        Files and folders. A single path is accepted too and treated as a one-item list.

    Returns
    -------
    list of pathlib.Path
        The files to load, in order.

    Raises
    ------
    ImageLoadError
        A folder (or a folder below it) cannot be listed, e.g. permission denied.

    Examples
    --------
    >>> [str(p) for p in collect_inputs(["photos", "extra/dog.jpg"])]  # no extra/: kept as given
    ['photos/astronaut.jpg', 'photos/cat.jpg', 'photos/coffee.jpg', 'extra/dog.jpg']
    """
    if isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]
    collected: list[Path] = []
    for item in inputs:
        path = Path(os.fsdecode(item)) if isinstance(item, bytes) else Path(item)
        if path.is_dir():
            collected.extend(_images_in_folder(path))
        else:
            collected.append(path)
    return collected


def _images_in_folder(folder: Path) -> list[Path]:
    def on_error(error: OSError) -> None:
        where = error.filename if error.filename is not None else folder
        reason = error.strerror or str(error)
        raise ImageLoadError(
            f"cannot list folder '{where}': {reason}; check its permissions", os.fspath(where)
        ) from error

    found: list[Path] = []
    for root, dirnames, filenames in os.walk(folder, onerror=on_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.startswith("."):
                continue
            suffix = os.path.splitext(filename)[1].lower()
            if suffix in IMAGE_EXTENSIONS or _unsuffixed_dicom(root, filename, suffix):
                found.append(Path(root, filename))
    found.sort(key=str)
    return found


def _unsuffixed_dicom(root: str, filename: str, suffix: str) -> bool:
    """A DICOM file named without an image suffix (``IM0001``, ``1.2.840.113619.2.5``): no
    suffix or a numeric one, and the DICOM preamble."""
    if suffix and not suffix[1:].isdigit():
        return False
    return has_dicom_preamble(os.path.join(root, filename))


def _check_file(path: str, name: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageLoadError(
            f"cannot read {name}: the file does not exist; check the path", path
        ) from None
    except PermissionError:
        raise ImageLoadError(
            f"cannot read {name}: permission denied; check the file's permissions", path
        ) from None
    except OSError as error:
        raise ImageLoadError(f"cannot read {name}: {error.strerror or error}", path) from error
    if stat.S_ISDIR(info.st_mode):
        raise ImageLoadError(
            f"cannot read {name}: it is a folder, not a file; pass image files, or expand "
            "folders with collect_inputs",
            path,
        )
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(
            f"cannot read {name}: it is {_special_kind(info.st_mode)}, not a regular file; "
            "camlens opens only regular files (a pipe or device could block forever)",
            path,
        )
    if info.st_size == 0 and os.path.isfile(path):
        raise ImageLoadError(f"cannot read {name}: the file is empty (0 bytes)", path)


def _special_kind(mode: int) -> str:
    """What a file that is neither regular nor a folder is, in words."""
    kinds = (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((text for test, text in kinds if test(mode)), "a special file")


def _bomb_warnings_filter(max_pixels: int | None) -> None:
    """Inside ``catch_warnings``: Pillow's bomb warning is an error unless we allow more."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and (pillow_limit is None or max_pixels <= pillow_limit):
        warnings.simplefilter("error", Image.DecompressionBombWarning)
    else:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def _bomb_message(pixels: int | None, limit: int | None, name: str) -> str:
    count = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    above = f", above the limit of {limit:,}" if limit is not None else ""
    return (
        f"cannot read {name}: it has {count}{above} (the pixel budget: memory and "
        f"decompression-bomb protection); {BUDGET_HINT}"
    )


def _check_pixels(
    size: tuple[int, int], max_pixels: int | None, path: str | None, name: str
) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"cannot read {name}: it has no pixels ({width}x{height})", path)
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageLoadError(_bomb_message(pixels, max_pixels, name), path)


def _bomb_error(
    error: Exception, max_pixels: int | None, path: str | None, name: str
) -> ImageLoadError:
    match = _BOMB_PIXELS_RE.search(str(error))
    pixels = int(match.group(1)) if match else None
    limit = max_pixels
    if isinstance(error, Image.DecompressionBombError) and (
        max_pixels is None or (pixels is not None and pixels <= max_pixels)
    ):
        # Pillow's own hard limit (twice MAX_IMAGE_PIXELS) fired, not ours.
        pillow_limit = Image.MAX_IMAGE_PIXELS
        limit = 2 * pillow_limit if pillow_limit is not None else None
    return ImageLoadError(_bomb_message(pixels, limit, name), path)


def _decode_error(error: BaseException, path: str | None, name: str) -> ImageLoadError:
    detail = str(error) or type(error).__name__
    if "truncated" in detail.lower() or isinstance(error, EOFError):
        return ImageLoadError(
            f"cannot read {name}: the file is truncated (Pillow: {detail}); "
            "re-export or re-download it",
            path,
        )
    return ImageLoadError(
        f"cannot read {name}: it could not be decoded, the file may be corrupt "
        f"(Pillow: {detail}); re-export or re-download it",
        path,
    )


def _finish(
    image: Image.Image,
    name: str,
    stacklevel: int,
    owned: bool,
    window: tuple[float, float] | None = None,
) -> Image.Image:
    """Apply EXIF orientation and convert to RGB (16-bit images through ``window``);
    ``image`` must already be loaded.

    ``owned``: ``image`` is ours to change (just decoded), so it is oriented in place and
    returned itself when already RGB; otherwise it is left untouched and copied.
    """
    try:
        oriented = ImageOps.exif_transpose(image, in_place=owned)
    except Exception as error:  # broken EXIF must not make a good image unusable
        warnings.warn(
            f"ignoring the EXIF orientation of {name}: it could not be read ({error})",
            stacklevel=stacklevel,
        )
        oriented = None
    if oriented is None:  # in place, or not oriented
        oriented = image
    if owned and oriented.mode == "RGB" and "transparency" not in oriented.info:
        return _detached(oriented)
    return to_rgb(oriented, window=window)


def _detached(image: Image.Image) -> Image.Image:
    """A plain image holding ``image``'s pixels, still usable after ``image`` is closed
    (Pillow's ``close`` disables an opened image): the pixels are shared, not copied, unless
    they are a read-only memory map of the file."""
    if getattr(image, "readonly", 0) or getattr(image, "map", None) is not None:
        return image.copy()
    return image._new(image.im)


def _load_pil(
    image: Image.Image,
    max_pixels: int | None,
    owned: bool,
    window: tuple[float, float] | None = None,
) -> Image.Image:
    filename = getattr(image, "filename", None) or None
    path = os.fspath(filename) if filename else None
    name = f"'{path}'" if path else "the in-memory image"
    _check_pixels(image.size, max_pixels, path, name)
    with warnings.catch_warnings():
        _bomb_warnings_filter(max_pixels)
        try:
            image.load()
            return _finish(image, name, stacklevel=5, owned=owned, window=window)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _bomb_error(error, max_pixels, path, name) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise _decode_error(error, path, name) from error
