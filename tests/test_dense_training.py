"""examples/dense_training.py: loaders, saved models and quality measures on tiny data."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from camlens.data.shapes import ShapesConfig, make_shapes_dataset

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dense_training.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("dense_training_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


dense = _load_example()

CLASSES = ("circle", "square", "triangle")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these models are tiny, and several threads of two busy processes on
    a small machine spin for most of their time (measured: 2 training steps took 45 s instead
    of 1.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dense") / "shapes"
    config = ShapesConfig(n=6, size=64, classes=CLASSES, per_image=2, seed=3)
    make_shapes_dataset(folder, config, overwrite=True)
    return folder


def _csv_rows(folder: Path) -> list[dict]:
    with (folder / "annotations.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_detection_loader_gives_the_csv_boxes_and_labels(tiny):
    samples = dense.load_shapes_detection(tiny)
    info = json.loads((tiny / "dataset.json").read_text())
    assert len(samples) == 6 and info["classes"] == list(CLASSES)
    rows = _csv_rows(tiny)
    for record, (image, target) in zip(info["images"], samples, strict=True):
        mine = [r for r in rows if r["image"] == record["image"]]
        expected = torch.tensor([[float(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in mine])
        assert torch.equal(target["boxes"], expected) and target["boxes"].dtype == torch.float32
        labels = [CLASSES.index(r["label"]) + 1 for r in mine]
        assert target["labels"].tolist() == labels and target["labels"].dtype == torch.int64
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        with Image.open(tiny / record["image"]) as png:
            pixels = np.array(png.convert("RGB"))
        assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert sum(len(t["labels"]) for _, t in samples) == len(rows) == 12


def test_segmentation_loader_gives_the_mask_files(tiny):
    images, masks = dense.load_shapes_segmentation(tiny)
    assert images.shape == (6, 3, 64, 64) and masks.shape == (6, 64, 64)
    assert masks.dtype == torch.int64 and images.min() >= 0.0 and images.max() <= 1.0
    info = json.loads((tiny / "dataset.json").read_text())
    for k, record in enumerate(info["images"]):
        expected = np.zeros((64, 64), dtype=np.int64)
        for obj in record["objects"]:
            with Image.open(tiny / obj["mask"]) as m:
                expected[np.asarray(m) == 255] = CLASSES.index(obj["label"]) + 1
        assert np.array_equal(masks[k].numpy(), expected)
        assert set(np.unique(expected)) == {0, *(CLASSES.index(c) + 1 for c in record["labels"])}


class _Truth(nn.Module):
    """A fake detector returning the ground truth (or nothing, or a wrong class)."""

    def __init__(self, samples, mode="truth"):
        super().__init__()
        self.answers = [t for _, t in samples]
        self.mode = mode
        self.calls = 0

    def forward(self, images):
        out = []
        for _ in images:
            target = self.answers[self.calls]
            self.calls += 1
            boxes, labels = target["boxes"], target["labels"]
            if self.mode == "nothing":
                boxes, labels = boxes[:0], labels[:0]
            if self.mode == "wrong-class":
                labels = labels % 3 + 1
            if self.mode == "shifted":  # half the width off: IoU 1/3 for every box
                width = boxes[:, 2] - boxes[:, 0]
                boxes = boxes + torch.stack([width / 2, 0 * width, width / 2, 0 * width], 1)
            out.append({"boxes": boxes, "labels": labels, "scores": torch.ones(len(labels))})
        return out


def test_detection_quality_of_the_truth_and_of_nothing(tiny):
    samples = dense.load_shapes_detection(tiny)
    truth = dense.detection_quality(_Truth(samples), tiny)
    assert truth["objects"] == truth["detections"] == 12
    assert truth["recall"] == truth["precision"] == 1.0
    assert truth["mean_iou"] == pytest.approx(1.0)
    nothing = dense.detection_quality(_Truth(samples, "nothing"), tiny)
    assert nothing["recall"] == 0.0 and nothing["detections"] == 0 and nothing["mean_iou"] == 0
    wrong = dense.detection_quality(_Truth(samples, "wrong-class"), tiny)
    assert wrong["recall"] == wrong["precision"] == 0.0
    shifted = dense.detection_quality(_Truth(samples, "shifted"), tiny)
    assert shifted["recall"] == 0.0 and shifted["detections"] == 12
    assert dense.detection_quality(_Truth(samples, "shifted"), tiny, iou_threshold=0.3)[
        "mean_iou"
    ] == pytest.approx(1 / 3)


class _Segments(nn.Module):
    """A fake segmenter returning one-hot logits of given masks."""

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        self.masks = masks
        self.calls = 0

    def forward(self, x):
        masks = self.masks[self.calls : self.calls + len(x)]
        self.calls += len(x)
        return {"out": nn.functional.one_hot(masks, 4).permute(0, 3, 1, 2).float()}


def test_segmentation_quality_hand_checked(tiny):
    _, masks = dense.load_shapes_segmentation(tiny)
    perfect = dense.segmentation_quality(_Segments(masks), tiny)
    assert perfect["pixel_accuracy"] == 1.0 and perfect["mean_iou"] == 1.0
    assert perfect["iou"] == dict.fromkeys(("background", *CLASSES), 1.0)
    empty = dense.segmentation_quality(_Segments(torch.zeros_like(masks)), tiny)
    foreground = float((masks > 0).float().mean())
    assert empty["pixel_accuracy"] == pytest.approx(1 - foreground)
    assert empty["iou"]["background"] == pytest.approx(1 - foreground)
    assert empty["mean_iou"] == 0.0 and empty["iou"]["circle"] == 0.0


def _reload(builder: str, kwargs: dict, path: Path) -> nn.Module:
    model = torchvision.models.get_model(builder, **kwargs)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def test_saved_models_reload_into_the_rebuilt_builders(tiny, tmp_path):
    torch.manual_seed(0)
    rebuild = {"weights": None, "weights_backbone": None, "num_classes": 4}
    images, _ = dense.load_shapes_segmentation(tiny)

    segmenter = dense.build_segmenter(4)
    segmenter.train()
    segmenter(dense.normalise(images))  # move the batch-norm running statistics off 0 / 1
    segmenter.eval()
    dense.save_state_dict(segmenter, tmp_path / "segmenter.safetensors")
    again = _reload(
        dense.SEGMENTER_BUILDER,
        {**rebuild, **dense.SEGMENTER_KWARGS},
        tmp_path / "segmenter.safetensors",
    )
    with torch.no_grad():
        x = dense.normalise(images[:2])
        assert torch.equal(segmenter(x)["out"], again(x)["out"])

    detector = dense.build_detector(4).eval()
    dense.save_state_dict(detector, tmp_path / "detector.safetensors")
    again = _reload(
        dense.DETECTOR_BUILDER,
        {**rebuild, **dense.DETECTOR_KWARGS},
        tmp_path / "detector.safetensors",
    )
    with torch.no_grad():
        first, second = detector(list(images[:2])), again(list(images[:2]))
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_few_training_steps_run_and_return_eval_models(tiny):
    segmenter = dense.train_segmenter(tiny, seconds=60.0, steps=2, seed=0, batch_size=2)
    assert not segmenter.training
    quality = dense.segmentation_quality(segmenter, tiny)
    assert 0.0 <= quality["mean_iou"] <= 1.0 and len(quality["iou"]) == 4
    detector = dense.train_detector(
        tiny, seconds=60.0, steps=1, seed=0, batch_size=2, backbone_from=segmenter
    )
    assert not detector.training
    quality = dense.detection_quality(detector, tiny)
    assert quality["objects"] == 12 and 0.0 <= quality["recall"] <= 1.0
    # The warm start: the detector's backbone started from the segmenter's (one step of
    # training moved it only a little; the random initialisation is far away).
    first = "0.0.weight"
    moved = detector.backbone.body.state_dict()[first] - segmenter.backbone.state_dict()[first]
    assert moved.abs().max() < 0.05


def test_batch_norm_recalibration_gives_the_batch_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.01))
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    dense.recalibrate_batch_norm(model, model, [x[:4], x[4:]])
    assert not model.training and model[1].momentum == 0.01
    y = model[0](x).detach()
    assert torch.allclose(model[1].running_mean, y.mean((0, 2, 3)), atol=1e-5)


def test_training_is_deterministic_given_seed_and_steps(tiny):
    first, second = (
        dense.train_segmenter(tiny, seconds=60.0, steps=2, seed=1, batch_size=2) for _ in "ab"
    )
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
