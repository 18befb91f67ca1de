"""Synthetic shapes (ground truth, planted shortcuts, determinism) and ImageFolder reading."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from camlens.cli import main
from camlens.data import ShapesConfig, make_shapes_dataset
from camlens.data.shapes import corner_box, shortcut_patch, stripe_box, stripe_patch, tag_side
from camlens.errors import ConfigError
from camlens.io.imagefolder import load_images, scan_image_folder, stratified_split


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _all_bytes(root: Path) -> dict[str, bytes]:
    """The data set's files (camlens' bookkeeping in ``.camlens/`` left out)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".camlens" not in p.relative_to(root).parts
    }


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tagged")
    config = ShapesConfig(
        n=30, size=32, seed=3, shortcut="corner-tag", shortcut_class="square", shortcut_rate=0.8
    )
    return out, make_shapes_dataset(out, config)


def test_same_seed_gives_identical_bytes_and_another_seed_other_images(tmp_path):
    config = ShapesConfig(n=9, size=32, seed=7, shortcut="token")
    make_shapes_dataset(tmp_path / "a", config)
    make_shapes_dataset(tmp_path / "b", config)
    first, second = _all_bytes(tmp_path / "a"), _all_bytes(tmp_path / "b")
    assert len(first) == 9 * 2 + 2 and first == second
    make_shapes_dataset(tmp_path / "c", ShapesConfig(n=9, size=32, seed=8, shortcut="token"))
    other = _all_bytes(tmp_path / "c")
    assert other.keys() == first.keys()
    images = [k for k in first if k.startswith("images/")]
    assert all(first[k] != other[k] for k in images)


