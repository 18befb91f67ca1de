"""Values, not just shapes: colour maps, blends, boxes, figures and the HTML gallery."""

from __future__ import annotations

import re

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from camlens.pipeline import OutputFolder
from camlens.render import colorize, overlay, save_figure, topk_figure
from camlens.report.gallery import render_gallery, write_gallery


def _expected_rgb(colormap: str, value: float) -> np.ndarray:
    """Matplotlib's own colour for ``value``, rounded to uint8."""
    rgba = matplotlib.colormaps[colormap](float(value))
    return np.rint(np.asarray(rgba[:3]) * 255.0).astype(np.uint8)


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


# --- colorize -------------------------------------------------------------------------------


@pytest.mark.parametrize("colormap", ["jet", "viridis", "inferno"])
def test_colorize_endpoints_match_matplotlib(colormap: str) -> None:
    rgb = colorize(np.array([[0.0, 1.0]]), colormap)
    assert rgb.dtype == np.uint8
    assert rgb.shape == (1, 2, 3)
    np.testing.assert_array_equal(rgb[0, 0], _expected_rgb(colormap, 0.0))
    np.testing.assert_array_equal(rgb[0, 1], _expected_rgb(colormap, 1.0))


def test_colorize_jet_endpoints_are_dark_blue_and_dark_red() -> None:
    rgb = colorize(np.array([[0.0, 1.0]]))
    lo, hi = rgb[0, 0].tolist(), rgb[0, 1].tolist()
    assert lo[:2] == [0, 0] and lo[2] in (127, 128)
    assert hi[1:] == [0, 0] and hi[0] in (127, 128)


def test_colorize_clips_and_treats_nan_as_zero() -> None:
    rgb = colorize(np.array([[-3.0, np.nan, 0.0, 7.0, 1.0, 0.5]]))
    np.testing.assert_array_equal(rgb[0, 0], rgb[0, 2])  # below 0 -> 0
    np.testing.assert_array_equal(rgb[0, 1], rgb[0, 2])  # NaN -> 0
    np.testing.assert_array_equal(rgb[0, 3], rgb[0, 4])  # above 1 -> 1
    np.testing.assert_array_equal(rgb[0, 5], _expected_rgb("jet", 0.5))


def test_colorize_unknown_colormap_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown colormap 'foo'.*jet.*viridis"):
        colorize(np.zeros((2, 2)), "foo")


def test_colorize_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((2, 2, 3)))


# --- overlay --------------------------------------------------------------------------------


