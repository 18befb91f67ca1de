"""A generated corpus of awkward and broken image files for the image-loading tests.

``make_corpus(directory)`` writes every file and returns ``EXPECTED``: file name -> ``None``
for files that must load, or a lowercase substring that the ``ImageLoadError`` message must
contain for broken ones. ``EXPECTED_SIZES`` gives the (width, height) each loadable file must
have after loading (EXIF rotation applied). The corpus is small (well under 1 MB) and is
generated in well under a second.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)

#: Pixel values of ``gray16.png`` (mode I;16), one row.
GRAY16_VALUES = (0, 32768, 65535, 257 * 100, 1000)

#: The EXIF test image before rotation: left half red, right half blue, green 8x8 top-left.
EXIF_STORED_SIZE = (40, 20)

#: Declared size of the decompression bombs (mode "1" PNGs, a few tens of KB each).
BOMB_SIZE = (20_000, 10_000)  # 200,000,000 pixels: above Pillow's hard limit (2 x 89,478,485)
BOMB_WARNING_SIZE = (10_000, 10_000)  # 100,000,000 pixels: Pillow only warns

_BUILDERS: dict[str, Callable[[Path], None]] = {}
#: File name -> None (must load) or a lowercase substring of the expected error message.
EXPECTED: dict[str, str | None] = {}
#: File name -> (width, height) after loading, for the files that must load.
EXPECTED_SIZES: dict[str, tuple[int, int]] = {}


def _entry(name: str, error: str | None = None, size: tuple[int, int] | None = None):
    def register(build: Callable[[Path], None]) -> Callable[[Path], None]:
        _BUILDERS[name] = build
        EXPECTED[name] = error
        if error is None:
            assert size is not None, name
            EXPECTED_SIZES[name] = size
        return build

    return register


def _noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _png_bytes(image: Image.Image, **params: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _jpeg_bytes(image: Image.Image, **params: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=95, **params)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png_bytes(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, built without allocating its pixels."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter type 0, then the packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )


# --- files that must load ---------------------------------------------------------------


@_entry("rgb.jpg", size=(32, 24))
def _rgb_jpg(path: Path) -> None:
    Image.fromarray(_noise(32, 24)).save(path, quality=90)


@_entry("rgb.png", size=(32, 24))
def _rgb_png(path: Path) -> None:
    Image.fromarray(_noise(32, 24, seed=1)).save(path)


@_entry("UPPER.JPEG", size=(16, 16))
def _upper(path: Path) -> None:
    path.write_bytes(_jpeg_bytes(Image.new("RGB", (16, 16), (200, 100, 50))))


@_entry("really_a_png.jpg", size=(8, 6))
def _wrong_suffix(path: Path) -> None:
    path.write_bytes(_png_bytes(Image.new("RGB", (8, 6), BLUE)))


@_entry("gray.png", size=(4, 3))
def _gray(path: Path) -> None:
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20).save(path)


@_entry("bilevel.png", size=(9, 7))
def _bilevel(path: Path) -> None:
    image = Image.new("1", (9, 7), 0)
    image.putpixel((0, 0), 1)
    image.save(path)


@_entry("palette.gif", size=(10, 10))
def _palette_gif(path: Path) -> None:
    Image.new("RGB", (10, 10), RED).convert("P", palette=Image.Palette.ADAPTIVE).save(path)


@_entry("palette_transparent.png", size=(4, 2))
def _palette_transparent(path: Path) -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    image.putpixel((1, 0), 1)  # red; everything else index 0, transparent
    image.save(path, transparency=0)


@_entry("palette_transparent.gif", size=(4, 2))
def _palette_transparent_gif(path: Path) -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    image.putpixel((1, 0), 1)
    image.save(path, transparency=0)


@_entry("rgb_colour_key.png", size=(2, 1))
def _rgb_colour_key(path: Path) -> None:
    image = Image.new("RGB", (2, 1), RED)
    image.putpixel((1, 0), BLUE)
    image.save(path, transparency=RED)  # tRNS: red pixels are transparent


@_entry("rgba.png", size=(3, 1))
def _rgba(path: Path) -> None:
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (10, 20, 30, 0))  # transparent -> white
    image.putpixel((1, 0), (10, 20, 30, 255))  # opaque -> unchanged
    image.putpixel((2, 0), (0, 0, 0, 128))  # half black on white -> about 127
    image.save(path)


@_entry("la.png", size=(2, 1))
def _la(path: Path) -> None:
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (0, 0))
    image.putpixel((1, 0), (50, 255))
    image.save(path)


@_entry("cmyk.jpg", size=(8, 4))
def _cmyk(path: Path) -> None:
    image = Image.new("CMYK", (8, 4), (0, 0, 0, 0))  # left half: no ink -> white
    image.paste((0, 255, 255, 0), (4, 0, 8, 4))  # right half: magenta + yellow -> red
    image.save(path, quality=95)


@_entry("gray16.png", size=(len(GRAY16_VALUES), 1))
def _gray16(path: Path) -> None:
    image = Image.fromarray(np.array([GRAY16_VALUES], dtype=np.uint16))
    assert image.mode.startswith("I;16"), image.mode
    image.save(path)


@_entry("gray16.tif", size=(len(GRAY16_VALUES), 1))
def _gray16_tiff(path: Path) -> None:
    Image.fromarray(np.array([GRAY16_VALUES], dtype=np.uint16)).save(path)


@_entry("rgb.bmp", size=(5, 3))
def _bmp(path: Path) -> None:
    Image.new("RGB", (5, 3), GREEN).save(path)


@_entry("rgb.webp", size=(6, 4))
def _webp(path: Path) -> None:
    Image.new("RGB", (6, 4), BLUE).save(path, lossless=True)


@_entry("gray.pgm", size=(3, 2))
def _pgm(path: Path) -> None:
    Image.new("L", (3, 2), 77).save(path)


@_entry("tiny_1x1.png", size=(1, 1))
def _tiny(path: Path) -> None:
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)


@_entry("tall_1x1000.png", size=(1, 1000))
def _tall(path: Path) -> None:
    Image.new("RGB", (1, 1000), RED).save(path)


@_entry("wide_1000x1.png", size=(1000, 1))
def _wide(path: Path) -> None:
    Image.new("L", (1000, 1), 9).save(path)


@_entry("exif_rotate6.jpg", size=(EXIF_STORED_SIZE[1], EXIF_STORED_SIZE[0]))
def _exif_rotate(path: Path) -> None:
    width, height = EXIF_STORED_SIZE
    image = Image.new("RGB", EXIF_STORED_SIZE, RED)
    image.paste(BLUE, (width // 2, 0, width, height))
    image.paste(GREEN, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(path, quality=95, exif=exif.tobytes())


# --- files that must fail ---------------------------------------------------------------


@_entry("empty.png", error="empty (0 bytes)")
def _empty(path: Path) -> None:
    path.write_bytes(b"")


@_entry("truncated.png", error="truncated")
def _truncated_png(path: Path) -> None:
    data = _png_bytes(Image.fromarray(_noise(64, 64, seed=2)))
    path.write_bytes(data[: len(data) // 2])


@_entry("truncated.jpg", error="truncated")
def _truncated_jpg(path: Path) -> None:
    data = _jpeg_bytes(Image.fromarray(_noise(64, 64, seed=3)))
    path.write_bytes(data[: len(data) // 2])


@_entry("notes.jpg", error="not an image pillow can decode")
def _text(path: Path) -> None:
    path.write_text("These are my notes, not a photo.\n", encoding="utf-8")


@_entry("bomb.png", error="decompression-bomb")
def _bomb(path: Path) -> None:
    path.write_bytes(bilevel_png_bytes(*BOMB_SIZE))


@_entry("bomb_warning.png", error="decompression-bomb")
def _bomb_warning(path: Path) -> None:
    path.write_bytes(bilevel_png_bytes(*BOMB_WARNING_SIZE))


def make_corpus(directory: Path) -> dict[str, str | None]:
    """Write the corpus into ``directory`` (created if needed).

    Parameters
    ----------
    directory : pathlib.Path
        Where to write the files.

    Returns
    -------
    dict of str to (str or None)
        File name -> ``None`` if it must load, else a lowercase substring of its error message.

    Examples
    --------
    >>> expected = make_corpus(Path("corpus"))
    >>> expected["empty.png"], (Path("corpus") / "empty.png").stat().st_size
    ('empty (0 bytes)', 0)
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, build in _BUILDERS.items():
        build(directory / name)
    return dict(EXPECTED)
