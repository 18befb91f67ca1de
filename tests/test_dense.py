"""Detectors and segmenters: targets, hand-computed maps, D-RISE, task detection, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import camlens
from camlens.cli import main
from camlens.dense import explain_dense
from camlens.errors import ConfigError
from camlens.methods import DRISE, ScoreCAM
from camlens.models import Classifier
from camlens.models.dense import (
    DetectionScores,
    RegionScores,
    default_dense_layers,
    dense_checkpoint_classes,
    detect_task,
)

# --- a tiny segmenter with known features: A = x (identity 1x1 conv), logits = W A + b ------

W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, -1.0]])  # 3 classes x 2 channels
B = torch.tensor([0.0, 0.0, 0.25])


def tiny_segmenter() -> nn.Sequential:
    features = nn.Conv2d(2, 2, 1, bias=False)
    head = nn.Conv2d(2, 3, 1)
    with torch.no_grad():
        features.weight.copy_(torch.eye(2)[:, :, None, None])
        head.weight.copy_(W[:, :, None, None])
        head.bias.copy_(B)
    return nn.Sequential(features, head).eval()


X = torch.tensor(
    [
        [[2.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
        [[0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
    ]
)[None]  # (1, 2, 4, 4): channel 0 top-left block and bottom-right corner, channel 1 top-right


def _predicted() -> np.ndarray:
    """argmax_c (W A + b)_c per pixel, by hand: class 0 where channel 0 wins, 1 where channel 1
    wins, 2 (0.25 + 0.5 a0 - a1) where both are 0."""
    return np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 0], [2, 2, 0, 0]])


def test_segmentation_regions_and_scores_by_hand():
    model = Classifier(tiny_segmenter(), ["background", "left", "other"])
    result = explain_dense(model, X, task="segmentation", method="gradcam", layer="0")
    predicted = _predicted()
    # background (class 0) is not explained by default; classes 1 and 2 are
    assert [o["class"] for o in result.objects] == [1, 2]
    for o, c in zip(result.objects, (1, 2), strict=True):
        region = predicted == c
        assert o["pixels"] == int(region.sum())
        logits = np.einsum("kc,chw->khw", W.numpy(), X[0].numpy()) + B.numpy()[:, None, None]
        assert o["score"] == pytest.approx(float(logits[c][region].sum()), abs=1e-5)
        np.testing.assert_array_equal(result.regions[[1, 2].index(c)], region)
    # Grad-CAM: d s / d A_k = W_ck on the region, so alpha_k = W_ck |R| / 16 and
    # M = |R| / 16 * sum_k W_ck A_k (raw, before ReLU)
    for k, c in enumerate((1, 2)):
        area = int((predicted == c).sum())
        expected = area / 16 * np.einsum("k,khw->hw", W[c].numpy(), X[0].numpy())
        np.testing.assert_allclose(result.raw[0, k].numpy(), expected, atol=1e-6)


def test_segmentation_region_mask_and_classes():
    model = Classifier(tiny_segmenter(), ["background", "left", "other"])
    mask = np.zeros((4, 4), bool)
    mask[:2, :] = True  # the top half: classes 0 and 1 predicted there
    result = explain_dense(
        model, X, task="segmentation", layer="0", region=mask, classes=["other", 0]
    )
    assert [o["class"] for o in result.objects] == [2, 0]
    assert all(o["region"] == "mask" and o["pixels"] == 8 for o in result.objects)
    for k, c in enumerate((2, 0)):
        expected = 8 / 16 * np.einsum("k,khw->hw", W[c].numpy(), X[0].numpy())
        np.testing.assert_allclose(result.raw[0, k].numpy(), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="not one of the model's classes"):
        explain_dense(model, X, task="segmentation", layer="0", classes=["cat"])


def test_region_scores_scorecam_by_hand():
    """Score-CAM on a region target weighs channel k by the region score of x * H_k (no
    softmax over the targets): H_k = min-max normalised A_k."""
    region = torch.from_numpy(_predicted() == 1)[None]
    scores = RegionScores(tiny_segmenter(), [1], region)
    raw = ScoreCAM(scores, layer="model.0")(X, torch.tensor([[0]]))
    weights = []
    for k in range(2):
        a = X[0, k]
        mask = (a - a.min()) / (a.max() - a.min())
        masked = X[0] * mask
        logits = np.einsum("kc,chw->khw", W.numpy(), masked.numpy()) + B.numpy()[:, None, None]
        weights.append(float(logits[1][region[0].numpy()].sum()))
    expected = weights[0] * X[0, 0].numpy() + weights[1] * X[0, 1].numpy()
    np.testing.assert_allclose(raw[0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cam_and_aug_smooth_are_refused():
    model = Classifier(tiny_segmenter(), ["background", "left", "other"])
    with pytest.raises(ConfigError, match="use --method gradcam"):
        explain_dense(model, X, task="segmentation", method="cam")
    with pytest.raises(ConfigError, match="finercam cannot explain a detection"):
        explain_dense(model, X, task="segmentation", method="finercam")
    with pytest.raises(ConfigError, match="aug_smooth flips"):
        explain_dense(model, X, task="segmentation", method_options={"aug_smooth": True})


def test_default_layer_of_a_plain_segmenter_is_before_the_classifying_conv():
    model = Classifier(tiny_segmenter(), ["background", "left", "other"])
    assert explain_dense(model, X, task="segmentation").layer == "0"


# --- a tiny detector with hand-computable scores ---------------------------------------------


class FakeDetector(nn.Module):
    """Fixed boxes; detection j's score is the mean of feature channel ``c_j - 1`` inside its
    box (features: an identity 1x1 conv), so d s_j / d A = 1/|B_j| on B_j, channel c_j - 1."""

    def __init__(self, boxes: list[list[int]], labels: list[int]) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(2)[:, :, None, None])
        self.fixed_boxes = boxes
        self.fixed_labels = labels

    def forward(self, images):
        a = self.features(torch.stack(list(images)))
        outputs = []
        for n in range(len(a)):
            scores = torch.stack(
                [
                    a[n, c - 1, y0:y1, x0:x1].mean()
                    for (x0, y0, x1, y1), c in zip(self.fixed_boxes, self.fixed_labels, strict=True)
                ]
            )
            outputs.append(
                {
                    "boxes": torch.tensor(self.fixed_boxes, dtype=torch.float32),
                    "labels": torch.tensor(self.fixed_labels),
                    "scores": scores,
                }
            )
        return outputs


DETECTOR_X = torch.zeros(1, 2, 8, 8)
DETECTOR_X[0, 0, 1:4, 1:4] = 0.9  # object of class 1, top-left
DETECTOR_X[0, 1, 4:8, 4:8] = 0.8  # object of class 2, bottom-right


def test_detection_gradcam_by_hand_and_class_discriminative():
    detector = FakeDetector([[1, 1, 4, 4], [4, 4, 8, 8]], [1, 2])
    model = Classifier(detector, ["background", "a", "b"], info={"task": "detection"})
    assert default_dense_layers(detector, "detection") == []
    result = explain_dense(model, DETECTOR_X, layer="features", score_threshold=0.5)
    assert [(o["label"], o["score"], o["box"]) for o in result.objects] == [
        ("a", 0.9, [1.0, 1.0, 4.0, 4.0]),
        ("b", 0.8, [4.0, 4.0, 8.0, 8.0]),
    ]
    # alpha = 1/|B| * |B| / 64 on the detection's channel, 0 on the other: M = A_c / 64
    for k in range(2):
        np.testing.assert_allclose(result.raw[0, k].numpy(), DETECTOR_X[0, k].numpy() / 64)
    peaks = [np.unravel_index(int(result.maps[0, k].argmax()), (8, 8)) for k in range(2)]
    assert [(int(r), int(c)) for r, c in peaks] == [(1, 1), (4, 4)]


def test_detection_scores_match_by_iou_and_class():
    class Fixed(nn.Module):
        def forward(self, images):
            return [
                {
                    "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0]]),
                    "labels": torch.tensor([1, 2]),
                    "scores": torch.tensor([0.9, 0.7]),
                }
                for _ in images
            ]

    boxes = torch.tensor([[0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 8.0], [50.0, 50, 60, 60]])
    x = torch.zeros(2, 3, 4, 4)
    plain = DetectionScores(Fixed(), boxes, [1, 2, 1])(x)
    # target 0: class 1, IoU 0.8 -> 0.9; target 1: class 2, IoU 0.75 -> 0.7; target 2: none
    torch.testing.assert_close(plain, torch.tensor([[0.9, 0.7, 0.0]] * 2))
    with_iou = DetectionScores(Fixed(), boxes, [1, 2, 1], mode="score+iou")(x)
    torch.testing.assert_close(with_iou, torch.tensor([[1.7, 1.45, 0.0]] * 2))
    strict = DetectionScores(Fixed(), boxes, [1, 2, 1], iou_threshold=0.78)(x)
    torch.testing.assert_close(strict, torch.tensor([[0.9, 0.0, 0.0]] * 2))
    drise = DetectionScores(Fixed(), boxes, [1, 2, 1], mode="drise")(x)
    torch.testing.assert_close(drise, torch.tensor([[0.72, 0.525, 0.0]] * 2))


def test_drise_is_the_mask_average_weighted_by_scores():
    """For a linear score f(x m) = sum_p w_p x_p m_p, the map is sum_i f(x m_i) m_i / (n p)."""
    weight = torch.rand(1, 6, 6)

    class Linear(nn.Module):
        outputs_are_scores = True

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            self.conv(x)  # a layer for the base class to capture; unused by D-RISE
            return (x * weight).sum(dim=(1, 2, 3))[:, None]

    x = torch.rand(1, 1, 6, 6)
    method = DRISE(Linear(), layer="conv", n_masks=40, grid=3, probability=0.5, batch_size=7)
    raw = method(x, torch.tensor([[0]]))
    masks = method.masks(0, 40, (6, 6))[:, 0]
    scores = (x[0, 0] * weight[0] * masks).sum(dim=(1, 2))
    expected = (scores[:, None, None] * masks).sum(0) / (40 * 0.5)
    torch.testing.assert_close(raw[0, 0], expected, rtol=1e-5, atol=1e-6)
    # seeded: the same masks every call; cells kept with probability p; values in [0, 1]
    torch.testing.assert_close(method.masks(5, 3, (6, 6)), method.masks(0, 40, (6, 6))[5:8])
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    many = DRISE(Linear(), layer="conv", n_masks=2000, grid=4).masks(0, 2000, (16, 16))
    assert float(many.mean()) == pytest.approx(0.5, abs=0.02)


# --- torchvision models: task, layers, classes, loading ------------------------------------


def test_tasks_layers_and_classes_of_torchvision_models(tmp_path):
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4
    )
    segmenter = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )
    x = torch.rand(1, 3, 64, 64)
    assert detect_task(detector, x) == "detection"
    assert detect_task(segmenter, x) == "segmentation"
    assert detect_task(torchvision.models.resnet18(), x) == "classification"
    assert default_dense_layers(detector, "detection") == [
        "backbone.fpn.layer_blocks.0",
        "backbone.fpn.layer_blocks.1",
    ]
    assert default_dense_layers(segmenter, "segmentation") == ["backbone.16"]
    probe = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None
    )
    assert dense_checkpoint_classes(detector.state_dict(), probe, "detection") == 4
    save_file(detector.state_dict(), tmp_path / "det.safetensors")
    (tmp_path / "labels.txt").write_text("background\na\nb\nc\n")
    loaded = camlens.load_model(
        "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
        weights=tmp_path / "det.safetensors",
        labels=tmp_path / "labels.txt",
    )
    assert loaded.info == {
        "task": "detection",
        "num_classes": 4,
        "weights": str(tmp_path / "det.safetensors"),
    }
    assert loaded.labels == ["background", "a", "b", "c"]
    assert loaded.input_size == (320, 320) and loaded.mean == (0.0, 0.0, 0.0)
    assert torch.equal(
        loaded.module.roi_heads.box_predictor.cls_score.weight,
        detector.roi_heads.box_predictor.cls_score.weight,
    )


def test_fpn_levels_are_summed_and_padding_cropped():
    """A 320 x 240 image: the detector resizes it to 427 x 320 and pads to 448 x 320, so the
    finest level's 14 x 10 grid shows the image on 14 x 10 * (427 / 448) columns: 14 kept of
    14 (ceil(13.3)); the maps of both levels are resized to it and summed."""
    torch.manual_seed(0)
    model = camlens.load_model(
        "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", random_weights=True, num_classes=3
    )
    model.module.roi_heads.detections_per_img = 2
    x = torch.rand(1, 3, 240, 320)
    both = explain_dense(model, x, method="gradcam", score_threshold=0.0)
    assert both.layer == "backbone.fpn.layer_blocks.0,backbone.fpn.layer_blocks.1"
    parts = [
        explain_dense(model, x, method="gradcam", score_threshold=0.0, layer=name)
        for name in both.layer.split(",")
    ]
    grid = both.raw.shape[-2:]
    resized = [
        torch.nn.functional.interpolate(p.raw, size=grid, mode="bilinear", align_corners=False)
        if p.raw.shape[-2:] != grid
        else p.raw
        for p in parts
    ]
    torch.testing.assert_close(both.raw, resized[0] + resized[1])
    assert tuple(parts[0].raw.shape[-2:]) == (10, 14)


# --- the command line -----------------------------------------------------------------------


def test_cli_explains_a_segmenter(tmp_path):
    torch.manual_seed(0)
    segmenter = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )
    save_file(segmenter.state_dict(), tmp_path / "seg.safetensors")
    (tmp_path / "labels.txt").write_text("background\nleft\nright\n")
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    args = [
        "explain",
        str(image),
        "--model",
        "torchvision:lraspp_mobilenet_v3_large",
        "--weights",
        str(tmp_path / "seg.safetensors"),
        "--labels",
        str(tmp_path / "labels.txt"),
        "--classes",
        "left,right",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert record["task"] == "segmentation" and record["method"] == "gradcam"
    assert [s["label"] for s in record["segments"]] == ["left", "right"]
    model = camlens.load_model(
        "torchvision:lraspp_mobilenet_v3_large",
        weights=tmp_path / "seg.safetensors",
        labels=tmp_path / "labels.txt",
    )
    with torch.no_grad():
        predicted = model.module(model.preprocess(image))["out"].argmax(1)[0]
    for segment in record["segments"]:
        assert segment["pixels"] == int((predicted == segment["class"]).sum())
        assert (out / segment["overlay"]).is_file()
        assert Image.open(out / segment["overlay"]).size == (64, 48)
    raw = np.load(out / record["raw"])
    assert raw["classes"].tolist() == [1, 2] and raw["raw"].shape[0] == 2
    assert "left" in (out / "index.html").read_text()
    # a resume with other settings is refused, as for every job
    again = CliRunner().invoke(main, [*args, "--classes", "left", "--resume"])
    assert again.exit_code == 2 and "settings" in again.output


def test_cli_task_option_and_cam_refusal(tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (90, 120, 30)).save(image)
    args = [
        "explain",
        str(image),
        "--model",
        "torchvision:lraspp_mobilenet_v3_large",
        "--random-weights",
        "--method",
        "cam",
        "--out",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "use --method gradcam" in result.output


def test_hirescam_on_a_region_is_the_region_times_the_class_map():
    """HiResCAM: sum_k (d s / d A_k) * A_k = [R] * sum_k W_ck A_k (element-wise, no mean)."""
    model = Classifier(tiny_segmenter(), ["background", "left", "other"])
    result = explain_dense(model, X, task="segmentation", method="hirescam", layer="0")
    for k, c in enumerate((1, 2)):
        region = _predicted() == c
        expected = region * np.einsum("k,khw->hw", W[c].numpy(), X[0].numpy())
        np.testing.assert_allclose(result.raw[0, k].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    "method",
    [
        name
        for name, cls in camlens.METHODS.items()
        if not cls.compares_classes and name not in ("cam", "rollout", "gradrollout", "random")
    ],
)
def test_every_map_method_explains_region_targets(method):
    """Every method runs on the segmentation targets through the one wrapper, and a target's
    map does not depend on the other targets explained beside it."""
    model = Classifier(tiny_segmenter(), ["background", "left", "other"])
    options = {"n_masks": 24} if method == "drise" else {}
    both = explain_dense(
        model, X, task="segmentation", method=method, layer="0", method_options=options
    )
    alone = explain_dense(
        model,
        X,
        task="segmentation",
        method=method,
        layer="0",
        method_options=options,
        classes=["other"],
    )
    assert both.raw.shape[:2] == (1, 2) and torch.isfinite(both.raw).all()
    torch.testing.assert_close(both.raw[:, 1:], alone.raw, rtol=1e-4, atol=1e-6)


def test_explain_points_a_segmenter_to_explain_dense():
    model = camlens.load_model(
        "torchvision:lraspp_mobilenet_v3_large", random_weights=True, num_classes=3
    )
    with pytest.raises(ConfigError, match=r"segmentation model: .*camlens.explain_dense"):
        camlens.explain(model, torch.rand(1, 3, 32, 32), method="gradcam")


def test_ray_engine_explains_a_segmenter_as_the_local_engine(tmp_path):
    """The dense task on Ray actors (the Classifier pickled to them) writes the same records
    and raw maps as the local engine."""
    import ray

    from camlens.api.explaining import run_explain
    from camlens.pipeline import RunOptions

    rng = np.random.default_rng(1)
    inputs = []
    for i in range(4):
        path = tmp_path / "in" / f"image_{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), np.uint8)).save(path)
        inputs.append(path)
    torch.manual_seed(0)
    segmenter = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    model = Classifier(segmenter.eval(), ["background", "a", "b"], input_size=(24, 24))
    run_explain(model, inputs, tmp_path / "local", options=RunOptions(batch_size=2, progress=False))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        options = RunOptions(batch_size=2, engine="ray", workers=2, progress=False)
        run_explain(model, inputs, tmp_path / "ray", options=options)
    finally:
        ray.shutdown()
    records = [
        [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        for name in ("local", "ray")
    ]
    assert records[0] == records[1] and all(r["task"] == "segmentation" for r in records[0])
    assert any(r["segments"] for r in records[0])
    for record in records[0]:
        local, remote = (tmp_path / name / record["raw"] for name in ("local", "ray"))
        with np.load(local) as a, np.load(remote) as b:
            np.testing.assert_allclose(a["raw"], b["raw"], rtol=1e-5, atol=1e-6)


def test_a_classifier_forced_to_the_detection_task_is_refused_clearly(tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (90, 120, 30)).save(image)
    args = ["explain", str(image), "--task", "detection", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "cannot be explained as a detector" in result.output
    assert "Traceback" not in result.output
