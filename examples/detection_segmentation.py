"""Explain a trained detector per detection and a trained segmenter per class region.

Trains (or reuses) the two small torchvision models of ``examples/dense_training.py`` on
camlens's multi-shape images (two shapes of different classes per image, boxes and masks as
ground truth), loads them as any user would (``camlens.load_model("torchvision:...",
weights=..., labels=..., input_size=...)``), and measures on the held-out images:

* segmentation: for every class present in an image, its Grad-CAM map (target: the class's
  logits summed over its predicted pixels) and the energy pointing game in the class's
  ground-truth mask (the map's mass inside the mask), beside the same measure for a
  uniform map (the mask's share of the image: what a map that knows nothing gets);
* detection: for every detection scoring >= 0.5, whether its Grad-CAM map (target: its score,
  matched by IoU on the differentiated pass; the feature pyramid's levels summed) peaks
  inside its own box, and for images with two detections of different classes how much the
  two maps share (Pearson correlation; class-discriminative maps correlate little), and the
  peak of one detection's map inside the other's box;
* the time per image of each method against one forward pass.

Each measure runs for a few (method, layer) pairs (``DETECTION_CONFIGS``,
``SEGMENTATION_CONFIGS``): the default (Grad-CAM on the default layers) and the element-wise
methods on finer layers, which localise small objects better.

It draws ``detection_maps.png`` and ``segmentation_maps.png`` into ``--out`` and prints (and
writes into ``--work``/summary.json) every number. The README's "Detection and segmentation"
section shows its pictures and numbers::

    python examples/detection_segmentation.py --out docs/images --work /tmp/dense
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import camlens
from camlens.dense import explain_dense
from camlens.render import save_figure, topk_figure

HERE = Path(__file__).resolve().parent
DETECTOR = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
SEGMENTER = "torchvision:lraspp_mobilenet_v3_large"
#: (method, layer) pairs measured; None: the default layers (a detector's pyramid levels, a
#: segmenter's last backbone stage). ``backbone.body.6`` is the detector backbone's last
#: stride-8 block (16 x 16 cells at 128 px, where the pyramid levels have 4 x 4).
DETECTION_CONFIGS = [
    ("gradcam", None),
    ("hirescam", None),
    ("gradcam", "backbone.body.6"),
    ("hirescam", "backbone.body.6"),
    ("gradcamelementwise", "backbone.body.6"),
]
SEGMENTATION_CONFIGS = [("gradcam", None), ("hirescam", None), ("gradcamelementwise", None)]
#: What the pictures show (the best of the measured pairs).
PICTURED = {
    "detection": ("gradcamelementwise", "backbone.body.6"),
    "segmentation": ("gradcamelementwise", None),
}

#: The methods timed per image (options that keep the perturbation methods to CPU minutes).
TIMED = {
    "gradcam": {},
    "gradcam++": {},
    "hirescam": {},
    "eigencam": {},
    "scorecam": {"max_channels": 32},
    "ablationcam": {"max_channels": 32},
    "drise": {"n_masks": 500},  # --masks
}


def _training_module():
    spec = importlib.util.spec_from_file_location("dense_training", HERE / "dense_training.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dense_training"] = module
    spec.loader.exec_module(module)
    return module


def load_models(work: Path, size: int) -> tuple[camlens.Classifier, camlens.Classifier]:
    """The trained detector and segmenter, loaded from their weights files by name."""
    common = {"labels": work / "labels.txt", "input_size": size}
    detector = camlens.load_model(DETECTOR, weights=work / "detector.safetensors", **common)
    segmenter = camlens.load_model(SEGMENTER, weights=work / "segmenter.safetensors", **common)
    return detector, segmenter


def test_images(work: Path) -> list[dict]:
    """The held-out images' records (``dataset.json``): image path, labels, objects."""
    return json.loads((work / "test" / "dataset.json").read_text())["images"]


def measure_segmentation(
    segmenter, work: Path, images: list[dict], limit: int, method: str, layer: str | None
) -> dict:
    """Energy pointing game of each present class's map in its ground-truth mask."""
    energies, baselines = [], []
    for record in images[:limit]:
        path = work / "test" / record["image"]
        x = segmenter.preprocess(path)
        for found in record["objects"]:
            mask = np.asarray(Image.open(work / "test" / found["mask"])) > 127
            result = explain_dense(
                segmenter,
                x,
                task="segmentation",
                classes=[found["label"]],
                method=method,
                layer=layer,
            )
            heat = result.maps[0, 0].numpy()
            if heat.sum() > 0:
                energies.append(float(heat[mask].sum() / heat.sum()))
            baselines.append(float(mask.mean()))
    return {
        "method": method,
        "layer": layer or "default",
        "maps": len(energies),
        "energy_pointing_game": round(float(np.mean(energies)), 3) if energies else None,
        "uniform_map_baseline": round(float(np.mean(baselines)), 3),
    }


