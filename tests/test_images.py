"""Tests for camlens.io.images: loading awkward and broken images, and collecting inputs."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camlens.io import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    collect_inputs,
    load_image,
    to_rgb,
)
from camlens.io.images import DEFAULT_MAX_PIXELS
from image_corpus import (
    BLUE,
    EXIF_STORED_SIZE,
    EXPECTED,
    EXPECTED_SIZES,
    GRAY16_VALUES,
    GREEN,
    RED,
    bilevel_png_bytes,
    make_corpus,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    assert make_corpus(directory) == EXPECTED
    return directory


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def close_to(actual, expected, tolerance: int = 0) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, int) - np.asarray(expected, int)) <= tolerance))


# --- the corpus -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_entry_loads_or_fails_clearly(corpus: Path, name: str) -> None:
    path = corpus / name
    expected_error = EXPECTED[name]
    if expected_error is None:
        image = load_image(path)
        assert image.mode == "RGB"
        assert image.size == EXPECTED_SIZES[name]
        assert pixels(image).shape == (image.height, image.width, 3)
    else:
        with pytest.raises(ImageLoadError) as caught:
            load_image(path)
        message = str(caught.value)
        assert expected_error in message.lower()
        assert name in message
        assert caught.value.path == str(path)
        assert caught.value.message == message


def test_corpus_is_small(corpus: Path) -> None:
    sizes = {path.name: path.stat().st_size for path in corpus.iterdir()}
    assert set(sizes) == set(EXPECTED)
    assert sum(sizes.values()) < 500_000
    assert sizes["bomb.png"] < 100_000
    assert sizes["bomb_warning.png"] < 100_000


def test_corpus_folder_is_collected_completely(corpus: Path) -> None:
    collected = collect_inputs([corpus])
    assert [path.name for path in collected] == sorted(EXPECTED)
    assert all(path.parent == corpus for path in collected)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_no_file_handles_left_open(corpus: Path) -> None:
    def open_files() -> set[str]:
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the fd used by listdir is gone already
                found.add(os.readlink(f"/proc/self/fd/{fd}"))
        return {target for target in found if target.startswith(str(corpus))}

    before = open_files()
    for name in EXPECTED:
        with contextlib.suppress(ImageLoadError):
            load_image(corpus / name)
    assert open_files() == before == set()


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gray16.png", "gray16.tif"])
def test_sixteen_bit_is_scaled_not_clipped(corpus: Path, name: str) -> None:
    with Image.open(corpus / name) as raw:
        assert raw.mode.startswith("I")
    values = pixels(load_image(corpus / name))[0]
    assert (values[:, 0] == values[:, 1]).all() and (values[:, 1] == values[:, 2]).all()
    grey = values[:, 0].tolist()
    assert GRAY16_VALUES == (0, 32768, 65535, 25700, 1000)
    assert grey[0] == 0
    assert grey[1] in (127, 128)
    assert grey[2] == 255
    assert grey[3] == 100
    assert grey[4] == 4  # 1000 / 257 = 3.9


def test_sixteen_bit_in_memory_modes() -> None:
    raw = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    image16 = Image.fromarray(raw)
    assert image16.mode.startswith("I;16")
    assert pixels(to_rgb(image16))[0, :, 0].tolist() in ([0, 1, 128, 255], [0, 1, 127, 255])
    image32 = Image.fromarray(np.array([[-5, 0, 65535, 70000]], dtype=np.int32))
    assert image32.mode == "I"
    assert pixels(to_rgb(image32))[0, :, 0].tolist() == [0, 0, 255, 255]  # clipped to 0..65535


def test_float_images() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert pixels(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-3.0, 100.0, 300.0, np.nan]], dtype=np.float32))
    assert pixels(to_rgb(wide))[0, :, 0].tolist() == [0, 100, 255, 0]


def test_grayscale_value_becomes_equal_channels(corpus: Path) -> None:
    expected = np.arange(12).reshape(3, 4) * 20
    loaded = pixels(load_image(corpus / "gray.png"))
    for channel in range(3):
        assert (loaded[..., channel] == expected).all()
    assert load_image(corpus / "gray.pgm").getpixel((2, 1)) == (77, 77, 77)
    assert load_image(corpus / "wide_1000x1.png").getpixel((999, 0)) == (9, 9, 9)


def test_bilevel(corpus: Path) -> None:
    image = load_image(corpus / "bilevel.png")
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((8, 6)) == (0, 0, 0)


@pytest.mark.parametrize("name", ["palette_transparent.png", "palette_transparent.gif"])
def test_palette_transparency_becomes_white(corpus: Path, name: str) -> None:
    image = load_image(corpus / name)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((3, 1)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == RED


def test_palette_without_transparency(corpus: Path) -> None:
    assert load_image(corpus / "palette.gif").getpixel((5, 5)) == RED


def test_palette_with_rgba_palette() -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([*RED, 0, *GREEN, 255], "RGBA")
    image.putpixel((1, 0), 1)
    converted = to_rgb(image)
    assert converted.getpixel((0, 0)) == (255, 255, 255)
    assert converted.getpixel((1, 0)) == GREEN


def test_rgba_composited_on_white(corpus: Path) -> None:
    image = load_image(corpus / "rgba.png")
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (10, 20, 30)
    assert close_to(image.getpixel((2, 0)), (127, 127, 127), tolerance=1)


def test_la_composited_on_white(corpus: Path) -> None:
    image = load_image(corpus / "la.png")
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (50, 50, 50)


def test_rgb_colour_key_transparency(corpus: Path) -> None:
    image = load_image(corpus / "rgb_colour_key.png")
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == BLUE


def test_premultiplied_modes() -> None:
    la = Image.new("LA", (1, 1), (100, 0)).convert("La")
    assert la.mode == "La"
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    rgba = Image.new("RGBA", (1, 1), (1, 2, 3, 255)).convert("RGBa")
    assert to_rgb(rgba).getpixel((0, 0)) == (1, 2, 3)


def test_cmyk(corpus: Path) -> None:
    image = load_image(corpus / "cmyk.jpg")
    assert close_to(image.getpixel((1, 1)), (255, 255, 255), tolerance=6)
    assert close_to(image.getpixel((6, 2)), RED, tolerance=12)
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation(corpus: Path) -> None:
    with Image.open(corpus / "exif_rotate6.jpg") as raw:
        assert raw.size == EXIF_STORED_SIZE
        assert raw.getexif()[0x0112] == 6
    image = load_image(corpus / "exif_rotate6.jpg")
    width, height = image.size
    assert (width, height) == (EXIF_STORED_SIZE[1], EXIF_STORED_SIZE[0])
    # Rotated 90 degrees clockwise: the stored left (red) half is now on top, the stored
    # top-left green square is now top-right.
    assert close_to(image.getpixel((width - 3, 3)), GREEN, tolerance=40)
    assert close_to(image.getpixel((3, 3)), RED, tolerance=40)
    assert close_to(image.getpixel((3, height - 3)), BLUE, tolerance=40)
    assert close_to(image.getpixel((width - 3, height - 3)), BLUE, tolerance=40)
    assert 0x0112 not in image.getexif() or image.getexif()[0x0112] == 1


def test_tiny_and_extreme_aspect_ratio(corpus: Path) -> None:
    assert load_image(corpus / "tiny_1x1.png").getpixel((0, 0)) == (1, 2, 3)
    tall = load_image(corpus / "tall_1x1000.png")
    assert tall.size == (1, 1000)
    assert tall.getpixel((0, 999)) == RED


# --- errors ---------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match="does not exist") as caught:
        load_image(path)
    assert "nope.png" in str(caught.value)
    assert caught.value.path == str(path)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "looks_like.png"
    folder.mkdir()
    with pytest.raises(ImageLoadError, match="is a folder") as caught:
        load_image(folder)
    assert "looks_like.png" in str(caught.value)


def test_empty_file_message(corpus: Path) -> None:
    with pytest.raises(ImageLoadError) as caught:
        load_image(corpus / "empty.png")
    assert str(caught.value) == f"cannot read '{corpus / 'empty.png'}': the file is empty (0 bytes)"


def test_truncated_message_says_what_to_do(corpus: Path) -> None:
    with pytest.raises(ImageLoadError) as caught:
        load_image(corpus / "truncated.jpg")
    message = str(caught.value)
    assert "is truncated (Pillow: image file is truncated" in message
    assert message.endswith("re-export or re-download it")


def test_bomb_messages(corpus: Path) -> None:
    with pytest.raises(ImageLoadError) as caught:
        load_image(corpus / "bomb.png")
    assert "has 200,000,000 pixels, above the limit of 40,000,000" in str(caught.value)
    assert "(the pixel budget: memory and decompression-bomb protection)" in str(caught.value)
    with pytest.raises(ImageLoadError) as caught:
        load_image(corpus / "bomb_warning.png")
    assert "has 100,000,000 pixels, above the limit of 40,000,000" in str(caught.value)
    with pytest.raises(ImageLoadError) as caught:  # without camlens' budget: Pillow's limit
        load_image(corpus / "bomb_warning.png", max_pixels=89_478_485)
    assert "has 100,000,000 pixels, above the limit of 89,478,485" in str(caught.value)


def test_bomb_warning_is_not_leaked_and_global_state_is_untouched(corpus: Path) -> None:
    filters_before = list(warnings.filters)
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError):
            load_image(corpus / "bomb_warning.png")
        load_image(corpus / "rgb.png")
    assert not [w for w in recorded if issubclass(w.category, Image.DecompressionBombWarning)]
    assert list(warnings.filters) == filters_before
    assert limit_before == Image.MAX_IMAGE_PIXELS
    assert DEFAULT_MAX_PIXELS == 40_000_000  # the budget, below Pillow's 89,478,485


def test_max_pixels_keyword(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100), BLUE).save(path)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path, max_pixels=5_000)
    message = str(caught.value)
    assert (
        "has 10,000 pixels, above the limit of 5,000 (the pixel budget: memory and decompression-bomb protection)"
        in message
    )
    assert "--max-pixels on the command line, max_pixels= in Python" in message
    assert "big.png" in str(caught.value)
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    assert load_image(path, max_pixels=None).getpixel((99, 99)) == BLUE
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(Image.new("L", (100, 100)), max_pixels=9_999)


def test_pillow_warning_range_and_larger_max_pixels(tmp_path: Path) -> None:
    # 90,000,000 pixels: above Pillow's warning limit, below its hard limit.
    data = bilevel_png_bytes(9_000, 10_000)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match="90,000,000 pixels, above the limit of 40,000,000"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="above the limit of 80,000,000"):
        load_image(path, max_pixels=80_000_000)
    # A larger max_pixels lets the file past the size check (and Pillow's warning) without
    # a warning; cut in half, it then fails as truncated, so nothing big is decoded here.
    path.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError, match="truncated"):
            load_image(path, max_pixels=100_000_000)
    assert not [w for w in recorded if issubclass(w.category, Image.DecompressionBombWarning)]


def test_truncated_pil_input(corpus: Path) -> None:
    with (
        Image.open(corpus / "truncated.png") as lazy,
        pytest.raises(ImageLoadError, match="truncated") as caught,
    ):
        load_image(lazy)
    assert caught.value.path == str(corpus / "truncated.png")


def test_wrong_type() -> None:
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


def test_error_attributes() -> None:
    error = ImageLoadError("cannot read 'x.png': broken", "x.png")
    assert error.path == "x.png"
    assert error.message == str(error) == "cannot read 'x.png': broken"
    assert ImageLoadError("no file").path is None


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="needs POSIX non-root")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageLoadError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


# --- PIL input --------------------------------------------------------------------------------


def test_pil_input_is_not_mutated() -> None:
    original = Image.new("RGBA", (3, 2), (10, 20, 30, 0))
    original.info["note"] = "keep"
    before = (original.mode, original.size, original.tobytes(), dict(original.info))
    loaded = load_image(original)
    assert (original.mode, original.size, original.tobytes(), dict(original.info)) == before
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("name", ["exif_rotate6.jpg", "tiny_1x1.png", "tall_1x1000.png"])
def test_copy_false_gives_the_same_pixels_and_outlives_the_opened_file(corpus, name) -> None:
    """``copy=False`` (an image the caller just decoded) shares the decoded pixels instead of
    copying them twice, and the result stays usable after the opened file is closed."""
    expected = load_image(corpus / name)
    opened = Image.open(io.BytesIO((corpus / name).read_bytes()))
    loaded = load_image(opened, copy=False)
    opened.close()
    assert (loaded.mode, loaded.size) == (expected.mode, expected.size)
    assert loaded.tobytes() == expected.tobytes()
    loaded.putpixel((0, 0), BLUE)  # a plain, writable image
    assert loaded.getpixel((0, 0)) == BLUE


def test_pil_rgb_input_is_copied() -> None:
    original = Image.new("RGB", (2, 2), RED)
    loaded = load_image(original)
    assert loaded is not original
    loaded.putpixel((0, 0), BLUE)
    assert original.getpixel((0, 0)) == RED
    converted = to_rgb(original)
    assert converted is not original
    assert converted.tobytes() == original.tobytes()


def test_pil_input_gets_exif_rotation(corpus: Path) -> None:
    with Image.open(corpus / "exif_rotate6.jpg") as raw:
        loaded = load_image(raw)
        assert raw.size == EXIF_STORED_SIZE
    assert loaded.size == (EXIF_STORED_SIZE[1], EXIF_STORED_SIZE[0])
    assert close_to(loaded.getpixel((loaded.width - 3, 3)), GREEN, tolerance=40)


def test_pil_input_gets_mode_conversion() -> None:
    image = Image.fromarray(np.array([[65535, 0]], dtype=np.uint16))
    loaded = load_image(image)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (0, 0, 0)
    assert image.mode.startswith("I;16")


def test_loaded_image_is_independent_of_file(tmp_path: Path) -> None:
    path = tmp_path / "a.gif"
    frames = [Image.new("P", (4, 4), index) for index in (1, 2)]
    for frame in frames:
        frame.putpalette([0, 0, 0, *RED, *BLUE] + [0] * 253 * 3)
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = load_image(path)
    path.unlink()
    assert image.getpixel((0, 0)) == RED  # first frame, readable after the file is gone


# --- collect_inputs -------------------------------------------------------------------------


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"} <= IMAGE_EXTENSIONS
    assert {".ppm", ".pgm", ".pbm"} <= IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    assert isinstance(IMAGE_EXTENSIONS, frozenset)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_collect_inputs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for name in [
        "b.png",
        "A.JPG",
        "c.Jpeg",
        "sub/d.webp",
        "sub/deeper/e.tif",
        "sub.png",
        "notes.txt",
        "noext",
        ".hidden.png",
        ".git/x.png",
        "sub/.cache/y.png",
    ]:
        _touch(tree / name)
    (tree / "empty_folder").mkdir()
    loose = _touch(tmp_path / "loose.dat")
    missing = tmp_path / "missing.png"

    collected = collect_inputs([str(loose), tree, missing, loose])
    folder_files = [
        tree / "A.JPG",
        tree / "b.png",
        tree / "c.Jpeg",
        tree / "sub.png",
        tree / "sub" / "d.webp",
        tree / "sub" / "deeper" / "e.tif",
    ]
    assert folder_files == sorted(folder_files, key=str)
    assert collected == [loose, *folder_files, missing, loose]
    assert all(isinstance(path, Path) for path in collected)


def test_collect_inputs_edge_cases(tmp_path: Path) -> None:
    assert collect_inputs([]) == []
    (tmp_path / "empty").mkdir()
    assert collect_inputs([tmp_path / "empty"]) == []
    hidden_root = tmp_path / ".data"
    image = _touch(hidden_root / "img.png")
    assert collect_inputs([hidden_root]) == [image]  # the given folder itself may be hidden
    assert collect_inputs(str(hidden_root)) == [image]  # a single path is accepted
    assert collect_inputs(iter([hidden_root / "img.png"])) == [image]


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="symlinks")
def test_collect_inputs_does_not_follow_folder_links(tmp_path: Path) -> None:
    real = _touch(tmp_path / "real" / "a.png")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "link").symlink_to(real.parent, target_is_directory=True)
    (tree / "loop").symlink_to(tree, target_is_directory=True)
    assert collect_inputs([tree]) == []


def test_permission_error_while_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageLoadError, match=r"'.*secret\.png': permission denied"):
        load_image(path)


def test_collect_inputs_unlistable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "locked"
    _touch(folder / "a.png")

    def refuse(path):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(ImageLoadError, match=r"cannot list folder '.*locked': Permission denied"):
        collect_inputs([folder])


@pytest.mark.parametrize("kind", ["fifo", "char-device"])
def test_only_regular_files_are_opened(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        path = tmp_path / "b.png"
        os.mkfifo(path)  # opening it for reading would block until a writer comes
        expected = "a named pipe (FIFO), not a regular file"
    else:
        path = Path("/dev/null")
        expected = "a character device, not a regular file"
    with pytest.raises(ImageLoadError, match=re.escape(expected)):
        load_image(path)


def test_large_jpegs_decode_at_a_reduced_scale_and_keep_their_size(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), BLUE).save(path, quality=90)
    full = load_image(path)
    assert full.size == full.info["original_size"] == (4000, 3000)
    half = load_image(path, needed_side=1000)  # 1/4 would be 1000 x 750: the smallest >= 1000
    assert half.size == (1000, 750) and half.info["original_size"] == (4000, 3000)
    assert load_image(path, needed_side=5000).size == (4000, 3000)  # never enlarged
    png = tmp_path / "big.png"
    Image.new("RGB", (400, 300), BLUE).save(png)
    assert load_image(png, needed_side=100).size == (400, 300)  # only JPEGs have reduced scales


def test_a_turned_jpeg_reports_its_size_as_shown(tmp_path: Path) -> None:
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    Image.new("RGB", (4000, 3000), BLUE).save(path, exif=exif.tobytes())
    image = load_image(path, needed_side=1000)
    assert image.size == (750, 1000) and image.info["original_size"] == (3000, 4000)
