"""``camlens.evaluate`` on a detector (``camlens.tasks.evaluate_dense``): hand-computed values
on a fake detector whose Grad-CAM maps are known exactly.

The fake detector: features ``F = relu(conv1x1(x))`` whose channel 0 is the (normalised) red
channel and channel 1 the green one; it always returns the same detections ``j`` (fixed box
``b_j``, class ``l_j``) with score ``s_j = mean of F[c_j] inside b_j``. So
``d s_j / d F[c_j] = 1 / |b_j|`` inside the box: Grad-CAM's weight of channel ``c_j`` is
``1 / (H W)``, the other's 0, and the map of detection ``j`` is ``F[c_j]`` (normalised): the
indicator of the coloured square of the images below. On an image with a red square on
detection 0's box and a green one on detection 1's, ``s_j = v_j``, the normalised colour value
(``(1 - mean) / std``) of the square's channel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import camlens
from camlens import ConfigError
from camlens.api import evaluate
from camlens.cli import main
from camlens.dense import explain_dense
from camlens.metrics.faithfulness import auc, insertion_curve
from camlens.metrics.localization import energy_pointing_game, pointing_game
from camlens.models.dense import DetectionScores
from camlens.pipeline import RunOptions
from camlens.tasks.evaluate_dense import (
    DETECTION_METRICS,
    dense_methods,
    detection_metrics,
    match_detections,
)

LABELS = ["background", "a", "b"]
RED_BOX = (4, 4, 12, 12)  # detection 0: class "a", red channel
GREEN_BOX = (20, 20, 28, 28)  # detection 1: class "b", green channel
STEPS = 16  # 32 x 32 = 1024 pixels: each step removes 64 pixels, one whole 8 x 8 square
QUIET = RunOptions(progress=False, batch_size=2)


class FakeDetector(nn.Module):
    """Fixed boxes and classes; score j = mean of feature channel ``channels[j]`` in box j."""

    def __init__(self, boxes, labels, channels) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0] = 1.0
            conv.weight[1, 1] = 1.0
        self.backbone = nn.Sequential(conv, nn.ReLU())
        self.register_buffer("boxes", torch.tensor(boxes, dtype=torch.float32))
        self.classes = list(labels)
        self.channels = list(channels)

    def forward(self, images):
        features = self.backbone(torch.stack(list(images)))
        outputs = []
        for row in features:
            scores = [
                row[c, y0:y1, x0:x1].mean()
                for (x0, y0, x1, y1), c in zip(
                    self.boxes.long().tolist(), self.channels, strict=True
                )
            ]
            outputs.append(
                {
                    "boxes": self.boxes.clone(),
                    "labels": torch.tensor(self.classes),
                    "scores": torch.stack(scores),
                }
            )
        return outputs


def fake_model():
    module = FakeDetector([RED_BOX, GREEN_BOX], [1, 2], [0, 1])
    return camlens.load_model(module, labels=LABELS, input_size=32)


def squares_image(path=None) -> Image.Image:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    x0, y0, x1, y1 = RED_BOX
    pixels[y0:y1, x0:x1, 0] = 255
    x0, y0, x1, y1 = GREEN_BOX
    pixels[y0:y1, x0:x1, 1] = 255
    image = Image.fromarray(pixels)
    if path is not None:
        image.save(path)
    return image


def square_values(model) -> tuple[float, float]:
    """v_0, v_1: the detections' scores on the squares image (the normalised colours)."""
    x = model.preprocess(squares_image())
    return float(x[0, 0, 5, 5]), float(x[0, 1, 21, 21])