def _heat(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return (xx + yy) / float(width + height - 2)


def test_overlay_alpha_zero_returns_the_image() -> None:
    image = _random_image(23, 17)
    out = overlay(image, _heat(23, 17), alpha=0.0)
    assert out.size == image.size and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


def test_overlay_alpha_one_returns_colorize() -> None:
    image = _random_image(23, 17)
    heat = _heat(23, 17)
    out = overlay(image, heat, alpha=1.0, colormap="viridis")
    np.testing.assert_array_equal(np.asarray(out), colorize(heat, "viridis"))


def test_overlay_half_blend_matches_hand_computation() -> None:
    image = Image.new("RGB", (4, 3), (200, 100, 10))
    heat = np.full((3, 4), 1.0)  # jet(1) everywhere
    out = np.asarray(overlay(image, heat, alpha=0.5)).astype(int)
    jet_hi = _expected_rgb("jet", 1.0).astype(float)
    expected = 0.5 * np.array([200.0, 100.0, 10.0]) + 0.5 * jet_hi
    assert np.all(np.abs(out[1, 2] - expected) <= 1)
    # A second alpha on a different heat value, computed independently.
    out = np.asarray(overlay(image, np.full((3, 4), 0.0), alpha=0.25)).astype(int)
    expected = 0.75 * np.array([200.0, 100.0, 10.0]) + 0.25 * _expected_rgb("jet", 0.0)
    assert np.all(np.abs(out[0, 0] - expected) <= 1)


def test_overlay_converts_grayscale_and_rgba_input() -> None:
    gray = Image.new("L", (5, 4), 77)
    out = overlay(gray, np.zeros((4, 5)), alpha=0.0)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (77, 77, 77)


def test_overlay_box_at_exact_pixels() -> None:
    image = Image.new("RGB", (40, 30), (0, 0, 0))
    color = (255, 0, 255)
    out = overlay(
        image, np.zeros((30, 40)), alpha=0.0, box=[5, 6, 20, 16], box_color=color, box_width=1
    )
    arr = np.asarray(out)
    # The outline covers columns 5..19 and rows 6..15 (x1, y1 are exclusive).
    for x, y in [(5, 6), (19, 6), (5, 15), (19, 15), (12, 6), (5, 10), (19, 10), (12, 15)]:
        assert tuple(arr[y, x]) == color, (x, y)
    # Interior and just outside stay untouched.
    for x, y in [(12, 10), (6, 7), (18, 14), (4, 6), (20, 6), (5, 5), (5, 16)]:
        assert tuple(arr[y, x]) == (0, 0, 0), (x, y)
    # Exactly the outline pixels changed.
    changed = np.any(arr != 0, axis=-1)
    expected = np.zeros((30, 40), bool)
    expected[6:16, 5:20] = True
    expected[7:15, 6:19] = False
    np.testing.assert_array_equal(changed, expected)


def test_overlay_box_width_and_default_width() -> None:
    image = Image.new("RGB", (300, 300), (0, 0, 0))
    out = np.asarray(overlay(image, np.zeros((300, 300)), alpha=0.0, box=[50, 50, 250, 250]))
    # Default width: round(300 / 150) = 2 pixels, drawn inward.
    assert tuple(out[100, 50]) == (255, 255, 255)
    assert tuple(out[100, 51]) == (255, 255, 255)
    assert tuple(out[100, 52]) == (0, 0, 0)
    assert tuple(out[100, 49]) == (0, 0, 0)
    out = np.asarray(
        overlay(image, np.zeros((300, 300)), alpha=0.0, box=[50, 50, 250, 250], box_width=5)
    )
    assert tuple(out[100, 54]) == (255, 255, 255)
    assert tuple(out[100, 55]) == (0, 0, 0)


def test_overlay_box_on_one_pixel_wide_image() -> None:
    image = Image.new("RGB", (1, 9), (0, 0, 0))
    out = overlay(image, np.zeros((9, 1)), alpha=0.0, box=[0, 2, 1, 7], box_color=(9, 8, 7))
    arr = np.asarray(out)
    assert [tuple(p) for p in arr[2:7, 0]] == [(9, 8, 7)] * 5
    assert tuple(arr[1, 0]) == (0, 0, 0) and tuple(arr[7, 0]) == (0, 0, 0)


def test_overlay_thin_and_outside_boxes_stay_inside_their_pixels() -> None:
    image = Image.new("RGB", (10, 10), (0, 0, 0))
    arr = np.asarray(overlay(image, np.zeros((10, 10)), alpha=0.0, box=[3, 3, 4, 4]))
    changed = np.any(arr != 0, axis=-1)
    assert changed.sum() == 1 and changed[3, 3]
    # Entirely outside the image: nothing drawn, no crash.
    arr = np.asarray(overlay(image, np.zeros((10, 10)), alpha=0.0, box=[20, 20, 30, 30]))
    assert not arr.any()
    # Partly outside: clipped to the image.
    arr = np.asarray(overlay(image, np.zeros((10, 10)), alpha=0.0, box=[-5, -5, 5, 5]))
    assert tuple(arr[4, 2]) == (255, 255, 255) and tuple(arr[2, 2]) == (0, 0, 0)


def test_overlay_shape_mismatch_names_both_shapes() -> None:
    image = Image.new("RGB", (20, 10))
    with pytest.raises(ValueError, match=r"\(20, 10\).*\(10, 20\)"):
        overlay(image, np.zeros((20, 10)))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_overlay_bad_alpha_raises(alpha: float) -> None:
    image = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, np.zeros((4, 4)), alpha=alpha)


def test_overlay_bad_box_raises() -> None:
    image = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="box"):
        overlay(image, np.zeros((4, 4)), box=[0, 0, 2])
    with pytest.raises(ValueError, match="box"):
        overlay(image, np.zeros((4, 4)), box=[0, 0, float("nan"), 2])


# --- figures --------------------------------------------------------------------------------


def test_topk_figure_has_input_then_one_axis_per_overlay() -> None:
    image = _random_image(32, 24)
    heat = _heat(32, 24)
    overlays = [overlay(image, heat * s) for s in (1.0, 0.5, 0.25)]
    titles = ["tabby (281) 0.91", "tiger cat (282) 0.05", "<&> (999) 0.01"]
    fig = topk_figure(image, overlays, titles, suptitle="cat.jpg")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1 + len(overlays)
    assert [ax.get_title() for ax in fig.axes] == ["input", *titles]
    assert all(not ax.axison for ax in fig.axes)
    assert fig.get_suptitle() == "cat.jpg"
    width, height = fig.get_size_inches()
    assert width == pytest.approx(3.0 * 4) and 3.0 <= height <= 5.0
    # The panels show the pixels given.
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), np.asarray(overlays[0]))


def test_topk_figure_accepts_a_title_for_the_input_and_rejects_bad_counts() -> None:
    image = _random_image(8, 8)
    fig = topk_figure(image, [image], ["original", "map"])
    assert [ax.get_title() for ax in fig.axes] == ["original", "map"]
    with pytest.raises(ValueError, match="titles"):
        topk_figure(image, [image, image], ["only one"])


def test_save_figure_writes_a_png_atomically(tmp_path) -> None:
    image = _random_image(16, 16)
    fig = topk_figure(image, [image, image], ["a", "b"])
    path = save_figure(fig, tmp_path / "sub" / "fig.png", dpi=50)
    assert path == tmp_path / "sub" / "fig.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = fig.get_size_inches() * 50
        assert png.size == (round(width), round(height))  # 3 panels x 3 inches at 50 dpi
        assert png.size[0] == 450
    assert [p.name for p in path.parent.iterdir()] == ["fig.png"]  # no temporary left


