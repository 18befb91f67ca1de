"""Decode uploaded bytes into an RGB image with the same checks as ``camlens.io.load_image``.

Uploads never touch the file system: the request body is received into memory (see
``limits.Admission``), the form is parsed in memory (``InMemoryFormRoute``: Starlette would
spool a file part over 1 MB to a temporary file), the bytes are decoded from memory, and the
client's file name is used only in messages (it is never opened, joined to a folder, or given
to Pillow).
"""

from __future__ import annotations

import io
import math
import re
import sys
import warnings
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi.routing import APIRoute
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

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
    data: bytes,
    filename: str | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    needed_side: int | None = None,
) -> Image.Image:
    """Decode an uploaded image: fully loaded, EXIF-oriented, 8-bit RGB.

    Parameters:
        data: the uploaded file's bytes.
        filename: the name the client gave the file (used in messages only).
        max_pixels: refuse images with more pixels than this (decompression-bomb protection).
        needed_side: the longest side the caller needs: a larger JPEG (within ``max_pixels``)
            is decoded at the smallest of Pillow's reduced scales (``Image.draft``) whose
            longest side is still at least this. The image's full size, after EXIF rotation,
            is in ``image.info["original_size"]`` either way.

    Returns:
        A new RGB ``PIL.Image.Image``.

    Raises:
        UnsupportedImageError: the bytes are not an image format Pillow knows.
        ImageLoadError: empty, truncated or corrupt data, or more than ``max_pixels`` pixels.

    Example:
        >>> with open("cat.jpg", "rb") as upload:
        ...     image = decode_upload(upload.read(), "cat.jpg")
        >>> image.mode, image.size
        ('RGB', (451, 300))
        >>> decode_upload(b"hello", "notes.txt")
        Traceback (most recent call last):
        camlens.serve.uploads.UnsupportedImageError: cannot read the upload 'notes.txt': ...
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
        except Exception as error:  # Pillow's plugins raise many types on crafted files
            raise _corrupt(label, error) from error
    try:
        with warnings.catch_warnings():
            # Pillow's notes on a damaged upload ("Corrupt EXIF data"...) concern the client's
            # file, not the server: the image is used as far as it decodes.
            warnings.simplefilter("ignore", UserWarning)
            stored = opened.size
            fits = max_pixels is None or stored[0] * stored[1] <= max_pixels
            if needed_side and fits and opened.format == "JPEG" and max(stored) > needed_side:
                scale = needed_side / max(stored)
                opened.draft("RGB", (math.ceil(stored[0] * scale), math.ceil(stored[1] * scale)))
            decoded = opened.size
            image = load_image(opened, max_pixels=max_pixels, copy=False)
        turned = image.size != decoded  # EXIF turned it by 90 degrees
        image.info["original_size"] = stored[::-1] if turned else stored
        return image
    except ImageLoadError as error:
        message = error.message.replace("the in-memory image", label)
        raise ImageLoadError(message.replace(BUDGET_HINT, SERVER_BUDGET)) from error
    except Exception as error:  # as above: whatever a crafted file makes Pillow raise
        raise _corrupt(label, error) from error
    finally:
        opened.close()


def _corrupt(label: str, error: Exception) -> ImageLoadError:
    reason = str(error) if isinstance(error, (OSError, SyntaxError, ValueError, EOFError)) else ""
    reason = reason or f"{type(error).__name__}: {error}"
    return ImageLoadError(
        f"cannot read {label}: it could not be decoded, the file may be corrupt (Pillow: {reason})"
    )


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


class _InMemoryMultiPartParser(MultiPartParser):
    # A file part stays in its SpooledTemporaryFile's memory buffer at any size (the request
    # body it comes from is already in memory, and within the upload limit).
    spool_max_size = sys.maxsize


class _InMemoryFormRequest(Request):
    async def _get_form(self, **limits: Any) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = _InMemoryMultiPartParser(self.headers, stream, **limits)
                    self._form = await parser.parse()
            except MultiPartException as error:
                raise HTTPException(status_code=400, detail=error.message) from error
        return await super()._get_form(**limits)


class InMemoryFormRoute(APIRoute):
    """A FastAPI route whose form uploads are parsed in memory, never spooled to disk.

    Starlette keeps an uploaded file part in memory up to 1 MB and writes the rest to a
    temporary file; this route keeps it all in memory (the body it is parsed from is bounded
    by the server's upload limit, and has been received whole before, in memory).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def in_memory(request: Request) -> Response:
            return await handler(_InMemoryFormRequest(request.scope, request.receive))

        return in_memory