def write_csv(path, rows) -> None:
    lines = ["image,x0,y0,x1,y1,label"]
    lines += [f"{name},{','.join(str(v) for v in box)},{label}" for name, box, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


#: a.png: both detections on their boxes and classes, one "a" box missed.
#: b.png: the classes swapped: nothing matches, both boxes missed.
#: c.png: an "a" box shifted 2 px right: IoU 48 / 80 = 0.6 (matched), 48 of the map's 64
#: pixels inside (energy 0.75), the peak (4.5, 4.5) 1.5 px left of it (pointing game 0 at
#: tolerance 0).
ROWS = [
    ("a.png", RED_BOX, "a"),
    ("a.png", GREEN_BOX, "b"),
    ("a.png", (24, 0, 32, 8), "a"),
    ("b.png", RED_BOX, "b"),
    ("b.png", GREEN_BOX, "a"),
    ("c.png", (6, 4, 14, 12), "A"),
]


@pytest.fixture
def annotated(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        squares_image(tmp_path / name)
    csv = tmp_path / "boxes.csv"
    write_csv(csv, ROWS)
    return csv


def test_the_fake_detectors_maps_are_its_squares():
    model = fake_model()
    x = model.preprocess(squares_image())
    result = explain_dense(model, x, task="detection")
    v0, v1 = square_values(model)
    assert [o["label"] for o in result.objects] == ["a", "b"]
    assert [o["score"] for o in result.objects] == pytest.approx([v0, v1], abs=1e-5)
    for k, (x0, y0, x1, y1) in enumerate([RED_BOX, GREEN_BOX]):
        expected = np.zeros((32, 32), dtype=np.float32)
        expected[y0:y1, x0:x1] = 1.0
        heat = result.heatmap(0, k, original=True)
        np.testing.assert_allclose(heat, expected, atol=1e-6)
        # A map that is a box's indicator: peak and all its energy in that box, none in the
        # other (disjoint) box.
        other = GREEN_BOX if k == 0 else RED_BOX
        own = RED_BOX if k == 0 else GREEN_BOX
        assert pointing_game(heat, [own], tolerance=0) is True
        assert energy_pointing_game(heat, [own]) == 1.0
        assert pointing_game(heat, [other], tolerance=0) is False
        assert energy_pointing_game(heat, [other]) == 0.0


def test_matching_is_greedy_by_score_within_a_class():
    gt = [(0, 0, 10, 10), (20, 0, 30, 10)]
    # Two detections on the first box: the higher score takes it, the other is unmatched
    # (a duplicate); a third of the other class does not match the second box (class 2).
    boxes = [(0, 0, 10, 10), (1, 0, 10, 10), (20, 0, 30, 10)]
    matches = match_detections(boxes, [1, 1, 1], [0.6, 0.9, 0.8], gt, [1, 2])
    assert matches[1] == (0, pytest.approx(0.9))  # IoU 90 / 100
    assert matches[0] == (None, 0.0)  # its box is taken; no other "1" box
    assert matches[2] == (None, 0.0)
    # IoU below 0.5: unmatched, with the IoU it had.
    assert match_detections([(0, 0, 10, 10)], [1], [0.9], [(6, 0, 16, 10)], [1]) == [
        (None, pytest.approx(40 / 160))
    ]
    # An unlabelled box (None) matches any class.
    assert match_detections([(0, 0, 10, 10)], [2], [0.9], [(0, 0, 10, 10)], [None]) == [(0, 1.0)]


def test_detection_evaluation_by_hand(annotated):
    model = fake_model()
    v0, v1 = square_values(model)
    result = evaluate(
        model,
        annotated,
        steps=STEPS,
        tolerance=0,
        deletion_baseline="zero",
        insertion_baseline="zero",
        options=QUIET,
    )
    assert result["task"] == "detection" and result["n_images"] == 3
    assert result["n_instances"] == 6 and result["n_failed"] == 0
    assert result["metrics"] == list(DETECTION_METRICS)
    assert list(result["methods"]) == ["gradcam"]  # the default method of a detector
    values = result["methods"]["gradcam"]
    assert {k: values[k] for k in ("n_detections", "n_matched", "n_unmatched", "n_missed")} == {
        "n_detections": 6,
        "n_matched": 3,
        "n_unmatched": 3,
        "n_missed": 3,
    }
    assert values["n_gt"] == 6 and values["recall"] == 0.5
    assert values["pointing_game"] == pytest.approx(2 / 3)
    assert values["energy_pointing_game"] == pytest.approx((1 + 1 + 0.75) / 3)
    # Deletion, zero baseline: step 1 removes the whole square: [v, 0, ..., 0], area v / 32.
    assert values["deletion_auc"] == pytest.approx((v0 + v1 + v0) / 3 / (2 * STEPS), rel=1e-6)
    # Insertion from zeros: [0, v, ..., v], area v * 15.5 / 16.
    insertion = (v0 + v1 + v0) / 3 * (STEPS - 0.5) / STEPS
    assert values["insertion_auc"] == pytest.approx(insertion, rel=1e-6)
    assert result["curves"]["gradcam"]["deletion"][0] == pytest.approx((2 * v0 + v1) / 3, rel=1e-6)
    rows = result["per_image"]["gradcam"]
    assert [(r["name"], r["label"], r["iou"]) for r in rows] == [
        ("a.png", "a", 1.0),
        ("a.png", "b", 1.0),
        ("c.png", "a", 0.6),
    ]
    assert [r["pointing_game"] for r in rows] == [True, True, False]
    assert result["settings"]["match_iou"] == 0.5 and result["settings"]["steps"] == STEPS


def test_records_per_detection(annotated, tmp_path):
    out = tmp_path / "out"
    result = evaluate(
        fake_model(), annotated, steps=4, metrics="localization", out_dir=out, options=QUIET
    )
    assert result["metrics"] == ["pointing_game", "energy_pointing_game"]
    assert (out / "metrics.json").is_file() and not (out / "report.html").exists()
    assert json.loads((out / "metrics.json").read_text()) == result
    records = [json.loads(line) for line in (out / "evaluation.jsonl").read_text().splitlines()]
    assert [r["image"].rsplit("/", 1)[-1] for r in records] == ["a.png", "b.png", "c.png"]
    first = records[0]["methods"]["gradcam"]
    assert [d["gt"] for d in first["detections"]] == [0, 1]
    assert first["detections"][0]["gt_box"] == list(RED_BOX)
    assert first["missed"] == [{"gt": 2, "label": "a", "box": [24.0, 0.0, 32.0, 8.0]}]
    swapped = records[1]["methods"]["gradcam"]
    assert [d["gt"] for d in swapped["detections"]] == [None, None]
    assert "pointing_game" not in swapped["detections"][0]
    assert [m["gt"] for m in swapped["missed"]] == [0, 1]
    assert "deletion_auc" not in first["detections"][0]  # not asked for


def test_insertion_equals_the_faithfulness_metric_on_the_detection_score(annotated):
    """Blur insertion (the default baseline): the same numbers as calling the metric on
    ``DetectionScores`` directly."""
    model = fake_model()
    result = evaluate(model, annotated, steps=8, metrics="insertion", options=QUIET)
    x = model.preprocess(squares_image())
    explanation = explain_dense(model, x, task="detection")
    scores = DetectionScores(
        model.module, torch.tensor([RED_BOX, GREEN_BOX], dtype=torch.float32), [1, 2]
    )
    curve = insertion_curve(
        scores, x.expand(2, -1, -1, -1), explanation.maps[0], [0, 1], steps=8, score="logit"
    )
    areas = auc(curve)
    expected = (areas[0] + areas[1] + areas[0]) / 3  # a.png's two detections, c.png's first
    assert result["methods"]["gradcam"]["insertion_auc"] == pytest.approx(expected, rel=1e-6)


def test_detector_refusals(annotated):
    model = fake_model()
    with pytest.raises(ConfigError, match="cam needs a classifier"):
        evaluate(model, annotated, methods="cam,gradcam", options=QUIET)
    with pytest.raises(ConfigError, match="do not apply to a detector"):
        evaluate(model, annotated, metrics="maxboxacc", options=QUIET)
    with pytest.raises(ConfigError, match="none of the metrics"):
        detection_metrics("road")
    assert detection_metrics("faithfulness") == ["deletion_auc", "insertion_auc"]
    assert dense_methods(None) == [("gradcam", {})]
    with pytest.raises(ConfigError, match="takes the option"):
        dense_methods("gradcam", {"max_channels": 4})


def test_cli_evaluates_a_detector(annotated, tmp_path, monkeypatch):
    model = fake_model()
    monkeypatch.setattr(camlens.cli.common.ModelChoice, "load", lambda self, device: model)
    out = tmp_path / "cli"
    args = ["evaluate", str(annotated), "--out", str(out), "--steps", "4", "--tolerance", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["task"] == "detection" and list(summary["methods"]) == ["gradcam"]
    assert summary["methods"]["gradcam"]["n_matched"] == 3
    assert summary["methods"]["gradcam"]["pointing_game"] == pytest.approx(2 / 3)
    refused = CliRunner().invoke(main, [*args[:3], str(tmp_path / "x"), "--method", "cam"])
    assert refused.exit_code == 2 and "cam needs a classifier" in refused.output
