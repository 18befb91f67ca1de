"""Train a small object detector and a small semantic segmenter on synthetic shapes (CPU).

The data are camlens's multi-shape images (``ShapesConfig(per_image=2)``: two shapes of
different classes per image, with one box and one mask per object). Both models are stock
torchvision builders, built without any weights (nothing is downloaded), trained from scratch
for a wall-clock budget, and saved as safetensors state dicts that rebuild with
``torchvision.models.get_model(builder, weights=None, weights_backbone=None,
num_classes=1 + C, **kwargs)`` and ``load_state_dict(..., strict=True)``:

* detector: ``fasterrcnn_mobilenet_v3_large_320_fpn`` (``DETECTOR_KWARGS``). It takes a list of
  (3, H, W) float images in [0, 1] (its own transform normalises and resizes them) and, in
  eval mode, returns one dict per image with ``boxes`` (x0, y0, x1, y1 pixel edges), ``labels``
  (1..C; 0 is background) and ``scores``.
* segmenter: ``lraspp_mobilenet_v3_large`` (``SEGMENTER_KWARGS``). It takes (N, 3, H, W)
  images normalised with the ImageNet mean and std (``normalise``: ``(x - MEAN) / STD`` per
  channel, with ``x`` in [0, 1]) and returns ``{"out": (N, 1 + C, H, W) logits}``; class 0 is
  the background, class k the k-th class of the data set.

Command line::

    python examples/dense_training.py --out DIR [--n 300] [--size 128] [--minutes 4] [--seed 0]
        [--steps N]

writes ``DIR/train`` and ``DIR/test`` (held-out data, another seed), ``DIR/detector.safetensors``,
``DIR/segmenter.safetensors``, ``DIR/labels.txt`` ("background", then the classes, one a
line) and ``DIR/models.json`` (builders, kwargs, normalisation, classes, measured quality,
training time), and prints the quality numbers.

The segmenter is trained first; the detector's MobileNetV3 backbone starts from the trained
segmenter's backbone (the same layers; a plain ``load_state_dict``), its FPN, RPN and box
heads from random weights: from scratch, the detector learns too slowly for a few CPU minutes.
After training, both models' batch-norm running statistics are re-estimated on the training
images (``recalibrate_batch_norm``): with MobileNetV3's momentum of 0.01 they lag far behind
the weights after a short training, and the eval-mode models then predict nothing.

Training is deterministic given the seed and the number of steps taken, as long as the
learning-rate schedule follows the steps: it follows the larger of the fraction of the time
budget spent and the fraction of ``--steps`` taken. Without ``--steps`` (or on a machine too
busy to take them in time) the number of steps and the schedule depend on the wall clock, so
two runs of the same budget may differ. Measured on 2 busy CPU cores (seed 0, 300 images of
128 px): ``--minutes 10 --steps 500`` gave a segmenter mean IoU of 0.73 over the shape classes
(500 steps) and a detector recall of 0.75 at IoU 0.5 and score 0.5 (precision 0.66; 500 steps,
260 s) on 100 held-out images.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from camlens.data.shapes import ShapesConfig, make_shapes_dataset

#: ImageNet channel mean and standard deviation: the segmenter's expected input normalisation.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

DETECTOR_BUILDER = "fasterrcnn_mobilenet_v3_large_320_fpn"
#: Extra builder arguments of the detector (besides weights, weights_backbone, num_classes).
DETECTOR_KWARGS: dict = {
    "min_size": 128,
    "max_size": 128,
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 100,
    "box_batch_size_per_image": 64,
}
SEGMENTER_BUILDER = "lraspp_mobilenet_v3_large"
#: Extra builder arguments of the segmenter.
SEGMENTER_KWARGS: dict = {}

Target = dict[str, torch.Tensor]


def dataset_classes(folder: str | Path) -> list[str]:
    """The class names of a generated shapes data set, in its order (``dataset.json``)."""
    info = json.loads((Path(folder) / "dataset.json").read_text())
    return list(info["classes"])


def _read_image(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def load_shapes_detection(folder: str | Path) -> list[tuple[torch.Tensor, Target]]:
    """Images and box targets of a multi-shape data set (``annotations.csv``).

    Returns:
        One ``(image, target)`` per image, in ``dataset.json`` order: ``image`` a (3, H, W)
        float tensor in [0, 1]; ``target`` a dict with ``boxes`` (K, 4) float (x0, y0, x1, y1,
        exclusive ends, i.e. pixel edges) and ``labels`` (K,) int64, 1..C in the data set's
        class order (0 is reserved for the background).
    """
    folder = Path(folder)
    classes = dataset_classes(folder)
    rows: dict[str, list[tuple[list[float], int]]] = {}
    with (folder / "annotations.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            box = [float(row[k]) for k in ("x0", "y0", "x1", "y1")]
            rows.setdefault(row["image"], []).append((box, classes.index(row["label"]) + 1))
    info = json.loads((folder / "dataset.json").read_text())
    samples = []
    for record in info["images"]:
        objects = rows.get(record["image"], [])
        boxes = torch.tensor([b for b, _ in objects], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([c for _, c in objects], dtype=torch.int64)
        samples.append((_read_image(folder / record["image"]), {"boxes": boxes, "labels": labels}))
    return samples


def load_shapes_segmentation(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and class-index masks of a multi-shape data set (``masks/*.png``).

    Returns:
        ``(images, masks)``: images (N, 3, H, W) float in [0, 1] (not normalised), masks
        (N, H, W) int64 with 0 for the background and k for the k-th class of the data set.
    """
    folder = Path(folder)
    info = json.loads((folder / "dataset.json").read_text())
    classes = list(info["classes"])
    images, masks = [], []
    for record in info["images"]:
        image = _read_image(folder / record["image"])
        mask = np.zeros(image.shape[1:], dtype=np.int64)
        for obj in record["objects"]:
            with Image.open(folder / obj["mask"]) as m:
                mask[np.asarray(m) > 127] = classes.index(obj["label"]) + 1
        images.append(image)
        masks.append(torch.from_numpy(mask))
    return torch.stack(images), torch.stack(masks)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of (N, 3, H, W) images in [0, 1], as the segmenter expects."""
    mean = torch.tensor(MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def build_detector(num_classes: int, **kwargs) -> nn.Module:
    """The stock detector builder without weights; ``num_classes`` counts the background."""
    kwargs = {**DETECTOR_KWARGS, **kwargs}
    return torchvision.models.get_model(
        DETECTOR_BUILDER, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )


def build_segmenter(num_classes: int, **kwargs) -> nn.Module:
    """The stock segmenter builder without weights; ``num_classes`` counts the background."""
    kwargs = {**SEGMENTER_KWARGS, **kwargs}
    return torchvision.models.get_model(
        SEGMENTER_BUILDER, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, forward, batches) -> None:
    """Re-estimate every batch-norm layer's running mean and variance, then set eval mode.

    torchvision's MobileNetV3 uses batch-norm momentum 0.01: after a short training from
    scratch the running statistics lag far behind the weights, and the eval-mode model
    predicts nothing useful (the segmenter predicted background everywhere). Here the running
    statistics are reset and replaced by plain averages (``momentum=None``) over ``batches``,
    each passed through ``forward`` with only the batch-norm layers in train mode. The
    momentum is restored afterwards (it is not part of the state dict).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for batch in batches:
        forward(batch)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _seed_everything(seed: int) -> None:
    """Seed torch and numpy (the CPU kernels used here are deterministic; the process-wide
    ``torch.use_deterministic_algorithms`` switch is left as the caller set it)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def _flip_detection(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {"boxes": boxes, "labels": target["labels"]}


def _lr_at(step_fraction: float, base: float, warmup: float = 0.03) -> float:
    """Linear warm-up, then cosine decay to 5 % of ``base`` over the budget."""
    if step_fraction < warmup:
        return base * max(step_fraction / warmup, 0.05)
    t = min(1.0, (step_fraction - warmup) / (1.0 - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train_detector(
    folder: str | Path,
    *,
    seconds: float,
    seed: int = 0,
    batch_size: int = 2,
    lr: float = 1e-3,
    steps: int | None = None,
    backbone_from: nn.Module | None = None,
    log: bool = False,
) -> nn.Module:
    """Train ``DETECTOR_BUILDER`` on the data set in ``folder`` for ``seconds``.

    AdamW on the sum of the model's training losses (RPN objectness and box regression, box
    classifier and regression), random horizontal flips, shuffled batches of ``batch_size``
    images, warm-up then cosine learning rate over the time budget (or over ``steps``, when
    given, whichever ends first). Afterwards the batch-norm statistics are re-estimated
    (``recalibrate_batch_norm``).

    ``backbone_from``: a trained ``SEGMENTER_BUILDER`` model whose MobileNetV3 backbone
    initialises the detector's (same layers, same parameter names); otherwise everything
    starts from random weights.

    Returns:
        The model in eval mode; its ``train_steps`` attribute holds the number of steps taken.
    """
    _seed_everything(seed)
    samples = load_shapes_detection(folder)
    model = build_detector(1 + len(dataset_classes(folder)))
    if backbone_from is not None:
        model.backbone.body.load_state_dict(backbone_from.backbone.state_dict(), strict=True)
    model.train_steps = _train_for(
        model,
        seconds=seconds,
        lr=lr,
        n=len(samples),
        batch_size=batch_size,
        seed=seed,
        steps=steps,
        loss_of=lambda index, flips: _detection_loss(model, samples, index, flips),
        log=log,
        name="detector",
    )

    def features(index: list[int]) -> None:
        batch, _ = model.transform([samples[i][0] for i in index])
        model.backbone(batch.tensors)

    chunks = [list(range(i, min(i + 16, len(samples)))) for i in range(0, len(samples), 16)]
    recalibrate_batch_norm(model, features, chunks)
    return model


def _detection_loss(
    model: nn.Module,
    samples: list[tuple[torch.Tensor, Target]],
    index: torch.Tensor,
    flips: torch.Tensor,
) -> torch.Tensor:
    images, targets = [], []
    for i, flip in zip(index.tolist(), flips.tolist(), strict=True):
        image, target = samples[i]
        if flip:
            image, target = _flip_detection(image, target)
        images.append(image)
        targets.append(target)
    losses = model(images, targets)
    return sum(losses.values())


def _train_for(
    model: nn.Module,
    *,
    seconds: float,
    lr: float,
    n: int,
    batch_size: int,
    seed: int,
    steps: int | None,
    loss_of,
    log: bool,
    name: str,
) -> int:
    """Shared loop: shuffled batches until ``seconds`` are spent (or ``steps`` taken);
    returns the step count. The learning-rate schedule follows the fraction of the budget
    spent (time, or steps when ``steps`` is given and ends first)."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    model.train()
    start = time.perf_counter()
    step, epoch, running = 0, 0, None
    while True:
        order = torch.randperm(n, generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        for first in range(0, n - batch_size + 1, batch_size):
            elapsed = time.perf_counter() - start
            if elapsed >= seconds or (steps is not None and step >= steps):
                if log:
                    print(f"{name}: {step} steps, {epoch} epochs, {elapsed:.0f} s", flush=True)
                return step
            for group in optimizer.param_groups:
                spent = elapsed / seconds if steps is None else max(elapsed / seconds, step / steps)
                group["lr"] = _lr_at(spent, lr)
            loss = loss_of(order[first : first + batch_size], flips[first : first + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            step += 1
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if log and step % 50 == 0:
                print(f"{name}: step {step} loss {running:.3f} {elapsed:.0f} s", flush=True)
        epoch += 1


def train_segmenter(
    folder: str | Path,
    *,
    seconds: float,
    seed: int = 0,
    batch_size: int = 8,
    lr: float = 4e-3,
    steps: int | None = None,
    log: bool = False,
) -> nn.Module:
    """Train ``SEGMENTER_BUILDER`` from scratch on the data set in ``folder`` for ``seconds``.

    Inputs are ImageNet-normalised (``normalise``); cross-entropy of ``output["out"]`` against
    the class-index masks; AdamW, random horizontal flips, warm-up then cosine learning rate
    (``steps``, batch-norm re-estimation: as in ``train_detector``).

    Returns:
        The model in eval mode (it expects normalised input, see the module docstring); its
        ``train_steps`` attribute holds the number of steps taken.
    """
    _seed_everything(seed)
    images, masks = load_shapes_segmentation(folder)
    inputs = normalise(images)
    model = build_segmenter(1 + len(dataset_classes(folder)))

    def loss_of(index: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        x, y = inputs[index], masks[index]
        flip = flips.view(-1, 1, 1)
        x = torch.where(flip.unsqueeze(1), x.flip(-1), x)
        y = torch.where(flip, y.flip(-1), y)
        return F.cross_entropy(model(x)["out"], y)

    model.train_steps = _train_for(
        model,
        seconds=seconds,
        lr=lr,
        n=len(images),
        batch_size=batch_size,
        seed=seed,
        steps=steps,
        loss_of=loss_of,
        log=log,
        name="segmenter",
    )
    chunks = [inputs[i : i + 32] for i in range(0, len(inputs), 32)]
    recalibrate_batch_norm(model, model, chunks)
    return model


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (A, 4) and (B, 4) boxes (x0, y0, x1, y1 edges): (A, B)."""
    return torchvision.ops.box_iou(a.float().reshape(-1, 4), b.float().reshape(-1, 4))


@torch.no_grad()
def detection_quality(
    model: nn.Module,
    folder: str | Path,
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> dict:
    """Recall, precision and matched IoU of a detector on the data set in ``folder``.

    Detections with a score below ``score_threshold`` are dropped; the others are matched to
    ground-truth objects of the same class one to one, highest score first, each to the
    unmatched object it overlaps most if that IoU is at least ``iou_threshold``.

    Returns:
        ``objects`` and ``detections`` (counts), ``recall`` (matched objects / objects),
        ``precision`` (matched detections / detections; 1.0 when there are none),
        ``mean_iou`` (over matched pairs; 0.0 when none) and ``per_class_recall``.
    """
    classes = dataset_classes(folder)
    samples = load_shapes_detection(folder)
    model.eval()
    matched_ious: list[float] = []
    n_objects = n_detections = 0
    found = dict.fromkeys(classes, 0)
    total = dict.fromkeys(classes, 0)
    for first in range(0, len(samples), 16):
        chunk = samples[first : first + 16]
        outputs = model([image for image, _ in chunk])
        for (_, target), output in zip(chunk, outputs, strict=True):
            keep = output["scores"] >= score_threshold
            boxes, labels = output["boxes"][keep], output["labels"][keep]
            scores = output["scores"][keep]
            n_objects += len(target["labels"])
            n_detections += len(labels)
            for label in target["labels"].tolist():
                total[classes[label - 1]] += 1
            ious = box_iou(boxes, target["boxes"])
            taken = torch.zeros(len(target["labels"]), dtype=torch.bool)
            for d in torch.argsort(scores, descending=True).tolist():
                candidates = (target["labels"] == labels[d]) & ~taken
                overlap = torch.where(candidates, ious[d], torch.tensor(-1.0))
                if len(overlap) == 0:
                    continue
                best = int(torch.argmax(overlap))
                if overlap[best] >= iou_threshold:
                    taken[best] = True
                    matched_ious.append(float(overlap[best]))
                    found[classes[int(target["labels"][best]) - 1]] += 1
    matched = len(matched_ious)
    return {
        "objects": n_objects,
        "detections": n_detections,
        "recall": matched / n_objects if n_objects else 0.0,
        "precision": matched / n_detections if n_detections else 1.0,
        "mean_iou": float(np.mean(matched_ious)) if matched_ious else 0.0,
        "per_class_recall": {c: found[c] / total[c] if total[c] else None for c in classes},
        "iou_threshold": iou_threshold,
        "score_threshold": score_threshold,
    }


@torch.no_grad()
def segmentation_quality(model: nn.Module, folder: str | Path) -> dict:
    """Pixel accuracy and IoU of a segmenter on the data set in ``folder``.

    The model gets ``normalise``d images and returns (N, 1 + C, H, W) logits, or a dict with
    them under ``"out"``; the prediction is their argmax.

    Returns:
        ``pixel_accuracy``, ``iou`` (per class, "background" first; None for a class absent
        from both prediction and truth), ``mean_iou`` (over the shape classes) and
        ``mean_iou_with_background``.
    """
    names = ["background", *dataset_classes(folder)]
    images, masks = load_shapes_segmentation(folder)
    model.eval()
    intersection = np.zeros(len(names))
    union = np.zeros(len(names))
    correct = 0
    for first in range(0, len(images), 32):
        output = model(normalise(images[first : first + 32]))
        logits = output["out"] if isinstance(output, dict) else output
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear")
        prediction = logits.argmax(1)
        truth = masks[first : first + 32]
        correct += int((prediction == truth).sum())
        for k in range(len(names)):
            p, t = prediction == k, truth == k
            intersection[k] += int((p & t).sum())
            union[k] += int((p | t).sum())
    iou = {
        n: (float(i / u) if u else None) for n, i, u in zip(names, intersection, union, strict=True)
    }
    shapes = [v for n, v in iou.items() if n != "background" and v is not None]
    every = [v for v in iou.values() if v is not None]
    return {
        "pixel_accuracy": correct / masks.numel(),
        "iou": iou,
        "mean_iou": float(np.mean(shapes)) if shapes else 0.0,
        "mean_iou_with_background": float(np.mean(every)) if every else 0.0,
    }


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """Save ``model``'s state dict as safetensors (contiguous, detached copies)."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def main(argv: list[str] | None = None) -> dict:
    """The command line (see the module docstring); returns what ``models.json`` holds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n", type=int, default=300, help="training images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="at most this many steps per model (default: no cap)",
    )
    args = parser.parse_args(argv)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    classes = ("circle", "square", "triangle")
    common = {"size": args.size, "classes": classes, "per_image": 2}
    make_shapes_dataset(
        out / "train", ShapesConfig(n=args.n, seed=args.seed, **common), overwrite=True
    )
    n_test = max(len(classes), args.n // 3)
    make_shapes_dataset(
        out / "test", ShapesConfig(n=n_test, seed=args.seed + 1000, **common), overwrite=True
    )
    seconds = 60.0 * args.minutes
    num_classes = 1 + len(classes)

    start = time.perf_counter()
    segmenter = train_segmenter(
        out / "train", seconds=seconds, seed=args.seed, steps=args.steps, log=True
    )
    segmenter_seconds = time.perf_counter() - start
    segmenter_steps = segmenter.train_steps
    segmentation = segmentation_quality(segmenter, out / "test")
    print("segmenter:", json.dumps(segmentation), flush=True)
    save_state_dict(segmenter, out / "segmenter.safetensors")

    start = time.perf_counter()
    detector = train_detector(
        out / "train",
        seconds=seconds,
        seed=args.seed,
        steps=args.steps,
        backbone_from=segmenter,
        log=True,
    )
    detector_seconds = time.perf_counter() - start
    detector_steps = detector.train_steps
    detection = detection_quality(detector, out / "test")
    print("detector:", json.dumps(detection), flush=True)
    save_state_dict(detector, out / "detector.safetensors")

    labels = ["background", *classes]
    (out / "labels.txt").write_text("\n".join(labels) + "\n")
    rebuild = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    summary = {
        "classes": labels,
        "data": {"train": "train", "test": "test", **common, "classes": list(classes)},
        "detector": {
            "file": "detector.safetensors",
            "builder": DETECTOR_BUILDER,
            "kwargs": {**rebuild, **DETECTOR_KWARGS},
            "input": "list of (3, H, W) float images in [0, 1] (the model normalises itself)",
            "train_seconds": round(detector_seconds, 1),
            "init": "backbone from the trained segmenter's backbone, the rest random",
            "seed": args.seed,
            "steps": detector_steps,
            "quality": detection,
        },
        "segmenter": {
            "file": "segmenter.safetensors",
            "builder": SEGMENTER_BUILDER,
            "kwargs": {**rebuild, **SEGMENTER_KWARGS},
            "input": "(N, 3, H, W) images in [0, 1], then (x - mean) / std per channel",
            "normalisation": {"mean": list(MEAN), "std": list(STD)},
            "output": 'dict, "out": (N, 1 + C, H, W) logits, class 0 = background',
            "train_seconds": round(segmenter_seconds, 1),
            "init": "random (weights=None, weights_backbone=None)",
            "seed": args.seed,
            "steps": segmenter_steps,
            "quality": segmentation,
        },
    }
    (out / "models.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
