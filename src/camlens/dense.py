"""Explain a segmenter per class region and a detector per detection, with any map method.

One image at a time (the targets belong to one image, see ``camlens.models.dense``):

1. the clean forward pass fixes the targets: for a segmenter every class predicted on at
   least one pixel (a class named ``background`` left out), with its predicted pixels as the
   region, or the pixels of a user's mask (``region``); for a detector every detection whose
   score reaches ``score_threshold``;
2. the model is wrapped into a classifier of those K targets (``RegionScores``,
   ``DetectionScores``) and the method runs on the wrapper with targets ``0 .. K-1``;
3. with several layers (a detector's feature pyramid, ``default_dense_layers``), the method
   runs once per layer and the raw maps, resized bilinearly to the largest layer's grid,
   are summed (pytorch-grad-cam resizes the levels and concatenates their channels, which
   gives the same sum for channel-weighted methods). A detector's maps are first cropped to
   the part of its padded batch that shows the image (``DetectionScores.valid``).

The result is a :class:`DenseExplanation`: an ``Explanation`` of one image whose K targets are
the detections or class regions (``objects`` describes them), so ``maps``, ``overlays`` and
``boxes`` work as for a classifier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.hooks import preserved_state
from camlens.localize import scale_box
from camlens.methods import CAMMethod, MethodResult
from camlens.methods.registry import check_method
from camlens.models import Classifier
from camlens.models.dense import (
    DEFAULT_IOU_THRESHOLD,
    DetectionScores,
    RegionScores,
    TargetScores,
    default_dense_layers,
    detect_task,
    detection_outputs,
    segmentation_logits,
)
from camlens.render import outline, resize_mask

#: Detections scoring at least this are explained by default (``--score-threshold``).
DEFAULT_SCORE_THRESHOLD = 0.5

#: Class names that segmenters use for "no object": not explained unless asked for.
BACKGROUND_NAMES = ("background", "__background__", "bg")


@dataclass
class DenseExplanation(Explanation):
    """The maps of one image's detections or class regions (see the module docstring).

    ``targets`` are ``0 .. K-1`` (the K objects), ``labels`` and ``target_labels`` name them,
    ``logits`` and ``scores`` are their scores on the clean pass.

    Attributes:
        task: ``"detection"`` or ``"segmentation"``.
        objects: one dict per target. Detection: ``class``, ``label``, ``score``, ``box``
            ([x0, y0, x1, y1] in input pixels). Segmentation: ``class``, ``label``, ``score``
            (the summed logits over the region), ``pixels`` (the region's size in input
            pixels), ``mean_prob`` (the class's mean softmax probability over the region),
            ``region`` (``"predicted"`` or ``"mask"``).
        regions: segmentation: (K, H, W) bool, each target's region at input size.
    """

    task: str = "detection"
    objects: list[dict[str, Any]] = field(default_factory=list)
    regions: np.ndarray | None = None

    def object_boxes(self, i: int = 0) -> list[tuple[int, int, int, int] | None]:
        """Each detection's box in image ``i``'s original pixels (None for segments)."""
        input_wh = (self.input_size[1], self.input_size[0])
        return [
            scale_box(tuple(o["box"]), input_wh, self.original_size(i)) if "box" in o else None
            for o in self.objects
        ]

    def image_overlays(self, i: int = 0, **style: Any) -> list[Image.Image]:
        """Overlays of the maps on the image: a detection's own box drawn on its map (not
        Zhou's box); a class region's outline drawn in white on its map."""
        if self.task == "detection":
            input_boxes = [tuple(o["box"]) for o in self.objects]
            style.setdefault("threshold", 0.2)
            return super().image_overlays(i, boxes=input_boxes, **style)
        pictures = super().image_overlays(i, **{**style, "threshold": None})
        if self.regions is None:
            return pictures
        return [outline(p, self.regions[k]) for k, p in enumerate(pictures)]


def explain_dense(
    classifier: Classifier,
    x: torch.Tensor,
    *,
    task: str | None = None,
    method: str = "gradcam",
    layer: str | Sequence[str] | None = None,
    method_options: dict[str, Any] | None = None,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    detection_score: str | None = None,
    region: np.ndarray | None = None,
    classes: Sequence[int | str] | None = None,
    image: Image.Image | None = None,
    source: str | None = None,
    size: tuple[int, int] | None = None,
) -> DenseExplanation:
    """Explain one image ``x`` (1, C, H, W) of a segmenter or a detector.

    Parameters:
        classifier: the model (its ``module``, ``labels``).
        x: the preprocessed image, one.
        task: ``"segmentation"`` or ``"detection"``; None: from the model's output
            (``camlens.models.dense.detect_task``).
        method: a map method's name (``"gradcam"``, ``"scorecam"``, ``"eigencam"``,
            ``"drise"``...); CAM needs a classifier's GAP + linear head and is refused.
        layer: the feature layer(s), names inside the model; several: their maps are summed
            (see the module docstring). None: ``default_dense_layers``, else the last
            layer returning feature maps before the layer that returns the logits.
        method_options: keyword arguments of the method's class.
        score_threshold: detection: explain the detections scoring at least this.
        iou_threshold: detection: the IoU that matches a detection to its reference.
        detection_score: ``"score"``, ``"score+iou"`` or ``"drise"``
            (``DetectionScores``); None: the method's own (``"drise"`` for D-RISE),
            else ``"score"``.
        region: segmentation: (H, W) bool mask at the input size; each class predicted
            inside it is explained over the whole mask. None: each class over its predicted
            pixels.
        classes: segmentation: the classes to explain (ids or names), even when predicted
            nowhere; None: every predicted class but the background.
        image, source, size: the original image, its name and (width, height), for overlays.

    Returns:
        A ``DenseExplanation`` (K = 0 when nothing is detected or predicted).

    Raises:
        ConfigError: CAM, the methods that compare classes (``compares_classes``:
            ``finercam``, ``shapleycam``), ``aug_smooth`` (a flipped image moves the
            targets), an unknown task, class or layer.

    Example:
        >>> from torch import nn
        >>> segmenter = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                           nn.Conv2d(4, 2, 1))
        >>> model = Classifier(segmenter, ["background", "thing"])
        >>> result = explain_dense(model, torch.rand(1, 3, 16, 16), task="segmentation",
        ...                        classes=["thing"])
        >>> result.task, result.layer, result.raw.shape[:2]
        ('segmentation', '1', torch.Size([1, 1]))
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ConfigError(f"explain_dense takes one image (1, C, H, W), got {tuple(x.shape)}")
    options = dict(method_options or {})
    cls = check_method(method, options)
    if cls.name == "cam":
        raise ConfigError(
            "cam needs a classifier's global average pooling and final linear layer; a "
            "detector or segmenter has neither: use --method gradcam (or another gradient "
            "method, scorecam, ablationcam, eigencam, drise)"
        )
    if cls.compares_classes:
        raise ConfigError(
            f"{cls.name} cannot explain a detection or a class region: "
            f"{cls.similarity_refusal}, and a detector's or segmenter's targets are scores of "
            "their own, not classes; use gradcam (or another gradient method, scorecam, "
            "ablationcam, eigencam, drise)"
        )
    if options.get("aug_smooth"):
        raise ConfigError(
            "aug_smooth flips the image, which moves the detections and regions it explains; "
            "leave it off for detectors and segmenters"
        )
    module = classifier.module
    task = task or classifier.info.get("task") or detect_task(module, x)
    if task == "segmentation":
        scores, objects, regions = _segmentation_targets(classifier, x, region, classes)
    elif task == "detection":
        mode = detection_score or getattr(cls, "detection_score", "score")
        scores, objects = _detection_targets(classifier, x, score_threshold, iou_threshold, mode)
        regions = None
    else:
        raise ConfigError(
            f"task {task!r}: explain_dense explains segmentation and detection models; "
            "classifiers are explained by camlens.explain"
        )
    names = _layer_names(layer) or default_dense_layers(module, task)
    names = names or [_last_feature_layer(module, x)]
    k = len(objects)
    if k == 0:
        raw, layer_text = torch.zeros((1, 0, 1, 1)), ",".join(names)
        logits = torch.zeros((1, 0))
    else:
        raw, logits, layer_text = _fused_maps(scores, cls, names, options, x)
    labels = [o["label"] for o in objects]
    return DenseExplanation(
        raw=raw,
        targets=torch.arange(k)[None],
        logits=logits,
        method=cls.name,
        layer=layer_text,
        input_size=(int(x.shape[-2]), int(x.shape[-1])),
        labels=labels,
        images=None if image is None else [image],
        sources=None if source is None else [source],
        sizes=None if size is None else [size],
        target_labels=labels,
        target_scores=logits,
        task=task,
        objects=objects,
        regions=regions,
    )


