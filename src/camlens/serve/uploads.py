"""Decode uploaded bytes into an RGB image with the same checks as ``camlens.io.load_image``.

Uploads never touch the file system: the bytes are decoded from memory, and the client's file
name is used only in messages (it is never opened, joined to a folder, or given to Pillow).
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from camlens.io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from camlens.io.images import BUDGET_HINT

#: What a web user is told about the pixel budget: the server sets it, not them.
SERVER_BUDGET = "send a smaller image (the server's limit is set by its --max-pixels)"

_PIXELS_RE = re.compile(r"\((\d+) pixels\)")
_NAME_MAX = 80


class UnsupportedImageError(ImageLoadError):
    """The upload is not in an image format Pillow can decode (a text file, a PDF...)."""


def upload_label(filename: str | None) -> str:
    """How messages name an upload: its base name, printable and short, quoted.

    Example:
        >>> upload_label("C:\\\\photos\\\\cat.jpg")
        "the upload 'cat.jpg'"
    """
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:_NAME_MAX]
    return f"the upload {base!r}" if base else "the upload"


def decode_upload(
    data: bytes, filename: str | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an uploaded image: fully loaded, EXIF-oriented, 8-bit RGB.

    Parameters:
        data: the uploaded file's bytes.
        filename: the name the client gave the file (used in messages only).
        max_pixels: refuse images with more pixels than this (decompression-bomb protection).

    Returns:
        A new RGB ``PIL.Image.Image``.

    Raises:
        UnsupportedImageError: the bytes are not an image format Pillow knows.
        ImageLoadError: empty, truncated or corrupt data, or more than ``max_pixels`` pixels.

    Example:
        >>> decode_upload(open("cat.jpg", "rb").read(), "cat.jpg").mode
        'RGB'
    """
    label = upload_label(filename)
    if not data:
        raise ImageLoadError(f"cannot read {label}: it is empty (0 bytes)")
    with warnings.catch_warnings():
        # Pillow only warns below its hard limit; load_image applies max_pixels itself.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as error:
            raise UnsupportedImageError(
                f"cannot read {label}: it is not an image Pillow can decode (unknown format "
                "or a damaged header); send a JPEG, PNG, WebP, BMP, GIF or TIFF file"
            ) from error
        except Image.DecompressionBombError as error:
            raise ImageLoadError(_bomb_message(str(error), max_pixels, label)) from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageLoadError(
                f"cannot read {label}: it could not be decoded, the file may be corrupt "
                f"(Pillow: {error})"
            ) from error
    try:
        return load_image(opened, max_pixels=max_pixels)
    except ImageLoadError as error:
        message = error.message.replace("the in-memory image", label)
        raise ImageLoadError(message.replace(BUDGET_HINT, SERVER_BUDGET)) from error
    finally:
        opened.close()


def _bomb_message(pillow_message: str, max_pixels: int | None, label: str) -> str:
    match = _PIXELS_RE.search(pillow_message)
    count = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    # Pillow refused at its hard limit (twice MAX_IMAGE_PIXELS); ours may be lower.
    hard_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    limits = [value for value in (max_pixels, hard_limit) if value is not None]
    above = f", above the limit of {min(limits):,}" if limits else ""
    return (
        f"cannot read {label}: it has {count}{above} (the pixel budget: memory and "
        f"decompression-bomb protection); {SERVER_BUDGET}"
    )