def test_layout_annotations_masks_and_boxes_agree(tagged):
    out, info = tagged
    assert info["classes"] == ["circle", "square", "triangle"]
    with open(out / "annotations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "x0", "y0", "x1", "y1", "label"]
    assert len(rows) == 30 and [r["label"] for r in rows].count("square") == 10
    assert json.loads((out / "dataset.json").read_text()) == info
    for row, record in zip(rows, info["images"], strict=True):
        assert row["image"] == record["image"] == f"images/{row['label']}/{Path(row['image']).name}"
        image = _pixels(out / row["image"])
        mask = _pixels(out / record["mask"])
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        assert set(np.unique(mask)) <= {0, 255}
        ys, xs = np.nonzero(mask)
        box = [int(row[k]) for k in ("x0", "y0", "x1", "y1")]
        assert box == record["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert 0.02 < (mask > 0).mean() < 0.5  # one object of 15-28 % radius


def test_corner_tag_is_planted_on_the_given_share_of_one_class_only(tagged):
    out, info = tagged
    summary = info["shortcut"]
    assert summary["kind"] == "corner-tag" and summary["class"] == "square"
    assert summary["per_class"] == {"circle": 0, "square": 8, "triangle": 0}  # 0.8 x 10
    assert summary["images"] == [r["image"] for r in info["images"] if r["shortcut"]]
    x0, y0, x1, y1 = corner_box(32, "bottom-left")
    assert (x0, y1) == (1, 31) and x1 - x0 == tag_side(32) == 6
    tag = shortcut_patch("corner-tag", 6)
    for record in info["images"]:
        corner = _pixels(out / record["image"])[y0:y1, x0:x1]
        mask = _pixels(out / record["mask"])
        assert not mask[y0:y1, x0:x1].any()  # objects never cover the tag's place
        if record["shortcut"]:
            assert record["shortcut_box"] == [x0, y0, x1, y1]
            assert np.array_equal(corner, tag)
        else:
            assert record["shortcut_box"] is None
            assert not np.array_equal(corner, tag)


def test_stripe_token_random_corner_and_other_class_rate(tmp_path):
    stripe = make_shapes_dataset(
        tmp_path / "stripe",
        ShapesConfig(n=12, size=32, shortcut="stripe", shortcut_position="top-right"),
    )
    x0, y0, x1, y1 = stripe_box(32, "top")
    for record in (r for r in stripe["images"] if r["shortcut"]):
        assert record["shortcut_box"] == [x0, y0, x1, y1] == [0, 0, 32, 2]
        band = _pixels(tmp_path / "stripe" / record["image"])[y0:y1, x0:x1]
        assert np.array_equal(band, stripe_patch(32, 2))

    token = make_shapes_dataset(
        tmp_path / "token",
        ShapesConfig(n=30, size=48, shortcut="token", shortcut_rate=1.0, shortcut_other_rate=0.5),
    )
    assert token["shortcut"]["per_class"] == {"circle": 10, "square": 5, "triangle": 5}
    places = set()
    for record in (r for r in token["images"] if r["shortcut"]):
        bx0, by0, bx1, by1 = record["shortcut_box"]
        ox0, oy0, ox1, oy1 = record["box"]
        assert bx1 <= ox0 or ox1 <= bx0 or by1 <= oy0 or oy1 <= by0  # beside the object
        pixels = _pixels(tmp_path / "token" / record["image"])[by0:by1, bx0:bx1]
        assert np.array_equal(pixels, shortcut_patch("token", 7))
        places.add((bx0, by0))
    assert len(places) > 10  # anywhere, not in a fixed place

    corners = make_shapes_dataset(
        tmp_path / "corners",
        ShapesConfig(n=30, size=32, shortcut="corner-tag", shortcut_position="random-corner",
                     shortcut_rate=1.0),
    )  # fmt: skip
    used = {tuple(r["shortcut_box"]) for r in corners["images"] if r["shortcut"]}
    assert used == {
        corner_box(32, c) for c in ("top-left", "top-right", "bottom-left", "bottom-right")
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classes": ("circle", "hexagon")}, "unknown shape class"),
        ({"classes": ("circle",)}, "at least two different classes"),
        ({"shortcut": "corner-tag", "shortcut_class": "star"}, "is not one of the classes"),
        ({"shortcut": "watermark"}, "unknown shortcut"),
        ({"shortcut_rate": 1.5}, "must lie in [0, 1]"),
        ({"n": 2}, "fewer than one image per class"),
    ],
)
def test_bad_shape_parameters_are_config_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_shapes_dataset(tmp_path / "out", ShapesConfig(**{"n": 6, "size": 32, **changes}))
    assert not (tmp_path / "out").exists()  # nothing is created before the parameters are valid


def test_make_dataset_command(tmp_path):
    out = tmp_path / "shapes"
    args = ["make-dataset", "shapes", "--out", str(out), "--n", "10", "--size", "32", "--seed", "1"]
    args += ["--classes", "star,cross", "--shortcut", "corner-tag", "--shortcut-class", "cross"]
    args += ["--shortcut-rate", "0.6", "--shortcut-position", "top-right"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "10 images of star, cross; corner-tag shortcut on 3 images (star: 0, cross: 3)" in (
        result.output
    )
    info = json.loads((out / "dataset.json").read_text())
    assert info["parameters"]["seed"] == 1 and info["shortcut"]["position"] == "top-right"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["cross", "star"]
    assert "deprecated" not in result.output
    bad_out = tmp_path / "bad"
    bad = CliRunner().invoke(
        main, ["make-dataset", "shapes", "--out", str(bad_out), "--classes", "circle"]
    )
    assert bad.exit_code == 2 and "at least two different classes" in bad.output
    assert not bad_out.exists()
    missing = CliRunner().invoke(main, ["make-dataset", "shapes", "--n", "4"])
    assert missing.exit_code == 2 and "--out" in missing.output


# --- the output folder's rules (those of every camlens command) ---------------------------

_SMALL = ["--n", "10", "--size", "32", "--seed", "1"]


def _make(out: Path, *args: str):
    return CliRunner().invoke(main, ["make-dataset", "shapes", "--out", str(out), *_SMALL, *args])


def test_a_second_data_set_into_one_folder_is_refused_and_the_first_kept(tmp_path):
    out = tmp_path / "shapes"
    assert _make(out, "--classes", "circle,star").exit_code == 0
    first = _all_bytes(out)
    again = _make(out, "--n", "12", "--classes", "circle,square,triangle")
    assert again.exit_code == 2
    assert "is not empty" in again.output and "--overwrite" in again.output
    assert "--resume" not in again.output  # make-dataset has no --resume: not offered
    assert _all_bytes(out) == first


def test_overwrite_gives_exactly_a_fresh_data_set_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "shapes"
    assert _make(out, "--classes", "circle,star", "--shortcut", "token").exit_code == 0
    (out / "images" / "notes.txt").write_text("mine")
    (out / "mine.txt").write_text("mine too")
    (out / "images" / "star" / "keep.png").write_bytes(b"a file of mine among camlens' ones")
    again = _make(out, "--overwrite", "--classes", "circle,square,triangle", "--n", "12")
    assert again.exit_code == 0, again.output
    fresh = tmp_path / "fresh"
    assert _make(fresh, "--classes", "circle,square,triangle", "--n", "12").exit_code == 0
    users = {"images/notes.txt", "mine.txt", "images/star/keep.png"}
    result = _all_bytes(out)
    assert {k: v for k, v in result.items() if k not in users} == _all_bytes(fresh)
    assert result["images/notes.txt"] == b"mine" and result["mine.txt"] == b"mine too"
    assert sorted(p.name for p in (out / "images" / "star").iterdir()) == ["keep.png"]
    assert not (out / "masks" / "star").exists()  # the old data set's folder, now empty: gone
    with open(out / "annotations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 == len(list((out / "images").rglob("*_*.png")))
    assert json.loads((out / "dataset.json").read_text())["classes"] == [
        "circle",
        "square",
        "triangle",
    ]


def test_the_positional_out_still_works_for_a_release_and_warns(tmp_path):
    out = tmp_path / "shapes"
    result = CliRunner().invoke(main, ["make-dataset", "shapes", str(out), *_SMALL])
    assert result.exit_code == 0, result.output
    warning = "Warning: camlens make-dataset KIND OUT is deprecated; use --out OUT"
    assert result.stderr.splitlines() == [warning]
    assert warning not in result.stdout and "-> " + str(out) in result.stdout
    assert _all_bytes(out) == _all_bytes(_fresh(tmp_path / "fresh"))
    twice = CliRunner().invoke(main, ["make-dataset", "shapes", "a", "--out", "b"])
    assert twice.exit_code == 2 and "two output folders" in twice.output


def _fresh(out: Path) -> Path:
    assert _make(out).exit_code == 0
    return out


def test_folder_refusals_name_the_options_of_the_interface_they_come_from(tmp_path):
    out = _fresh(tmp_path / "shapes")
    config = ShapesConfig(n=6, size=32)
    with pytest.raises(ConfigError, match="not empty") as python:
        make_shapes_dataset(out, config)
    message = str(python.value)
    assert "overwrite=True" in message and "choose another out" in message
    assert "--overwrite" not in message and "resume" not in message
    cli = _make(out)
    assert "--overwrite" in cli.output and "choose another --out" in cli.output
    assert "overwrite=True" not in cli.output
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ConfigError, match="is a file; give out a folder"):
        make_shapes_dataset(tmp_path / "a_file", config)
    a_file = _make(tmp_path / "a_file")
    assert a_file.exit_code == 2 and "is a file; give --out a folder" in a_file.output
    assert (tmp_path / "a_file").read_text() == "mine"
    # In Python too, overwrite=True replaces exactly the earlier data set.
    make_shapes_dataset(out, config, overwrite=True)
    assert len([k for k in _all_bytes(out) if k.startswith("images/")]) == 6


def _write(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value // 2, 0)).save(path)


def test_scan_lists_sorted_classes_and_rejects_bad_layouts(tmp_path):
    _write(tmp_path / "data" / "dog" / "b.png", (8, 8), 10)
    _write(tmp_path / "data" / "cat" / "sub" / "a.png", (8, 8), 20)
    _write(tmp_path / "data" / "cat" / "z.jpg", (8, 8), 30)
    (tmp_path / "data" / ".cache").mkdir()
    folder = scan_image_folder(tmp_path / "data")
    assert folder.classes == ["cat", "dog"]
    assert [p.relative_to(tmp_path / "data").as_posix() for p in folder.paths] == [
        "cat/sub/a.png",
        "cat/z.jpg",
        "dog/b.png",
    ]
    assert folder.targets == [0, 0, 1]

    (tmp_path / "data" / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"'empty'.*contain no image files"):
        scan_image_folder(tmp_path / "data")
    _write(tmp_path / "one" / "cat" / "a.png", (8, 8), 1)
    with pytest.raises(ConfigError, match="at least two classes \\(found only 'cat'\\)"):
        scan_image_folder(tmp_path / "one")
    with pytest.raises(ConfigError, match="does not exist or is not a folder"):
        scan_image_folder(tmp_path / "missing")


def test_load_images_resizes_every_mode_and_skips_unreadable_files(tmp_path):
    _write(tmp_path / "a.png", (20, 10), 200)
    _write(tmp_path / "b.png", (5, 7), 77, mode="L")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths = [tmp_path / n for n in ("a.png", "broken.png", "b.png", "empty.jpg")]
    loaded = load_images(paths, [0, 1, 1, 0], (6, 4))
    assert loaded.images.shape == (2, 3, 6, 4) and loaded.images.dtype.is_floating_point is False
    assert loaded.targets.tolist() == [0, 1] and loaded.paths == [paths[0], paths[2]]
    assert loaded.images[0, :, 0, 0].tolist() == [200, 100, 0]  # a solid colour stays exact
    assert loaded.images[1].unique().tolist() == [77]  # grey -> RGB
    assert [p.name for p, _ in loaded.skipped] == ["broken.png", "empty.jpg"]
    assert "empty" in loaded.skipped[1][1]


def test_stratified_split_is_seeded_disjoint_and_keeps_class_proportions():
    targets = [0] * 10 + [1] * 5 + [2] * 1
    train, val = stratified_split(targets, 0.2, seed=4)
    assert sorted(train + val) == list(range(16)) and not set(train) & set(val)
    assert [targets[i] for i in val].count(0) == 2 and [targets[i] for i in val].count(1) == 1
    assert 15 in train  # a class with one image stays in training
    assert stratified_split(targets, 0.2, seed=4) == (train, val)
    assert stratified_split(targets, 0.2, seed=5) != (train, val)
    assert stratified_split(targets, 0.0, seed=4) == (list(range(16)), [])
    with pytest.raises(ConfigError, match="must lie in \\[0, 1\\)"):
        stratified_split(targets, 1.0, seed=0)