def _fused_maps(
    scores: TargetScores,
    cls: type[CAMMethod],
    names: list[str],
    options: dict[str, Any],
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(1, K, h, w) raw maps summed over ``names`` (each resized to the largest grid), the
    clean (1, K) scores, and the layers' names as the maps' ``layer``."""
    uses_layers = cls.name != "drise"
    results: list[MethodResult] = []
    for name in names if uses_layers else names[:1]:
        instance = cls(scores, layer=f"model.{name}", **options)
        result = instance.run(x, torch.arange(len(scores.labels))[None])
        results.append(_cropped(result, scores, x))
    grid = max((r.raw.shape[-2:] for r in results), key=lambda s: s[0] * s[1])
    raw = sum(
        F.interpolate(r.raw, size=tuple(grid), mode="bilinear", align_corners=False)
        if r.raw.shape[-2:] != grid
        else r.raw
        for r in results
    )
    layer = ",".join(names) if uses_layers else "(input)"
    return raw, results[0].logits.float(), layer


def _cropped(result: MethodResult, scores: TargetScores, x: torch.Tensor) -> MethodResult:
    """``result`` with its maps cut to the part of a detector's padded batch that shows the
    image (``DetectionScores.valid``; segmenters see the image unpadded)."""
    rows, columns = getattr(scores, "valid", (1.0, 1.0))
    h, w = result.raw.shape[-2:]
    if (h, w) == tuple(x.shape[-2:]):  # maps at the input's resolution: no padding in them
        return result
    keep_h, keep_w = max(1, math.ceil(h * rows - 1e-6)), max(1, math.ceil(w * columns - 1e-6))
    if (keep_h, keep_w) != (h, w):
        result.raw = result.raw[..., :keep_h, :keep_w]
    return result


def _segmentation_targets(
    classifier: Classifier,
    x: torch.Tensor,
    region: np.ndarray | None,
    classes: Sequence[int | str] | None,
) -> tuple[RegionScores, list[dict[str, Any]], np.ndarray]:
    """The classes to explain, their regions and scores on the clean pass."""
    module, size = classifier.module, tuple(x.shape[-2:])
    with preserved_state(module), torch.no_grad():
        logits = segmentation_logits(module(x)).float()
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    probs = logits.softmax(dim=1)[0]
    predicted = probs.argmax(dim=0)
    n_classes = int(logits.shape[1])
    labels = _class_names(classifier, n_classes)
    mask = None if region is None else _region_mask(region, size)
    if classes is not None:
        chosen = [_class_index(c, labels) for c in classes]
    else:
        inside = predicted if mask is None else predicted[mask]
        present = torch.unique(inside).tolist()
        chosen = [c for c in present if labels[c].lower() not in BACKGROUND_NAMES]
    regions = [(predicted == c) if mask is None else mask for c in chosen]
    stacked = torch.stack(regions) if regions else torch.zeros((0, *size), dtype=torch.bool)
    objects = []
    for c, area in zip(chosen, stacked, strict=True):
        pixels = int(area.sum())
        objects.append(
            {
                "class": c,
                "label": labels[c],
                "score": round(float((logits[0, c] * area).sum()), 6),
                "pixels": pixels,
                "mean_prob": round(float(probs[c][area].mean()), 6) if pixels else None,
                "region": "predicted" if mask is None else "mask",
            }
        )
    names = [o["label"] for o in objects]
    scores = RegionScores(module, chosen, stacked.to(x.device), labels=names)
    return scores, objects, stacked.numpy()


def _detection_targets(
    classifier: Classifier,
    x: torch.Tensor,
    score_threshold: float,
    iou_threshold: float,
    mode: str,
) -> tuple[DetectionScores, list[dict[str, Any]]]:
    """The detections to explain (score >= ``score_threshold``) of the clean pass."""
    module = classifier.module
    with preserved_state(module), torch.no_grad():
        try:
            output = module(list(x))
        except (TypeError, AttributeError, RuntimeError, ValueError) as error:
            raise ConfigError(
                f"{classifier.name} cannot be explained as a detector: called as torchvision's "
                f"detectors are (a list of images), it failed ({type(error).__name__}: "
                f"{error}); is --task detection right for this model?"
            ) from error
        found = detection_outputs(output)[0]
    keep = found["scores"] >= score_threshold
    boxes, classes, values = found["boxes"][keep], found["labels"][keep], found["scores"][keep]
    objects = [
        {
            "class": int(c),
            "label": classifier.label(int(c)),
            "score": round(float(s), 6),
            "box": [round(float(v), 2) for v in b],
        }
        for b, c, s in zip(boxes, classes, values, strict=True)
    ]
    names = [f"{o['label']} #{k + 1}" for k, o in enumerate(objects)]
    scores = DetectionScores(
        module,
        boxes.float(),
        classes.tolist(),
        iou_threshold=iou_threshold,
        mode=mode,
        labels=names,
    )
    return scores, objects


def _class_names(classifier: Classifier, n_classes: int) -> list[str]:
    """The model's class names, numbers where it has none (``Classifier.label``)."""
    return [classifier.label(c) for c in range(n_classes)]


def _class_index(value: int | str, labels: list[str]) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        if not 0 <= index < len(labels):
            raise ConfigError(f"class {index} is out of range 0..{len(labels) - 1}")
        return index
    lowered = [name.lower() for name in labels]
    if str(value).strip().lower() not in lowered:
        raise ConfigError(f"class {value!r} is not one of the model's classes: {labels}")
    return lowered.index(str(value).strip().lower())


def _region_mask(region: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A user's region as (H, W) bool at the input size (nearest-neighbour resize)."""
    mask = np.asarray(region)
    if mask.ndim != 2:
        raise ConfigError(f"a region mask must be one (H, W) image, got shape {mask.shape}")
    if not mask.any():
        raise ConfigError("the region mask is empty: it must mark at least one pixel")
    return torch.from_numpy(resize_mask(mask, (size[1], size[0])).copy())


def _layer_names(layer: str | Sequence[str] | None) -> list[str]:
    if layer is None:
        return []
    if isinstance(layer, str):
        return [name.strip() for name in layer.split(",") if name.strip()]
    return list(layer)


def _last_feature_layer(module: nn.Module, x: torch.Tensor) -> str:
    """The last module returning (N, C, h, w) maps whose channels are not the output's
    classes (the layer before a segmenter's classifying convolution)."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        sub.register_forward_hook(
            lambda mod, args, out, name=name: (
                calls.append((name, out))
                if isinstance(out, torch.Tensor) and out.ndim == 4
                else None
            )
        )
        for name, sub in module.named_modules()
        if name
    ]
    try:
        with preserved_state(module), torch.no_grad():
            logits = segmentation_logits(module(x))
    finally:
        for handle in handles:
            handle.remove()
    n_classes = logits.shape[1]
    features = [name for name, out in calls if out.shape[1] != n_classes]
    if not features:
        raise ConfigError(
            "no layer of this model returns feature maps other than its class logits; "
            "name the layer to explain with --layer"
        )
    return features[-1]