def measure_detection(
    detector, work: Path, images: list[dict], limit: int, method: str, layer: str | None
) -> dict:
    """Peak-in-own-box rate, and how different two detections' maps are."""
    peaks, correlations, cross = [], [], []
    for record in images[:limit]:
        x = detector.preprocess(work / "test" / record["image"])
        result = explain_dense(detector, x, method=method, layer=layer)
        maps = result.maps[0].numpy()
        for k, found in enumerate(result.objects):
            peaks.append(_peak_inside(maps[k], found["box"]))
        for a in range(len(result.objects)):
            for b in range(a + 1, len(result.objects)):
                if result.objects[a]["class"] == result.objects[b]["class"]:
                    continue
                correlations.append(float(np.corrcoef(maps[a].ravel(), maps[b].ravel())[0, 1]))
                cross.append(_peak_inside(maps[a], result.objects[b]["box"]))
                cross.append(_peak_inside(maps[b], result.objects[a]["box"]))
    return {
        "method": method,
        "layer": layer or "default",
        "detections": len(peaks),
        "peak_in_own_box": round(float(np.mean(peaks)), 3) if peaks else None,
        "pairs_of_different_classes": len(correlations),
        "pair_map_correlation": round(float(np.mean(correlations)), 3) if correlations else None,
        "peak_in_the_other_box": round(float(np.mean(cross)), 3) if cross else None,
    }


def _peak_inside(heat: np.ndarray, box: list[float]) -> bool:
    row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x0, y0, x1, y1 = box
    return bool(x0 <= column + 0.5 <= x1 and y0 <= row + 0.5 <= y1)


def time_methods(model, x: torch.Tensor, task: str, repeats: int) -> dict:
    """Seconds per image of each method, and of one forward pass (the median of repeats)."""

    def forward() -> None:
        with torch.no_grad():
            model.module(list(x) if task == "detection" else x)

    timings = {"forward": _median_seconds(forward, repeats)}
    for name, options in TIMED.items():
        timings[name] = _median_seconds(
            lambda n=name, o=options: explain_dense(
                model, x, task=task, method=n, method_options=o
            ),
            max(1, repeats // 3),
        )
    return {name: round(value, 4) for name, value in timings.items()}


def _median_seconds(work, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def draw(detector, segmenter, work: Path, images: list[dict], out: Path) -> list[Path]:
    """One figure per model: the first held-out image with two objects of different
    classes, and the map of each (``PICTURED``)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model, task, name in (
        (detector, "detection", "detection_maps.png"),
        (segmenter, "segmentation", "segmentation_maps.png"),
    ):
        method, layer = PICTURED[task]
        for record in images:
            picture = Image.open(work / "test" / record["image"]).convert("RGB")
            result = explain_dense(
                model,
                model.preprocess(picture),
                task=task,
                method=method,
                layer=layer,
                image=picture,
                size=picture.size,
            )
            if len({o["class"] for o in result.objects}) >= 2:
                break
        titles = [
            f"{o['label']} {o['score']:.2f}" if task == "detection" else o["label"]
            for o in result.objects
        ]
        figure = topk_figure(picture, result.image_overlays(0), titles)
        written.append(save_figure(figure, out / name))
    return written


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the pictures go")
    parser.add_argument("--work", type=Path, required=True, help="data, models, summary.json")
    parser.add_argument("--n", type=int, default=300, help="training images")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model")
    parser.add_argument("--limit", type=int, default=60, help="held-out images measured")
    parser.add_argument("--repeats", type=int, default=6, help="timing repeats")
    parser.add_argument("--steps", type=int, default=500, help="training steps per model")
    parser.add_argument("--masks", type=int, default=500, help="D-RISE masks when timing")
    args = parser.parse_args(argv)

    if not (args.work / "models.json").is_file():  # train once; a rerun reuses the models
        training = _training_module()
        training.main(
            [
                "--out",
                str(args.work),
                "--n",
                str(args.n),
                "--size",
                str(args.size),
                "--minutes",
                str(args.minutes),
                "--steps",
                str(args.steps),
            ]
        )
    trained = json.loads((args.work / "models.json").read_text())
    detector, segmenter = load_models(args.work, args.size)
    images = test_images(args.work)
    summary = {
        "trained": {
            name: {"seconds": trained[name]["train_seconds"], "quality": trained[name]["quality"]}
            for name in ("detector", "segmenter")
        },
        "segmentation": [
            measure_segmentation(segmenter, args.work, images, args.limit, *config)
            for config in SEGMENTATION_CONFIGS
        ],
        "detection": [
            measure_detection(detector, args.work, images, args.limit, *config)
            for config in DETECTION_CONFIGS
        ],
    }
    TIMED["drise"] = {"n_masks": args.masks}
    x = detector.preprocess(args.work / "test" / images[0]["image"])
    summary["seconds_per_image"] = {
        "detector": time_methods(detector, x, "detection", args.repeats),
        "segmenter": time_methods(
            segmenter,
            segmenter.preprocess(args.work / "test" / images[0]["image"]),
            "segmentation",
            args.repeats,
        ),
    }
    summary["pictures"] = [str(p) for p in draw(detector, segmenter, args.work, images, args.out)]
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
