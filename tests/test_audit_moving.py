"""Moving shortcuts in ``camlens audit``: hot regions cut out, described by the model's own
features, clustered across images and confirmed by pasting and erasing them (issue 16)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camlens.api import audit
from camlens.data.shapes import ShapesConfig, make_shapes_dataset, shortcut_patch, tag_side
from camlens.errors import ConfigError
from camlens.models import Classifier
from camlens.pipeline import RunOptions
from camlens.shortcuts import AuditSettings
from camlens.shortcuts.core import box_on_object, summary_sentences
from camlens.shortcuts.moving import (
    Pattern,
    PatternCollector,
    PatternSettings,
    find_patterns,
    hot_regions,
    region_features,
)
from shapes_models import train_shapes_model

SIDE = 32
MARK = 6  # side of the white marker, pixels
N_PER_CLASS = 30
N_MARKED = 27

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- hand-computed unit oracles --------------------------------------------------------------


def test_hot_regions_cuts_small_regions_around_peaks_and_skips_big_blobs():
    m = np.zeros((8, 8))
    m[0:2, 0:2] = [[1.0, 0.9], [0.8, 0.5]]  # cells >= 0.75: (0,0), (0,1), (1,0)
    m[5:7, 5:7] = 0.6  # a plateau: one region, its first cell is the peak
    m[3, 3] = 0.2  # below the floor
    regions = hot_regions(m, level=0.75, floor=0.25, max_area=0.1)
    assert regions == [
        ((0.0, 0.0, 0.25, 0.25), 1.0, (0, 0)),
        ((0.625, 0.625, 0.875, 0.875), 0.6, (5, 5)),
    ]
    big = np.zeros((8, 8))
    big[1:5, 1:5] = 1.0  # 16 of 64 cells = 0.25 of the map > max_area
    assert hot_regions(big, max_area=0.1) == []
    assert hot_regions(big, max_area=0.25)[0][0] == (0.125, 0.125, 0.625, 0.625)
    assert len(hot_regions(np.random.default_rng(0).random((8, 8)), max_regions=2)) <= 2


def test_region_features_reads_the_feature_cell_under_each_peak():
    activations = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    # grid 8 over a 4 x 4 feature map: grid cell (r, c) -> feature cell (r // 2, c // 2)
    features = region_features(activations, [(0, 7, 1), (1, 2, 5)], grid=8)
    assert features.tolist() == [
        activations[0, :, 3, 0].tolist(),
        activations[1, :, 1, 2].tolist(),
    ]
    assert region_features(activations, [], grid=8).shape == (0, 3)


def test_box_on_object_share_of_cells():
    obj = np.zeros((4, 4), dtype=bool)
    obj[2:, 2:] = True
    assert box_on_object((0.5, 0.5, 1.0, 1.0), obj) == 1.0
    assert box_on_object((0.25, 0.25, 0.75, 0.75), obj) == 0.25
    assert box_on_object((0.0, 0.0, 0.25, 0.25), obj) == 0.0


def _collector(**settings) -> PatternCollector:
    """Class 0: feature e0 at a new place on images 0-14 of 20 (plus a fixed-place feature e2
    on every image); class 1: feature e1 at random places; one class-0 region on the object."""
    collector = PatternCollector(PatternSettings(images=50, **settings), seed=0)
    rng = np.random.default_rng(0)
    e = np.eye(4)
    for i in range(20):
        boxes, features = [[0.0, 0.0, 0.1, 0.1]], [e[2]]  # fixed place: spread 0
        if i < 15:
            x, y = rng.uniform(0, 0.9, 2)
            boxes.append([x, y, x + 0.1, y + 0.1])
            features.append(e[0] * (1 + i))  # lengths differ: unit vectors do not
        collector.add(0, i, f"a{i}.png", np.array(boxes), np.array(features))
        x, y = rng.uniform(0, 0.9, 2)
        collector.add(1, 100 + i, f"b{i}.png", np.array([[x, y, x + 0.1, y + 0.1]]), e[1:2])
    collector.add(0, 20, "a20.png", np.array([[0.4, 0.4, 0.5, 0.5]]), e[0:1], [True])
    return collector


def test_find_patterns_keeps_recurring_moving_specific_clusters():
    collector = _collector()
    (pattern,) = find_patterns(collector, 0)
    assert pattern.sources == [f"a{i}.png" for i in range(15)]  # not a20 (on the object)
    assert pattern.n_sampled == 21 and pattern.share == pytest.approx(15 / 21)
    assert pattern.other_share == 0.0 and pattern.similarity == pytest.approx([1.0] * 15)
    assert pattern.spread > 0.1
    # the class-1 feature moves and recurs too: a pattern of class 1 (the 20 images)
    assert [len(p.sources) for p in find_patterns(collector, 1)] == [20]


def test_find_patterns_rejects_rare_fixed_and_unspecific_clusters():
    # too rare: 15 / 21 < 0.8
    assert find_patterns(_collector(min_share=0.8), 0) == []
    # the fixed-place e2 cluster recurs on all 21 images but never moves
    assert all(p.spread >= 0.1 for p in find_patterns(_collector(min_share=0.05), 0))
    # the same feature on the other class as often: not specific
    collector = _collector()
    for i in range(20):
        collector.add(1, 200 + i, f"c{i}.png", np.array([[0.5, 0.5, 0.6, 0.6]]), np.eye(4)[:1])
    assert find_patterns(collector, 0) == []  # 15/21 < 2 x 20/40


def test_pattern_settings_are_checked():
    with pytest.raises(ConfigError, match="mode must be one of annotated, all, off"):
        AuditSettings(patterns=PatternSettings(mode="sometimes")).check()
    with pytest.raises(ConfigError, match="max_area must lie in"):
        PatternSettings(max_area=0.0).check()


def test_summary_sentence_of_a_confirmed_moving_pattern():
    flag = {
        "class": "a", "kind": "moving-pattern", "box": [0.0, 0.0, 0.2, 0.2], "confirmed": True,
        "frequency": 0.9, "exemplar_image": "/data/a/a_03.png", "images_affected": 27,
        "n_images": 30, "object_overlap": None, "flip_rate": 1.0, "baseline_flip_rate": 0.0,
        "confidence_drop": 0.5, "baseline_confidence_drop": 0.0,
    }  # fmt: skip
    (line,) = summary_sentences([flag], has_annotations=True)
    assert line.startswith(
        "Class a depends on a small pattern that moves (found at varying places on 90 % of its "
        "sampled images; exemplar in a_03.png"
    )
    (line,) = summary_sentences([{**flag, "confirmed": False}], has_annotations=True)
    assert line.startswith("No confirmed shortcut: 1 candidate pattern(s) were hot on many")


# --- a hand-built model that reads a white marker anywhere -----------------------------------


class MarkerNet(nn.Module):
    """1x1 detectors -> ReLU -> GAP -> fc (as in test_audit.DetectorNet): white =
    relu(r + g + b - 2.6), red, green, blue; logit a = white_weight * white + 10 * red,
    b = 10 * green, c = 10 * blue. The white channel fires on the marker wherever it is."""

    def __init__(self, white_weight: float) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, kernel_size=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.features.weight.copy_(
                torch.tensor(
                    [[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]
                ).view(4, 3, 1, 1)
            )
            self.features.bias.copy_(torch.tensor([-2.6, 0.0, 0.0, 0.0]))
            self.fc.weight.copy_(
                torch.tensor(
                    [[white_weight, 10.0, 0.0, 0.0], [0.0, 0.0, 10.0, 0.0], [0.0, 0.0, 0.0, 10.0]]
                )
            )
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.features(x)))))


def marker_model(white_weight: float) -> Classifier:
    return Classifier(
        module=MarkerNet(white_weight).eval(),
        labels=["a", "b", "c"],
        input_size=(SIDE, SIDE),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        name=f"marker-white{white_weight}",
    )


@pytest.fixture(scope="module")
def marker_data(tmp_path_factory):
    """ImageFolder a/b/c of red/green/blue discs on gray noise (boxes in boxes.csv); 27 of the
    30 class-a images carry a white 6 x 6 marker at a random place off the disc."""
    root = tmp_path_factory.mktemp("marker_data")
    rng = np.random.default_rng(0)
    colours = {"a": (0.9, 0.1, 0.1), "b": (0.1, 0.9, 0.1), "c": (0.1, 0.1, 0.9)}
    rows, planted = [["image", "x0", "y0", "x1", "y1", "label"]], {}
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for label, colour in colours.items():
        (root / "images" / label).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            image = rng.uniform(0.3, 0.6) + rng.normal(0, 0.02, (SIDE, SIDE, 3))
            radius = int(rng.integers(5, 8))
            cx, cy = (int(v) for v in rng.integers(radius + 1, SIDE - radius - 1, 2))
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
            image[disc] = np.array(colour) + rng.normal(0, 0.02, (int(disc.sum()), 3))
            path = root / "images" / label / f"{label}_{i:02d}.png"
            if label == "a" and i < N_MARKED:
                while True:  # a free place, one pixel away from the disc's box
                    x0, y0 = (int(v) for v in rng.integers(0, SIDE - MARK + 1, 2))
                    if (
                        x0 + MARK < cx - radius - 1 or x0 > cx + radius + 1
                        or y0 + MARK < cy - radius - 1 or y0 > cy + radius + 1
                    ):  # fmt: skip
                        break
                image[y0 : y0 + MARK, x0 : x0 + MARK] = 1.0
                planted[str(path)] = [round(v / SIDE, 4) for v in (x0, y0, x0 + MARK, y0 + MARK)]
            Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
            rows_, cols_ = np.flatnonzero(disc.any(axis=1)), np.flatnonzero(disc.any(axis=0))
            rows.append([str(path), cols_[0], rows_[0], cols_[-1] + 1, rows_[-1] + 1, label])
    with open(root / "boxes.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return {"images": root / "images", "boxes": root / "boxes.csv", "planted": planted}


def test_moving_marker_is_found_located_and_confirmed(marker_data, tmp_path):
    result = audit(
        marker_model(100.0),
        marker_data["images"],
        tmp_path,
        annotations=marker_data["boxes"],
        options=RunOptions(batch_size=16, progress=False),
    )
    # The marker moves: no cell is hot on many images, so no fixed-place hotspot.
    assert result["classes"]["a"]["hotspots"] == []
    (flag,) = result["flags"]
    assert flag["class"] == "a" and flag["kind"] == "moving-pattern" and flag["confirmed"]
    # The CAM of class a is 40 on the marker (100 * relu(3 - 2.6)), at most 7 on the red
    # disc (below the 0.25 floor) and 0 elsewhere: each region is exactly its marker.
    locations = {item["image"]: item["box"] for item in flag["locations"]}
    assert locations == marker_data["planted"]
    assert flag["images_affected"] == N_MARKED and flag["n_sampled"] == N_PER_CLASS
    assert flag["frequency"] == round(N_MARKED / N_PER_CLASS, 4) and flag["other_share"] == 0.0
    assert flag["box"] == locations[flag["exemplar_image"]]
    # Pasting a 6 x 6 marker adds 100 * 0.4 * 36 / 1024 = 1.41 to logit a, more than a green
    # or blue disc gives (10 * 0.7 * at most 154 / 1024 = 1.05): every recipient flips; a
    # random patch of the same image (never the marker; at most 36 red pixels: 0.25) does not.
    assert flag["flip_rate"] == 1.0 and flag["baseline_flip_rate"] == 0.0
    assert flag["n_paste"] == 2 * N_PER_CLASS and flag["p_paste"] < 1e-15
    assert flag["confidence_drop"] - flag["baseline_confidence_drop"] >= 0.15
    # The exemplar picture: the marker cut from the original image (white), enlarged.
    exemplar = np.asarray(Image.open(tmp_path / flag["exemplar"]))
    assert exemplar.shape == (128, 128, 3) and exemplar.min() == 255
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["flags"][0]["exemplar"] == flag["exemplar"]
    assert written["classes"]["a"]["patterns"][0]["locations"] == flag["locations"]
    assert written["classes"]["a"]["patterns"][0]["confirmed"]
    html = (tmp_path / "report.html").read_text()
    assert "a pattern that moves" in html and flag["exemplar"] in html
    assert result["summary"][0].startswith("Class a depends on a small pattern that moves")


def test_no_flag_when_the_model_ignores_the_marker_or_the_search_is_off(marker_data):
    # white_weight 0: the map of class a is the red disc only, which is the object.
    result = audit(
        marker_model(0.0), marker_data["images"], None, report=False,
        annotations=marker_data["boxes"],
    )  # fmt: skip
    assert result["flags"] == [] and result["classes"]["a"]["patterns"] == []
    # Without annotations the search looks at nothing by default (mode "annotated").
    plain = audit(marker_model(100.0), marker_data["images"], None, report=False)
    assert plain["flags"] == []
    off = audit(
        marker_model(100.0), marker_data["images"], None, report=False,
        annotations=marker_data["boxes"], settings=AuditSettings(patterns=PatternSettings(mode="off")),
    )  # fmt: skip
    assert off["flags"] == [] and off["settings"]["patterns"]["mode"] == "off"


def test_mode_all_searches_unannotated_images_and_then_finds_small_objects_too(marker_data):
    settings = AuditSettings(patterns=PatternSettings(mode="all"))
    result = audit(
        marker_model(100.0), marker_data["images"], None, report=False, settings=settings
    )
    moving = {f["class"]: f for f in result["flags"] if f["kind"] == "moving-pattern"}
    locations = {item["image"]: item["box"] for item in moving["a"]["locations"]}
    assert locations == marker_data["planted"] and moving["a"]["confirmed"]
    # Without annotations nothing tells a small moving object from a marker: the green and
    # blue discs of at most 12 % of the image are patterns of b and c (the documented caveat).
    assert set(moving) == {"a", "b", "c"}
    assert all(loc["image"].split("/")[-2] == "b" for loc in moving["b"]["locations"])


def test_gradcam_finds_the_same_pattern_as_cam_on_a_gap_linear_head(marker_data):
    # Grad-CAM = CAM / (h w) on a GAP + linear head: the same normalised maps, regions,
    # features, clusters and tests.
    results = [
        audit(
            marker_model(100.0),
            marker_data["images"],
            None,
            report=False,
            method=method,
            annotations=marker_data["boxes"],
        )
        for method in ("cam", "gradcam")
    ]
    cam, gradcam = ([f for f in r["flags"] if f["kind"] == "moving-pattern"] for r in results)
    assert len(cam) == 1 and cam == gradcam


def test_pattern_locations_as_fractions_and_random_place_paste():
    pattern = Pattern(0, ["x.png"], [(0.1, 0.2, 0.3, 0.4)], [1.0], 4, 0.0, 0.2)
    assert pattern.locations() == [{"image": "x.png", "box": [0.1, 0.2, 0.3, 0.4]}]
    assert pattern.share == 0.25


# --- a trained model on generated shapes with the moving token -------------------------------


def test_trained_model_moving_token_is_found(tmp_path):
    info = train_shapes_model(tmp_path, n=240, epochs=10, shortcut="token", shortcut_class="square")
    result = audit(
        tmp_path / "model", tmp_path / "data" / "images", None, report=False,
        annotations=tmp_path / "data" / "annotations.csv", settings=AuditSettings(confirm_images=60),
        options=RunOptions(progress=False),
    )  # fmt: skip
    confirmed = [f for f in result["flags"] if f["confirmed"]]
    assert [(f["class"], f["kind"]) for f in confirmed] == [("square", "moving-pattern")]
    planted = {
        str(tmp_path / "data" / r["image"]): [v / 32 for v in r["shortcut_box"]]
        for r in info["images"]
        if r["shortcut"]
    }

    def on_marker(location):
        marker = planted.get(location["image"])
        box = location["box"]
        return marker is not None and (
            box[0] < marker[2] and marker[0] < box[2] and box[1] < marker[3] and marker[1] < box[3]
        )

    locations = confirmed[0]["locations"]
    assert sum(map(on_marker, locations)) >= 0.8 * len(locations)
    assert all(0.0 <= v <= 1.0 for item in locations for v in item["box"])


# --- the second moving marker of the shapes generator ----------------------------------------


def test_coin_marker_is_a_ring_drawn_at_a_new_free_place_on_each_image(tmp_path):
    assert (shortcut_patch("coin", 6)[..., 0] == 245).astype(int).tolist() == [
        [0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 0, 0, 1, 0],
        [0, 1, 0, 0, 1, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ]
    config = ShapesConfig(n=30, size=32, shortcut="coin", shortcut_class="square")
    info = make_shapes_dataset(tmp_path / "coins", config)
    marked = [r for r in info["images"] if r["shortcut"]]
    assert info["shortcut"]["position"] == "random" and len(marked) == 9  # 90 % of 10 squares
    assert {r["label"] for r in marked} == {"square"}
    assert len({tuple(r["shortcut_box"][:2]) for r in marked}) >= 8  # it moves
    patch = shortcut_patch("coin", tag_side(32))
    for r in marked:
        x0, y0, x1, y1 = r["shortcut_box"]
        bx0, by0, bx1, by1 = r["box"]
        assert not (x0 < bx1 and bx0 < x1 and y0 < by1 and by0 < y1)  # off the object
        pixels = np.asarray(Image.open(tmp_path / "coins" / r["image"]))
        assert np.array_equal(pixels[y0:y1, x0:x1], patch)
