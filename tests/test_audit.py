"""``camlens audit``: hand-computed oracles for every step, white-box models with a known
shortcut, and trained models on planted-shortcut and clean data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from camlens.api import audit
from camlens.cli import main
from camlens.errors import ConfigError
from camlens.io.annotations import Annotation
from camlens.models import Classifier
from camlens.pipeline import RunOptions
from camlens.shortcuts import (
    AuditSettings,
    Reservoir,
    describe_place,
    eigengap_cluster_count,
    find_hotspots,
    heat_share,
    spectral_relevance_analysis,
)
from camlens.shortcuts.confirm import (
    erase_regions,
    flip_outcomes,
    mcnemar_greater,
    paste_regions,
    pixel_box,
    random_boxes,
    sign_test_greater,
)
from camlens.shortcuts.core import object_grid, summary_sentences, widen_box
from camlens.shortcuts.data import resolve_audit_items
from camlens.shortcuts.find import MapAccumulator, TopCellSpool, outside_share, top_cell_masks
from shapes_models import train_shapes_model

SIDE = 32
PATCH = (2, 2, 8, 8)  # x0, y0, x1, y1 of the white patch on class-a images
N_PER_CLASS = 30
N_PLANTED = 27


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- hand-computed unit oracles --------------------------------------------------------------


def test_top_cell_masks_marks_the_k_largest_cells_and_nothing_on_empty_maps():
    maps = torch.tensor(
        [[[0.1, 0.9], [0.5, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.3, 0.0], [0.0, 0.0]]]
    )
    tops = top_cell_masks(maps, 0.5)  # ceil(0.5 * 4) = 2 cells
    assert tops[0].tolist() == [[False, True], [True, False]]
    assert not tops[1].any()  # an empty map has no top cells
    assert tops[2].tolist() == [[True, False], [False, False]]  # zeros are never top cells


def test_accumulator_mean_map_and_frequency_by_hand():
    acc = MapAccumulator(grid=2, top_fraction=0.25, image_side=2)
    maps = torch.tensor(
        [[[1.0, 0.0], [0.0, 0.5]], [[0.0, 1.0], [0.0, 0.0]], [[1.0, 0.2], [0.0, 0.0]]]
    )
    acc.update(maps, torch.tensor([0, 0, 1]))
    np.testing.assert_allclose(acc.stats[0].mean_map, [[0.5, 0.5], [0.0, 0.25]])
    np.testing.assert_allclose(acc.stats[0].frequency, [[0.5, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(acc.stats[1].frequency, [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(acc.other_frequency(1), [[0.5, 0.5], [0.0, 0.0]])
    assert (acc.stats[0].count, acc.stats[1].count) == (2, 1)


def test_find_hotspots_grows_a_compact_class_specific_region():
    frequency = np.full((8, 8), 0.02)
    frequency[0:2, 0:2] = 0.9  # seed
    frequency[2, 0:2] = 0.2  # grown by hysteresis (>= 0.15), not a seed
    frequency[5, 5] = 0.2  # warm but without a seed: ignored
    (hotspot,) = find_hotspots(frequency)
    assert hotspot.box == (0.0, 0.0, 0.25, 0.375)
    assert hotspot.cells == (0, 0, 2, 3)
    assert hotspot.area == pytest.approx(6 / 64)
    assert hotspot.frequency == pytest.approx((4 * 0.9 + 2 * 0.2) / 6)
    assert hotspot.peak_frequency == pytest.approx(0.9)


def test_find_hotspots_rejects_shared_and_large_regions():
    frequency = np.full((8, 8), 0.02)
    frequency[0:2, 0:2] = 0.9
    others = np.zeros((8, 8))
    assert len(find_hotspots(frequency, others)) == 1
    others[0:2, 0:2] = 0.5  # every class looks there: 0.9 < 2 x 0.5
    assert find_hotspots(frequency, others) == []
    big = np.full((8, 8), 0.02)
    big[0:5, 0:5] = 0.9  # 25 / 64 of the image > max_area 0.25
    assert find_hotspots(big) == []
    assert len(find_hotspots(big, max_area=0.5)) == 1


def test_heat_share_and_outside_share_by_hand():
    mean_map = np.array([[1.0, 3.0], [0.0, 4.0]])
    region = np.array([[False, True], [False, True]])
    assert heat_share(mean_map, region) == pytest.approx(7 / 8)
    assert heat_share(np.zeros((2, 2)), region) == 0.0
    assert outside_share(mean_map, region) == pytest.approx(1 / 8)
    assert outside_share(np.zeros((2, 2)), region) is None


def test_spool_counts_images_whose_top_cells_cover_the_region():
    region = np.zeros((4, 4), dtype=bool)
    region[0, 0:2] = True
    tops = torch.zeros(4, 4, 4, dtype=torch.bool)
    tops[0, 0, 0:2] = True  # covers 2/2
    tops[1, 0, 0] = True  # covers 1/2
    tops[2, 3, 3] = True  # covers 0/2
    tops[3, 0, 0:2] = True  # covers 2/2 but is class 1
    with TopCellSpool(grid=4, chunk=3) as spool:  # chunk < images: reads back in two chunks
        spool.append(tops[:2], torch.tensor([0, 0]))
        spool.append(tops[2:], torch.tensor([0, 1]))
        assert spool.count_covering([(0, region)], 0.5) == [2]
        assert spool.count_covering([(0, region), (1, region)], 1.0) == [1, 1]


def test_eigengap_counts_cliques():
    two = np.kron(np.eye(2), np.ones((4, 4)) - np.eye(4))
    three = np.kron(np.eye(3), np.ones((4, 4)) - np.eye(4))
    assert eigengap_cluster_count(two, 5)[0] == 2
    assert eigengap_cluster_count(three, 5)[0] == 3
    # A complete graph is one group.
    assert eigengap_cluster_count(np.ones((5, 5)) - np.eye(5), 3)[0] == 1


def test_spray_separates_strategies_with_exact_membership():
    rng = np.random.default_rng(0)
    maps = np.zeros((30, 8, 8))
    maps[:12, 0:2, 0:2] = 1.0  # tag in the corner
    maps[12:22, 3:6, 3:6] = 1.0  # object in the middle
    maps[22:, 6:8, 0:3] = 1.0  # something at the bottom left
    maps += rng.uniform(0, 0.05, maps.shape)
    result = spectral_relevance_analysis(maps, n_neighbors=5)
    assert result.n_clusters == 3
    groups = sorted(sorted(c.members) for c in result.clusters)
    assert groups == [list(range(12)), list(range(12, 22)), list(range(22, 30))]
    assert [c.size for c in result.clusters] == [12, 10, 8]  # largest first
    assert result.clusters[0].focus == (0.0, 0.0, 0.25, 0.25)
    assert result.clusters[0].exemplars[0] in range(12)


def test_reservoir_is_seeded_and_bounded():
    def sample(seed: int, n: int, capacity: int = 5) -> list[int]:
        reservoir = Reservoir(capacity, seed=seed)
        for item in range(n):
            reservoir.add(item)
        return reservoir.items

    assert sample(0, 3) == [0, 1, 2]  # fewer items than the capacity: all, in order
    assert sample(1, 1000) == sample(1, 1000)
    assert sample(1, 1000) != sample(2, 1000)
    assert len(sample(1, 1000)) == 5 and len(set(sample(1, 1000))) == 5
    # Every item is kept with probability capacity / n: the mean of the kept items is near the
    # mean of the stream (over many seeds; 5 * 200 draws, standard error ~ 9).
    kept = [item for seed in range(200) for item in sample(seed, 1000)]
    assert abs(np.mean(kept) - 499.5) < 40


def test_flip_outcomes_and_paired_tests_by_hand():
    eligible, flipped = flip_outcomes(torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 1, 2]), 1)
    assert eligible.tolist() == [True, False, True, True]
    assert flipped.tolist() == [True, False, True, False]
    assert mcnemar_greater(10, 0) == pytest.approx(0.5**10)
    assert sign_test_greater(0, 0) == 1.0
    assert sign_test_greater(2, 1) == pytest.approx(0.5)  # P(X >= 2), X ~ Bin(3, 1/2)


def test_paste_erase_and_boxes_by_hand():
    recipients = torch.zeros(2, 1, 4, 4)
    donors = torch.arange(32, dtype=torch.float32).view(2, 1, 4, 4)
    pasted = paste_regions(recipients, donors, (0, 0, 2, 1), sources=[(2, 3, 4, 4), (0, 0, 2, 1)])
    assert pasted[0, 0, 0].tolist() == [14.0, 15.0, 0.0, 0.0]
    assert pasted[1, 0, 0].tolist() == [16.0, 17.0, 0.0, 0.0]
    assert pasted[:, :, 1:].abs().sum() == 0
    images = torch.tensor([[[[0, 8], [4, 0]]]], dtype=torch.uint8)
    assert erase_regions(images, [(1, 0, 2, 1)], "mean")[0, 0].tolist() == [[0, 3], [4, 0]]
    flat = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    assert torch.equal(erase_regions(flat, [(0, 0, 4, 4)], "blur"), flat)  # blur of a constant
    assert pixel_box((0.1, 0.1, 0.3, 0.35), 20, 10) == (1, 2, 3, 7)
    assert widen_box((0.25, 0.25, 0.5, 0.5), (8, 4), 1.0) == (0.0, 0.125, 0.75, 0.625)
    boxes = random_boxes(np.random.default_rng(0), 50, (0, 0, 4, 4), 16, 16)
    assert all(b[2] - b[0] == 4 and b[3] - b[1] == 4 for b in boxes)
    assert all(b[0] >= 4 or b[1] >= 4 for b in boxes)  # never overlaps the hotspot


def test_object_grid_and_place_words():
    annotation = Annotation(Path("x.png"), boxes=[(0, 0, 50, 50), (75, 75, 100, 100)],
                            labels=["cat", "dog"])  # fmt: skip
    assert object_grid(annotation, "cat", (100, 100), 4).astype(int).tolist() == [
        [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0],
    ]  # fmt: skip
    assert object_grid(annotation, "bird", (100, 100), 4).sum() == 4 + 1  # unknown: all objects
    assert describe_place((0.0, 0.0, 0.2, 0.2)) == "in the upper left corner"
    assert describe_place((0.7, 0.75, 1.0, 1.0)) == "in the lower right corner"
    assert describe_place((0.0, 0.9, 1.0, 1.0)) == "along the bottom edge"
    assert describe_place((0.4, 0.4, 0.6, 0.6)) == "in the centre"


def test_summary_sentence_names_class_place_and_numbers():
    flag = {
        "class": "horse", "box": [0.0, 0.0, 0.2, 0.2], "confirmed": True, "object_overlap": 0.05,
        "images_affected": 80, "n_images": 100, "flip_rate": 0.87, "baseline_flip_rate": 0.03,
        "confidence_drop": 0.41, "baseline_confidence_drop": 0.02,
    }  # fmt: skip
    (line,) = summary_sentences([flag], has_annotations=True)
    assert line == (
        "Class horse depends on a region in the upper left corner of the image that is not the "
        "object: pasting it onto other images makes the model say horse in 87 % of cases (a "
        "random region of the same size: 3 %); erasing it lowers the model's confidence in "
        "horse by 0.41 on average (a random region: 0.02)."
    )
    assert summary_sentences([], has_annotations=False)[0].startswith("No confirmed shortcut")


# --- white-box models on hand-made data ------------------------------------------------------


class DetectorNet(nn.Module):
    """1x1 detectors -> ReLU -> GAP -> fc, with hand-set weights.

    Channels: white = relu(r + g + b - 2.6) (only the white patch), red = relu(r - g - b),
    green = relu(g - r - b), blue = relu(b - r - g). Logits: a = white_weight * white +
    10 * red, b = 10 * green, c = 10 * blue. So the CAM of class a is, per pixel,
    ``white_weight * white + 10 * red``.
    """

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


def detector_model(white_weight: float) -> Classifier:
    return Classifier(
        module=DetectorNet(white_weight).eval(),
        labels=["a", "b", "c"],
        input_size=(SIDE, SIDE),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        name=f"detector-white{white_weight}",
    )


@pytest.fixture(scope="module")
def patch_data(tmp_path_factory):
    """ImageFolder a/b/c of discs (red/green/blue) on gray noise; 27 of the 30 class-a images
    carry a white 6 x 6 patch at PATCH; discs never come near the top-left corner."""
    root = tmp_path_factory.mktemp("patch_data")
    rng = np.random.default_rng(0)
    colours = {"a": (0.9, 0.1, 0.1), "b": (0.1, 0.9, 0.1), "c": (0.1, 0.1, 0.9)}
    rows, planted = [["image", "x0", "y0", "x1", "y1", "label"]], set()
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for label, colour in colours.items():
        (root / "images" / label).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            image = rng.uniform(0.3, 0.6) + rng.normal(0, 0.02, (SIDE, SIDE, 3))
            radius = int(rng.integers(5, 8))
            while True:
                cx, cy = (int(v) for v in rng.integers(radius + 1, SIDE - radius - 1, 2))
                if cx - radius >= 12 or cy - radius >= 12:
                    break
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
            image[disc] = np.array(colour) + rng.normal(0, 0.02, (int(disc.sum()), 3))
            if label == "a" and i < N_PLANTED:
                x0, y0, x1, y1 = PATCH
                image[y0:y1, x0:x1] = 1.0
            path = root / "images" / label / f"{label}_{i:02d}.png"
            Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
            if label == "a" and i < N_PLANTED:
                planted.add(str(path))
            rows_, cols_ = np.flatnonzero(disc.any(axis=1)), np.flatnonzero(disc.any(axis=0))
            rows.append([str(path), cols_[0], rows_[0], cols_[-1] + 1, rows_[-1] + 1, label])
    with open(root / "boxes.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return {"root": root, "images": root / "images", "boxes": root / "boxes.csv"}


def _class_a_maps(images: Path, white_weight: float) -> list[tuple[np.ndarray, tuple]]:
    """Independent oracle: the CAM of class a, computed by hand from the pixels."""
    result = []
    with open(images.parent / "boxes.csv") as handle:
        boxes = {r["image"]: r for r in csv.DictReader(handle)}
    for path in sorted((images / "a").iterdir()):
        x = np.asarray(Image.open(path), dtype=np.float64) / 255.0
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        cam = white_weight * np.maximum(r + g + b - 2.6, 0) + 10 * np.maximum(r - g - b, 0)
        row = boxes[str(path)]
        result.append((cam, tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1"))))
    return result


def test_white_box_shortcut_is_found_placed_and_confirmed(patch_data, tmp_path):
    model = detector_model(white_weight=100.0)
    result = audit(
        model,
        patch_data["images"],
        tmp_path,
        annotations=patch_data["boxes"],
        options=RunOptions(batch_size=16),
    )
    assert result["labels_from"] == "folders" and result["n_images"] == 3 * N_PER_CLASS
    (flag,) = result["flags"]
    assert flag["class"] == "a" and flag["kind"] == "fixed-region" and flag["confirmed"]
    # The hot region is exactly the patch; the tested box adds one feature cell (1/32).
    (hotspot,) = result["classes"]["a"]["hotspots"]
    assert hotspot["core_box"] == [p / SIDE for p in PATCH]
    assert flag["box"] == [round(v, 4) for v in (1 / 32, 1 / 32, 9 / 32, 9 / 32)]
    assert flag["images_affected"] == N_PLANTED
    assert hotspot["frequency"] == pytest.approx(N_PLANTED / N_PER_CLASS)
    # Oracles from the hand-computed maps: heat share of the patch in the mean map, and the
    # share of each map outside the annotated disc.
    oracle = _class_a_maps(patch_data["images"], 100.0)
    mean_map = np.mean([cam / cam.max() for cam, _ in oracle], axis=0)
    patch = np.zeros((SIDE, SIDE), dtype=bool)
    patch[PATCH[1] : PATCH[3], PATCH[0] : PATCH[2]] = True
    assert flag["heat_share"] == pytest.approx(mean_map[patch].sum() / mean_map.sum(), abs=1e-4)
    outside = []
    for cam, (x0, y0, x1, y1) in oracle:
        inside = np.zeros_like(patch)
        inside[y0:y1, x0:x1] = True
        outside.append(cam[~inside].sum() / cam.sum())
    annotations = result["classes"]["a"]["annotations"]
    assert annotations["mean_outside_share"] == pytest.approx(np.mean(outside), abs=1e-4)
    assert annotations["worst"][0]["outside_share"] == pytest.approx(max(outside), abs=1e-4)
    # Counterfactuals: every recipient paired with a patch donor flips, nothing else does.
    assert flag["flip_rate"] >= 0.75 and flag["baseline_flip_rate"] == 0.0
    assert flag["confidence_drop"] - flag["baseline_confidence_drop"] >= 0.15
    assert flag["p_paste"] < 1e-6
    assert result["summary"][0].startswith(
        "Class a depends on a region in the upper left corner of the image that is not the object"
    )
    # The files the report promises.
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["flags"][0]["box"] == flag["box"]
    html = (tmp_path / "report.html").read_text()
    assert "Class a depends on a region in the upper left corner" in html
    for key in ("mean_map", "frequency"):
        assert (tmp_path / written["classes"]["a"]["figures"][key]).is_file()
    for pair in written["flags"][0]["figures"]["paste"]:
        assert (tmp_path / pair["before"]).is_file() and (tmp_path / pair["after"]).is_file()


def test_white_box_hot_but_weak_region_is_a_candidate_not_confirmed(patch_data):
    # white_weight 20: the patch is the hottest place of the map (20 * 0.4 = 8 > 10 * 0.7),
    # but its contribution to the logit (20 * 0.4 * 36 / 1024 = 0.28) never beats a green or
    # blue disc (>= 10 * 0.7 * 81 / 1024 = 0.55): pasting it cannot flip anything.
    result = audit(detector_model(20.0), patch_data["images"], None, report=False)
    (flag,) = result["flags"]
    assert flag["class"] == "a" and flag["images_affected"] == N_PLANTED
    assert flag["flip_rate"] == 0.0 and flag["baseline_flip_rate"] == 0.0
    assert not flag["confirmed"]
    assert result["summary"][0].startswith("No confirmed shortcut: 1 candidate region")


def test_white_box_colour_model_on_the_same_data_has_no_flag(patch_data):
    # The data still carries the patch, but this model reads only the disc colour.
    result = audit(detector_model(0.0), patch_data["images"], None, report=False)
    assert not any(f["confirmed"] for f in result["flags"])
    assert result["classes"]["a"]["hotspots"] == []
    assert result["classes"]["a"]["accuracy"] == 1.0


def test_audit_is_deterministic_and_plain_folders_use_predictions(patch_data, tmp_path):
    model = detector_model(100.0)
    first = audit(model, patch_data["images"], None, report=False, seed=3)
    second = audit(model, patch_data["images"], None, report=False, seed=3)
    for result in (first, second):
        result.pop("seconds")
    assert first == second
    by_prediction = audit(model, patch_data["images"] / "a", None, report=False)
    assert by_prediction["labels_from"] == "predictions"
    assert by_prediction["n_images"] == N_PER_CLASS
    assert set(by_prediction["classes"]) == {"a"}  # every class-a image is predicted a


def test_classes_option_and_unreadable_images(patch_data, tmp_path):
    model = detector_model(100.0)
    only_b = audit(model, patch_data["images"], None, report=False, classes=["B"])
    assert only_b["flags"] == [] and not only_b["classes"]["a"]["audited"]
    assert only_b["classes"]["b"]["audited"] and only_b["n_images"] == 3 * N_PER_CLASS
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted((patch_data["images"] / "a").iterdir())[:5]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    result = audit(model, folder, tmp_path / "out", settings=AuditSettings(min_class_images=2))
    assert (result["n_images"], result["n_failed"]) == (5, 1)
    assert result["errors"][0]["input"].endswith("broken.png")
    assert "broken.png" in (tmp_path / "out" / "report.html").read_text()


def test_report_is_drawn_without_running_the_model(patch_data, tmp_path, monkeypatch):
    import ast

    import camlens.api.auditing as auditing
    import camlens.report.audit as report_module

    # The report module imports neither the API nor the methods nor the models...
    tree = ast.parse(Path(report_module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
    }
    banned = ("camlens.api", "camlens.methods", "camlens.models")
    assert not [name for name in imported if name and name.startswith(banned)]
    # ... and while it draws (exemplars and worst images included), the model never runs.
    model = detector_model(100.0)
    state = {"drawing": False, "forwards": 0, "forwards_while_drawing": 0}

    def count(*_):
        state["forwards"] += 1
        state["forwards_while_drawing"] += state["drawing"]

    model.module.register_forward_pre_hook(count)
    original = auditing.write_audit_report

    def watched(*args, **kwargs):
        state["drawing"] = True
        try:
            return original(*args, **kwargs)
        finally:
            state["drawing"] = False

    monkeypatch.setattr(auditing, "write_audit_report", watched)
    out = tmp_path / "out"
    result = audit(model, patch_data["images"], out, annotations=patch_data["boxes"])
    assert state["forwards"] > 0 and state["forwards_while_drawing"] == 0
    html = (out / "report.html").read_text()
    for label, entry in result["classes"].items():
        exemplars = [e for c in entry["clusters"]["clusters"] for e in c["exemplars"]]
        assert exemplars and len(entry["annotations"]["worst"]) == 8
        drawn = sorted(p.name for p in (out / "figures" / "clusters").glob(f"{label}_*_ex*.png"))
        assert len(drawn) == len(exemplars)
        worst = sorted((out / "figures" / "worst").glob(f"{label}_*.png"))
        assert len(worst) == 8 and all(f"figures/worst/{w.name}" in html for w in worst)
    # A worst image is its file with its stored grid map over it: the heat sits on the patch.
    worst_a = result["classes"]["a"]["annotations"]["worst"][0]["image"]
    assert worst_a in {str(p) for p in sorted((patch_data["images"] / "a").iterdir())[:N_PLANTED]}
    with Image.open(out / "figures" / "worst" / "a_0.png") as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.int64)
    scale = pixels.shape[0] / SIDE
    x0, y0, x1, y1 = (round(v * scale) for v in PATCH)
    patch_red = pixels[y0:y1, x0:x1, 0].mean() - pixels[y0:y1, x0:x1, 2].mean()
    far_red = pixels[-8:, -8:, 0].mean() - pixels[-8:, -8:, 2].mean()
    assert patch_red > far_red + 50  # jet: hot is red, cold is blue


def test_bad_data_is_a_config_error(patch_data, tmp_path):
    model = detector_model(0.0)
    with pytest.raises(ConfigError, match="not a class of the model"):
        bad = tmp_path / "bad"
        for name in ("a", "zebra"):
            (bad / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(bad / name / "x.png")
        audit(model, bad, None, report=False)
    with pytest.raises(ConfigError, match="does not exist"):
        audit(model, tmp_path / "missing", None)
    with pytest.raises(ConfigError, match="unknown engine"):
        audit(model, patch_data["images"], None, options=RunOptions(engine="spark"))
    items = resolve_audit_items(patch_data["images"], ["a", "b", "c"], max_images=10, seed=1)
    assert len(items.paths) == 10 and items.n_found == 90


# --- trained models on make-dataset data (the end-to-end evidence) ---------------------------


def _trained(tmp_path_factory, name: str, **shortcut) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp(name)
    return root, train_shapes_model(root, n=150, epochs=6, **shortcut)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    return _trained(
        tmp_path_factory, "tagged", shortcut="corner-tag", shortcut_class="circle",
        shortcut_position="top-right",
    )  # fmt: skip


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _trained(tmp_path_factory, "clean")


def test_cli_confirms_the_planted_corner_tag_of_a_trained_model(tagged):
    root, info = tagged
    out = root / "audit"
    run = CliRunner().invoke(
        main,
        [
            "audit", str(root / "data" / "images"), "--model", str(root / "model"),
            "--annotations", str(root / "data" / "annotations.csv"), "--out", str(out),
            "--confirm-images", "60",
        ],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    result = json.loads((out / "audit.json").read_text())
    confirmed = [f for f in result["flags"] if f["confirmed"]]
    assert [f["class"] for f in confirmed] == ["circle"]
    tag = next(r["shortcut_box"] for r in info["images"] if r["shortcut"])
    x0, y0, x1, y1 = (v / 32 for v in tag)
    bx0, by0, bx1, by1 = confirmed[0]["box"]
    assert bx0 < x1 and x0 < bx1 and by0 < y1 and y0 < by1  # the box covers the tag...
    assert bx0 >= 0.5 and by1 <= 0.6  # ... in the upper right quarter
    assert "CONFIRMED  circle  in the upper right corner" in run.output
    assert (out / "report.html").read_text().count("Class circle depends on") >= 1


def test_cli_configuration_errors_exit_2(tagged, tmp_path):
    root, _ = tagged
    runner = CliRunner()
    missing = runner.invoke(
        main, ["audit", str(tmp_path / "nope"), "--model", str(root / "model"), "--out", "o"]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
    wrong = runner.invoke(
        main,
        ["audit", str(root / "data" / "images"), "--model", str(root / "model"),
         "--classes", "hexagon", "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert wrong.exit_code == 2 and "not a class of the model" in wrong.output


def test_clean_trained_model_has_no_confirmed_flag(clean):
    root, _ = clean
    result = audit(
        root / "model", root / "data" / "images", root / "audit",
        settings=AuditSettings(confirm_images=60),
    )  # fmt: skip
    assert not any(f["confirmed"] for f in result["flags"])
    assert result["summary"][0].startswith("No confirmed shortcut")
    assert "No confirmed shortcut" in (root / "audit" / "report.html").read_text()


def test_ray_engine_gives_the_same_audit(tagged):
    pytest.importorskip("ray")
    import ray

    root, _ = tagged
    kwargs = {"report": False, "max_images": 90, "settings": AuditSettings(min_class_images=10)}
    local = audit(root / "model", root / "data" / "images", None, **kwargs)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        remote = audit(
            root / "model",
            root / "data" / "images",
            None,
            options=RunOptions(engine="ray", workers=1),
            **kwargs,
        )
    finally:
        ray.shutdown()
    for result in (local, remote):
        result.pop("seconds")
    assert json.dumps(remote, sort_keys=True) == json.dumps(local, sort_keys=True)
