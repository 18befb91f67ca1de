"""``camlens make-dataset xray``: synthetic radiographs, a finding, and per-hospital markers."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from camlens.cli import main
from camlens.data.xray import (
    MARKERS,
    MAX_VALUE,
    XrayConfig,
    edge_band,
    make_xray_dataset,
    marker_patch,
    marker_side,
    render_xray_image,
    xray_plan,
)
from camlens.errors import ConfigError
from camlens.io.annotations import load_annotations


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file camlens wrote as data (not its own bookkeeping in .camlens/)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".camlens" not in p.parts
    }


def _mask(root: Path, relative: str) -> np.ndarray:
    return np.asarray(Image.open(root / relative)) > 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    """50 images of 64 px, seed 3, two hospitals at 80 % and 20 % findings."""
    out = tmp_path_factory.mktemp("xray") / "data"
    return out, make_xray_dataset(out, XrayConfig(n=50, size=64, seed=3))


# --- the generator -------------------------------------------------------------------------


def test_the_same_seed_gives_identical_files_and_another_seed_other_images(tmp_path, dataset):
    out, _ = dataset
    again = tmp_path / "again"
    make_xray_dataset(again, XrayConfig(n=50, size=64, seed=3))
    first = _hashes(out)
    assert _hashes(again) == first
    assert len(first) == 1 + 1 + 1 + 50 * 3 + 25  # csv x2, json, image + 2 masks, findings
    other = tmp_path / "other"
    make_xray_dataset(other, XrayConfig(n=50, size=64, seed=4))
    images = [k for k in first if k.startswith("images/") and k.endswith("xray_0000.png")]
    assert images  # the same image number under another seed: other pixels
    other_hashes = _hashes(other)
    for name in first:
        if name.startswith("images/") and name in other_hashes:
            assert other_hashes[name] != first[name]


def test_prevalence_per_hospital_is_exact(dataset):
    _, info = dataset
    assert [(h["name"], h["marker"], h["images"], h["findings"]) for h in info["hospitals"]] == [
        ("A", "L", 25, 20),  # round(0.8 * 25)
        ("B", "box-R", 25, 5),  # round(0.2 * 25)
    ]
    for i, record in enumerate(info["images"]):
        assert record["hospital"] == "AB"[i % 2]
        assert record["marker"] == ("L", "box-R")[i % 2]
        assert record["image"] == f"images/{record['label']}/xray_{i:04d}.png"
    plan = xray_plan(XrayConfig(n=31, hospitals=3, prevalence=(1.0, 0.5, 0.0)))
    per_hospital = [[label for label, h in plan if h == k] for k in range(3)]
    assert [len(labels) for labels in per_hospital] == [11, 10, 10]
    assert [labels.count("finding") for labels in per_hospital] == [11, 5, 0]


def test_markers_lie_in_the_edge_band_off_the_lungs_at_varying_places(dataset):
    out, info = dataset
    size, side, band = 64, marker_side(64), edge_band(64)
    assert (side, band) == (7, 2 * 2 + 7)
    boxes, edges = set(), set()
    for record in info["images"]:
        x0, y0, x1, y1 = record["marker_box"]
        assert (x1 - x0, y1 - y0) == (side, side)
        assert min(x0, y0) >= 0 and max(x1, y1) <= size
        distance = {"top": y1, "left": x1, "bottom": size - y0, "right": size - x0}
        assert distance[record["marker_edge"]] <= band
        lungs = _mask(out, record["lung_mask"])
        marker = _mask(out, record["marker_mask"])
        assert marker.sum() == side * side and marker[y0:y1, x0:x1].all()
        assert not (lungs & marker).any()
        boxes.add(tuple(record["marker_box"]))
        edges.add(record["marker_edge"])
    assert len(boxes) >= 40 and edges == {"top", "bottom", "left", "right"}


@pytest.mark.parametrize("size", [48, 96, 128, 256])
def test_markers_stay_off_the_lungs_at_every_size(size):
    config = XrayConfig(size=size).validated()
    band, edges = edge_band(size), set()
    for index in range(30):
        sample = render_xray_image(config, index, "finding", index % 2)
        x0, y0, x1, y1 = sample.marker_box
        assert not sample.lungs[y0:y1, x0:x1].any()
        assert min(x1, y1, size - x0, size - y0) <= band
        edges.add(sample.marker_edge)
    assert len(edges) >= 3


def test_the_finding_lies_inside_the_lung_field(dataset):
    out, info = dataset
    for record in info["images"]:
        lungs = _mask(out, record["lung_mask"])
        left, right = record["lung_boxes"]
        assert left[2] <= right[0]  # the image's left lung, then its right one
        assert lungs.any() and lungs.sum() < 0.5 * lungs.size
        if record["label"] == "normal":
            assert record["finding_mask"] is None and record["finding_box"] is None
            continue
        finding = _mask(out, record["finding_mask"])
        assert finding.sum() >= 4
        assert not (finding & ~lungs).any()
        rows, cols = np.nonzero(finding)
        x0, y0, x1, y1 = record["finding_box"]
        assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_the_opacity_is_brighter_than_the_same_film_without_it():
    config = XrayConfig(size=64, noise=0.0).validated()
    sick = render_xray_image(config, 7, "finding", 0)
    well = render_xray_image(config, 7, "normal", 0)
    gain = sick.pixels.astype(int) - well.pixels.astype(int)
    assert gain.min() >= 0
    assert gain[sick.finding].mean() > 0.5 * 0.1 * 0.8 * MAX_VALUE * 0.5  # peak >= 0.8 x 0.1
    assert np.array_equal(well.lungs, sick.lungs) and well.marker_box == sick.marker_box
    near_lungs = ndimage.binary_dilation(sick.lungs, iterations=3)
    assert not gain[~near_lungs].any()  # an opacity *in* the lung field, nowhere else


def test_swapping_the_marker_changes_only_the_markers_pixels():
    config = XrayConfig(size=64).validated()
    original = render_xray_image(config, 11, "finding", 1)
    swapped = render_xray_image(config, 11, "finding", 1, marker="L")
    assert (original.marker, swapped.marker) == ("box-R", "L")
    x0, y0, x1, y1 = original.marker_box
    outside = np.ones((64, 64), dtype=bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(original.pixels[outside], swapped.pixels[outside])
    assert not np.array_equal(original.pixels[~outside], swapped.pixels[~outside])


def test_marker_patches_are_letters_on_a_dark_square():
    bright = marker_patch("R", 7) > 0.5
    assert bright.astype(int).tolist() == [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0],
        [0, 1, 0, 0, 0, 1, 0],
        [0, 1, 1, 1, 1, 0, 0],
        [0, 1, 0, 1, 0, 0, 0],
        [0, 1, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ]
    assert np.array_equal(marker_patch("box-R", 7) < 0.5, bright)  # the same R, inverted
    assert set(np.unique(marker_patch("box-R", 7))) == {0.08, 0.97}
    patches = {style: marker_patch(style, 10) for style in MARKERS}
    assert len({p.tobytes() for p in patches.values()}) == len(MARKERS) == 6
    assert all(set(np.unique(p)) == {0.08, 0.97} for p in patches.values())


def test_png_images_keep_16_bit_values(dataset):
    out, info = dataset
    image = Image.open(out / info["images"][0]["image"])
    assert image.mode == "I;16"
    pixels = np.asarray(image)
    assert len(np.unique(pixels)) > 256 and 255 < pixels.max() <= MAX_VALUE


def test_dicom_files_hold_the_png_pixels_and_no_patient_data(tmp_path, dataset):
    png_out, _ = dataset
    out = tmp_path / "dicom"
    info = make_xray_dataset(out, XrayConfig(n=50, size=64, seed=3, format="dicom"))
    uids = set()
    for record in info["images"][:6]:
        assert record["image"].endswith(".dcm")
        ds = pydicom.dcmread(out / record["image"])  # no force: a proper file with meta
        png = np.asarray(Image.open(png_out / record["image"].replace(".dcm", ".png")))
        assert np.array_equal(ds.pixel_array, png)
        assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored) == (
            "MONOCHROME2",
            16,
            12,
        )
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert str(ds.PatientName) == "" and ds.PatientID == ""
        assert not any(element.tag.is_private for element in ds)
        uids.add(ds.SOPInstanceUID)
    assert len(uids) == 6
    again = tmp_path / "again"
    make_xray_dataset(again, XrayConfig(n=50, size=64, seed=3, format="dicom"))
    assert _hashes(again) == _hashes(out)


def test_camlens_reads_every_annotation_layout(dataset):
    out, info = dataset
    by_image = {str(out / r["image"]): r for r in info["images"]}
    findings = load_annotations(out / "annotations.csv")
    assert len(findings) == 25
    for item in findings:
        record = by_image[str(item.image)]
        assert item.labels == ["finding"] and item.boxes == [tuple(record["finding_box"])]
    lungs = load_annotations(out / "lungs.csv")
    assert len(lungs) == 50
    for item in lungs:
        record = by_image[str(item.image)]
        assert item.labels == [record["label"]] * 2
        assert item.boxes == [tuple(b) for b in record["lung_boxes"]]
    masked = load_annotations(out)  # the mask folder layout: masks/finding/*.png
    assert {str(a.image) for a in masked} == {str(a.image) for a in findings}
    lung_masks = load_annotations(out / "lungs", image_root=out / "images")
    assert len(lung_masks) == 50
    for item in lung_masks:
        record = by_image[str(item.image)]
        assert item.labels == [record["label"]]
        assert np.array_equal(item.mask, _mask(out, record["lung_mask"]))
    markers = load_annotations(out / "markers", image_root=out / "images")
    assert {a.boxes[0] for a in markers} == {tuple(r["marker_box"]) for r in info["images"]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hospitals": 7}, "use 2 to 6 hospitals"),
        ({"prevalence": (0.5,)}, "1 value(s)"),
        ({"prevalence": (0.5, 1.5)}, "every share must lie in [0, 1]"),
        ({"markers": ("L", "Q")}, "unknown marker(s) Q"),
        ({"markers": ("L", "L")}, "give 2 different markers"),
        ({"size": 32}, "too small"),
        ({"n": 3}, "too few"),
        ({"format": "jpeg"}, "unknown format"),
    ],
)
def test_bad_parameters_are_config_errors_and_create_nothing(tmp_path, changes, message):
    with pytest.raises(ConfigError) as error:
        make_xray_dataset(tmp_path / "out", XrayConfig(**{"n": 8, "size": 64, **changes}))
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


# --- the command ---------------------------------------------------------------------------


def _run(out: Path, *args: str):
    return CliRunner().invoke(
        main, ["make-dataset", "xray", "--out", str(out), "--n", "20", "--size", "64", *args]
    )


def test_make_dataset_xray_command(tmp_path):
    out = tmp_path / "xray"
    result = _run(out)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"20 x-ray images (finding: 10, normal: 10) from 2 hospitals "
        f"(A: L marker, 8/10 finding; B: box-R marker, 2/10 finding) -> {out}"
    )
    info = json.loads((out / "dataset.json").read_text())
    assert info["parameters"]["size"] == 64 and info["parameters"]["kind"] == "xray"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["finding", "normal"]
    with open(out / "annotations.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 10
    three = _run(tmp_path / "three", "--hospitals", "3", "--prevalence", "1,0.5,0")
    assert three.exit_code == 0, three.output
    assert "A: L marker, 7/7 finding; B: box-R marker, 4/7 finding; C: X marker, 0/6" in (
        three.output
    )


def test_the_command_refuses_a_full_folder_and_overwrite_gives_a_fresh_data_set(tmp_path):
    out = tmp_path / "xray"
    assert _run(out).exit_code == 0
    first = _hashes(out)
    again = _run(out, "--seed", "1")
    assert again.exit_code == 2 and "is not empty" in again.output and "--overwrite" in again.output
    assert _hashes(out) == first
    (out / "mine.txt").write_text("mine")
    assert _run(out, "--seed", "1", "--overwrite").exit_code == 0
    assert _run(tmp_path / "fresh", "--seed", "1").exit_code == 0
    result = _hashes(out)
    assert result.pop("mine.txt") == hashlib.sha256(b"mine").hexdigest()
    assert result == _hashes(tmp_path / "fresh") != first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shortcut", "token"], "--shortcut is an option of make-dataset shapes, not xray"),
        (["--prevalence", "0.8,high"], "give comma-separated numbers"),
        (["--prevalence", "0.8"], "prevalence has 1 value(s)"),
        (["--markers", "L,Q"], "unknown marker(s) Q"),
    ],
)
def test_the_command_names_bad_options(tmp_path, args, message):
    result = _run(tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_shapes_refuses_xray_options(tmp_path):
    out = tmp_path / "shapes"
    result = CliRunner().invoke(
        main, ["make-dataset", "shapes", "--out", str(out), "--n", "6", "--hospitals", "3"]
    )
    assert (
        result.exit_code == 2 and "--hospitals is an option of make-dataset xray" in result.output
    )
    assert not out.exists()


def test_an_output_folder_that_cannot_be_written_is_one_line_and_exit_2():
    out = Path("/proc/camlens-cannot-write-here")  # /proc refuses new entries, even for root
    result = _run(out)
    assert result.exit_code == 2 and "Traceback" not in result.output and str(out) in result.output