def test_figure_titles_with_dollars_render_literally(tmp_path) -> None:
    image = _random_image(8, 8)
    # Unescaped, "$\\nosuchcmd{$" would be parsed as mathtext and fail when drawn.
    fig = topk_figure(image, [image], ["$5 \\nosuchcmd{ $"], suptitle="$\\nosuchcmd{$.jpg")
    save_figure(fig, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_topk_figure_height_follows_panel_aspect() -> None:
    wide = topk_figure(_random_image(40, 20), [], [])
    tall = topk_figure(_random_image(20, 40), [], [])
    assert wide.get_size_inches()[0] == tall.get_size_inches()[0] == pytest.approx(3.0)
    assert wide.get_size_inches()[1] < tall.get_size_inches()[1]


# --- gallery --------------------------------------------------------------------------------

NASTY = 'a<b>&"c".png'


def _records() -> list[dict]:
    return [
        {
            "input": NASTY,
            "status": "ok",
            "error": None,
            "predictions": [
                {"class": 285, "label": "Egyptian cat", "prob": 0.8734},
                {"class": 281, "label": "tabby <cat>", "prob": 0.1},
            ],
            "maps": [
                {
                    "class": 285,
                    "label": "Egyptian cat",
                    "score": 0.5,
                    "overlay": "overlays/0001_cat_c285.png",
                    "box": [12, 30, 200, 180],
                }
            ],
            "raw": "raw/0001_cat.npz",
            "extra": {"ignored": True},
        },
        {
            "input": "broken.jpg",
            "status": "error",
            "error": "cannot identify image file 'broken.jpg' <truncated>",
            "predictions": [],
            "maps": [],
        },
        {"input": "dog.png", "status": "ok", "error": None, "predictions": [], "maps": []},
    ]


def test_gallery_escapes_names_and_never_emits_them_raw() -> None:
    html = render_gallery(_records(), title="run <1>", subtitle='model "x" & co')
    assert NASTY not in html
    assert "a&lt;b&gt;&amp;&#34;c&#34;.png" in html
    assert "run &lt;1&gt;" in html and "<1>" not in html
    assert "model &#34;x&#34; &amp; co" in html
    assert "tabby &lt;cat&gt;" in html
    assert "<truncated>" not in html and "&lt;truncated&gt;" in html


def test_gallery_content_summary_overlays_predictions_errors() -> None:
    html = render_gallery(_records())
    assert "3 inputs, 2 ok, 1 failed" in html
    assert 'src="overlays/0001_cat_c285.png"' in html
    assert 'loading="lazy"' in html
    assert "Egyptian cat (285) score 0.5, box [12, 30, 200, 180]" in html
    assert "87.3%" in html and "10.0%" in html
    assert "cannot identify image file" in html
    assert 'class="card error"' in html
    assert 'href="raw/0001_cat.npz"' in html


def test_gallery_has_no_remote_resources_or_scripts() -> None:
    records = _records()
    records[0]["maps"][0]["overlay"] = "http://evil.example/x.png"
    records.append(
        {
            "input": "y",
            "status": "ok",
            "maps": [{"class": 1, "label": "l", "score": 1, "overlay": "//evil.example/y.png"}],
        }
    )
    html = render_gallery(records)
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert refs, "expected image references"
    for ref in refs:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", ref, re.I), ref
        assert not ref.startswith("//"), ref
    assert "http://" not in html.split("<body>")[0]
    assert not re.search(r"(?:src|href)\s*=\s*\"?https?://", html)
    assert "<script" not in html.lower()


def test_gallery_urls_are_percent_encoded_but_relative() -> None:
    record = {
        "input": "a b#c?.jpg",
        "status": "ok",
        "maps": [{"class": 3, "label": "x", "score": 2.0, "overlay": "overlays/a b#c?.png"}],
    }
    html = render_gallery([record])
    assert 'src="overlays/a%20b%23c%3F.png"' in html


def test_gallery_shows_figures_above_maps() -> None:
    html = render_gallery(_records(), figures={NASTY: "figures/0001.png"})
    assert html.index('src="figures/0001.png"') < html.index('src="overlays/0001_cat_c285.png"')


def test_gallery_empty_and_singular() -> None:
    assert "0 inputs, 0 ok, 0 failed" in render_gallery([])
    one = render_gallery([{"input": "x.jpg", "status": "error", "error": None}])
    assert "1 input, 0 ok, 1 failed" in one
    assert "no error message" in one


def test_write_gallery_writes_index_html(tmp_path) -> None:
    path = write_gallery(tmp_path / "out", _records(), title="T")
    assert path == tmp_path / "out" / "index.html"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>")
    assert text == render_gallery(_records(), title="T")
    # No temporary file is left behind; camlens' manifest (.camlens/) lists what it wrote.
    assert sorted(p.name for p in path.parent.iterdir()) == [".camlens", "index.html"]
    assert list(OutputFolder(path.parent).written()) == ["index.html"]
