"""The evaluate task for detectors: how good are the maps of a detector's detections?

Per annotated image (``process``; one image at a time, ``camlens.dense.explain_dense``), for
every method: the detections scoring at least ``score_threshold`` are explained (one map per
detection), then each detection is matched to a ground-truth box and the matched ones are
measured.

**Matching** (greedy by score, as in the PASCAL VOC / COCO protocols): the detections are
taken by decreasing score; each takes, among the still unmatched ground-truth boxes *of its
class* (the annotation's label is the model's class name, or id), the one of largest IoU,
when that IoU is at least ``match_iou`` (0.5). A ground-truth box that no detection takes is
*missed*; a detection that takes none is *unmatched* (a false positive, or a duplicate).
Boxes are compared in the original image's pixels.

**Measurements** of a matched detection ``d`` with map ``M_d`` and ground-truth box ``B``:

* ``pointing_game``: 1 when the peak of ``M_d`` (at the original image size) lies within
  ``tolerance`` pixels of ``B``, else 0 (``camlens.metrics.localization.pointing_game``;
  tolerance 0: the peak pixel's centre inside the box);
* ``energy_pointing_game``: ``sum_{p in B} M_d(p) / sum_p M_d(p)``, the share of the map's
  mass inside the box (``camlens.metrics.localization.energy_pointing_game``);
* ``deletion_auc`` and ``insertion_auc``: RISE's deletion and insertion
  (``camlens.metrics.faithfulness.deletion_curve`` / ``insertion_curve``) where the class
  probability is replaced by the *detection score*: the detector runs on the perturbed copies
  of the image (pixels removed, or put back, in decreasing order of ``M_d`` at the model's
  input size) and ``s_d(x')`` is the score of the detection of ``x'`` that matches ``d``'s box
  and class (IoU >= ``iou_threshold``; 0 when none does: ``camlens.models.dense.
  DetectionScores`` in mode ``"score"``). The area under the curve (``auc``, trapezoids over
  [0, 1]): deletion lower is better (the score falls fast when the highlighted pixels go),
  insertion higher is better.

Each image becomes one record (one line of ``evaluation.jsonl``)::

    {"index": 0, "image": "a.png", "status": "ok", "error": null, "n_gt": 2,
     "methods": {"gradcam": {
         "detections": [{"class": 1, "label": "a", "score": 0.93, "box": [x0, y0, x1, y1],
                         "gt": 0, "gt_box": [...], "iou": 0.81, "pointing_game": true,
                         "energy_pointing_game": 0.64, "deletion": [...], "insertion": [...],
                         "deletion_auc": 0.12, "insertion_auc": 0.71}, ...],
         "missed": [{"gt": 1, "label": "b", "box": [...]}]}},
     "arrays": {"gradcam": <raw maps (K, h, w)>}}

(an unmatched detection has ``gt`` None and no measurements; ``box`` and ``gt_box`` are in
the original image's pixels). ``fold`` sums the records up into ``metrics.json``: per method
the means over the matched detections, and the counts of detections, matched ones, unmatched
ones and missed ground-truth boxes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from camlens.dense import DEFAULT_SCORE_THRESHOLD, DenseExplanation, explain_dense
from camlens.errors import ConfigError
from camlens.io import ImageLoadError
from camlens.methods import CAMMethod, get_method, options_for
from camlens.metrics.faithfulness import auc, deletion_curve, insertion_curve
from camlens.metrics.localization import box_iou, energy_pointing_game, pointing_game
from camlens.metrics.registry import REGISTRY, resolve_metrics
from camlens.models.dense import DEFAULT_IOU_THRESHOLD, DetectionScores
from camlens.pipeline import Item, OutputFolder
from camlens.tasks.common import worker_model
from camlens.tasks.evaluate import (
    METRICS_FILE,
    RECORDS_FILE,
    EvaluateTask,
    Work,
    distinct_methods,
    load_annotated_image,
)

__all__ = [
    "DETECTION_METRICS",
    "MATCH_IOU",
    "METRICS_FILE",
    "RECORDS_FILE",
    "DetectionEvaluateTask",
    "dense_methods",
    "detection_metrics",
    "match_detections",
]

#: The metrics a detector's evaluation reports (names of ``camlens.metrics.registry``).
DETECTION_METRICS = ("pointing_game", "energy_pointing_game", "deletion_auc", "insertion_auc")

#: The IoU a detection needs with a ground-truth box of its class to be matched to it.
MATCH_IOU = 0.5

#: The method a detector is evaluated with when none is chosen.
DEFAULT_DENSE_METHOD = "gradcam"

#: What a metric needs to be measured per matched detection.
_NEEDS = {
    "pointing_game": "localization",
    "energy_pointing_game": "localization",
    "deletion_auc": "deletion",
    "insertion_auc": "insertion",
}


def detection_metrics(metrics: Sequence[str] | str | None) -> list[str]:
    """The metrics of a detector's evaluation among ``metrics`` (names or groups, as for
    classifiers: ``camlens.metrics.registry.resolve_metrics``; None: all four).

    A group keeps the metrics of it that apply to detections (``localization``: pointing
    game and energy; ``faithfulness``: deletion and insertion AUC).

    Raises:
        ConfigError: a metric named explicitly that does not apply to detections, or a choice
            that leaves none.

    Example:
        >>> detection_metrics("localization,deletion")
        ['pointing_game', 'energy_pointing_game', 'deletion_auc']
    """
    if metrics is None:
        return list(DETECTION_METRICS)
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [n.strip().lower() for n in names if n.strip()]
    refused = [n for n in names if n in REGISTRY and n not in DETECTION_METRICS]
    if refused:
        raise ConfigError(
            f"metric(s) {', '.join(refused)} do not apply to a detector; its evaluation "
            f"reports {', '.join(DETECTION_METRICS)}"
        )
    chosen = set(resolve_metrics(names))
    kept = [name for name in DETECTION_METRICS if name in chosen]
    if not kept:
        raise ConfigError(
            f"none of the metrics {', '.join(names)} applies to a detector; choose among "
            f"{', '.join(DETECTION_METRICS)} (or the groups localization, faithfulness)"
        )
    return kept


def dense_methods(
    methods: Sequence[str | CAMMethod] | str | None,
    options: dict[str, Any] | None = None,
    module: nn.Module | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The distinct methods (canonical names) that explain a detector, each with the part of
    ``options`` its class takes (``camlens.methods.options_for``). None: ``"gradcam"``;
    ``"all"``: every registered method but CAM (with ``module``: every one that can explain
    it, ``camlens.methods.methods_for``, but CAM).

    Raises:
        ConfigError: CAM (a detector has no global-average-pooling head), a method instance
            (a detector's methods hook a wrapper made per image), an unknown method, or an
            option that none of the methods takes.

    Example:
        >>> dense_methods("Grad-CAM, scorecam", {"max_channels": 8})
        [('gradcam', {}), ('scorecam', {'max_channels': 8})]
    """
    options = dict(options or {})
    if methods is None:
        methods = DEFAULT_DENSE_METHOD
    if isinstance(methods, str) and methods.strip() == "all":
        chosen = [name for name in distinct_methods("all", module) if name != "cam"]
    else:
        chosen = distinct_methods(methods)
    if any(isinstance(m, CAMMethod) for m in chosen):
        raise ConfigError(
            "a detector is evaluated with method names, not method instances (its methods "
            "run on a wrapper of its detections made per image)"
        )
    if "cam" in chosen:
        raise ConfigError(
            "cam needs a classifier's global average pooling and final linear layer; a "
            "detector has neither: use --method gradcam (or another gradient method, "
            "scorecam, ablationcam, eigencam, drise)"
        )
    used: set[str] = set()
    result = []
    for name in chosen:
        taken = options_for(get_method(name), options)
        used.update(taken)
        result.append((str(name), taken))
    unused = [k for k in options if k not in used]
    if unused:
        raise ConfigError(
            f"none of the methods {', '.join(n for n, _ in result)} takes the option(s) "
            f"{', '.join(unused)}"
        )
    return result


def match_detections(
    boxes: Sequence[Sequence[float]],
    classes: Sequence[int],
    scores: Sequence[float],
    gt_boxes: Sequence[Sequence[float]],
    gt_classes: Sequence[int | None],
    iou_threshold: float = MATCH_IOU,
) -> list[tuple[int | None, float]]:
    """Greedy matching of detections to ground-truth boxes (see the module docstring); a
    ground-truth class None (an unlabelled box) matches a detection of any class.

    Returns:
        Per detection (in the given order): the index of its ground-truth box (None:
        unmatched) and the IoU with it (the best IoU with a free box of its class when
        unmatched, 0 when there is none).

    Example:
        >>> match_detections([(0, 0, 10, 10), (1, 0, 11, 10)], [1, 1], [0.6, 0.9],
        ...                  [(0, 0, 10, 10)], [1])
        [(None, 0.0), (0, 0.8181818181818182)]
    """
    result: list[tuple[int | None, float]] = [(None, 0.0)] * len(boxes)
    if not len(boxes):
        return result
    ious = (
        np.asarray(box_iou(boxes, gt_boxes)).reshape(len(boxes), len(gt_boxes))
        if len(gt_boxes)
        else np.zeros((len(boxes), 0))
    )
    free = np.ones(len(gt_boxes), dtype=bool)
    order = sorted(range(len(boxes)), key=lambda d: (-float(scores[d]), d))
    for d in order:
        same = np.array([c is None or int(c) == int(classes[d]) for c in gt_classes], dtype=bool)
        candidates = free & same
        if not candidates.any():
            continue
        row = np.where(candidates, ious[d], -1.0)
        best = int(np.argmax(row))
        if row[best] >= iou_threshold:
            free[best] = False
            result[d] = (best, float(row[best]))
        else:
            result[d] = (None, float(max(row[best], 0.0)))
    return result


@dataclass(frozen=True)
class DetectionEvaluateTask(EvaluateTask):
    """Measure the maps of a detector's detections on annotated images (see the module
    docstring).

    Attributes:
        model: the ``Classifier`` wrapping the detector (or a ``load_model`` spec, for Ray
            actors).
        methods: method names (canonical), one per method.
        metric_settings: the metrics (``detection_metrics``) and their settings
            (``make_settings``: steps, baselines, tolerance, batch size; ``score`` does not
            apply: the detection score is used as it is).
        layer: feature layer(s) of every method (default: ``explain_dense``'s).
        method_options: per method, the keyword arguments its class takes.
        source: the annotations' path, for the summary.
        max_pixels: the pixel budget of an image (larger ones are error records).
        score_threshold: explain (and evaluate) the detections scoring at least this.
        iou_threshold: the IoU with which a perturbed pass's detection is the same detection
            (``DetectionScores``).
        match_iou: the IoU with a ground-truth box of its class that matches a detection.
    """

    methods: tuple[str, ...]
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    match_iou: float = MATCH_IOU

    name: ClassVar[str] = "evaluate-detection"

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "task": "detection",
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "match_iou": self.match_iou,
        }

    def start(self, folder: OutputFolder | None) -> _DetectionWorker:
        return _DetectionWorker(self)

    def fold(self, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """The content of ``metrics.json`` from the records in input order::

            {"task": "detection", "n_images", "n_instances" (ground-truth boxes), "n_failed",
             "model", "annotations", "metrics": [...],
             "methods": {"gradcam": {"pointing_game": mean, "energy_pointing_game": mean,
                                     "deletion_auc": mean, "insertion_auc": mean,
                                     "n_detections", "n_matched", "n_unmatched", "n_missed",
                                     "n_gt", "recall"}},
             "curves": {"gradcam": {"deletion": mean curve, "insertion": mean curve}},
             "sanity": {}, "per_image": {"gradcam": [one row per matched detection]},
             "errors": [...], "settings": {...}}

        The means are over the matched detections of all images (None when there is none);
        ``recall`` is ``n_matched / n_gt``.
        """
        settings = self.metric_settings
        names = self.method_names
        metrics = list(settings.metrics)
        values: dict[str, dict[str, list[float]]] = {n: {k: [] for k in metrics} for n in names}
        curves: dict[str, dict[str, list[list[float]]]] = {
            n: {"deletion": [], "insertion": []} for n in names
        }
        counts = {
            n: dict.fromkeys(("detections", "matched", "unmatched", "missed"), 0) for n in names
        }
        per_image: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        errors: list[dict[str, Any]] = []
        n_images = n_gt = 0
        for record in records:
            if record["status"] != "ok":
                errors.append({"image": record["image"], "error": record["error"]})
                continue
            n_images += 1
            n_gt += record["n_gt"]
            for name in names:
                result = record["methods"][name]
                count = counts[name]
                count["detections"] += len(result["detections"])
                count["missed"] += len(result["missed"])
                for detection in result["detections"]:
                    if detection["gt"] is None:
                        count["unmatched"] += 1
                        continue
                    count["matched"] += 1
                    for key in metrics:
                        values[name][key].append(float(detection[key]))
                    for key in ("deletion", "insertion"):
                        if key in detection:
                            curves[name][key].append(detection[key])
                    per_image[name].append(_row(record, detection, metrics))
        methods: dict[str, dict[str, Any]] = {}
        for name in names:
            count = counts[name]
            methods[name] = {
                key: (float(np.mean(v)) if (v := values[name][key]) else None) for key in metrics
            }
            methods[name].update(
                n_detections=count["detections"],
                n_matched=count["matched"],
                n_unmatched=count["unmatched"],
                n_missed=count["missed"],
                n_gt=n_gt,
                recall=(count["matched"] / n_gt) if n_gt else None,
            )
        return {
            "task": "detection",
            "n_images": n_images,
            "n_instances": n_gt,
            "n_failed": len(errors),
            "model": self.model_name,
            "annotations": self.source,
            "metrics": metrics,
            "methods": methods,
            "curves": {
                name: {
                    key: np.mean(np.asarray(c, dtype=np.float64), axis=0).tolist()
                    for key, c in curves[name].items()
                    if c
                }
                for name in names
            },
            "sanity": {},
            "per_image": per_image,
            "errors": errors,
            "settings": {
                **settings.as_dict(),
                "score_threshold": self.score_threshold,
                "iou_threshold": self.iou_threshold,
                "match_iou": self.match_iou,
            },
        }


def _row(record: dict[str, Any], detection: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    """One ``per_image`` row: a matched detection and its values."""
    return {
        "image": record["image"],
        "name": Path(record["image"]).name,
        "label": detection["label"],
        "class": detection["class"],
        "score": detection["score"],
        "box": detection["box"],
        "gt_box": detection["gt_box"],
        "iou": detection["iou"],
        **{key: detection[key] for key in metrics},
    }


class _DetectionWorker:
    """The model, loaded once; batches of annotated images in, records out (one image at a
    time: a detector's targets belong to one image)."""

    def __init__(self, task: DetectionEvaluateTask) -> None:
        self.task = task
        self.classifier = worker_model(task.model)
        self.settings = task.metric_settings
        self.needs = {_NEEDS[name] for name in self.settings.metrics}

    def load(self, item: Item) -> Image.Image | ImageLoadError:
        """The decoded image, or the error that prevented it."""
        try:
            return load_annotated_image(item[1].annotation, self.task.max_pixels)
        except ImageLoadError as error:
            return error

    def process(
        self, batch: Sequence[Item], loaded: Sequence[Image.Image | ImageLoadError]
    ) -> list[dict[str, Any]]:
        records = []
        for (index, work), image in zip(batch, loaded, strict=True):
            annotation = work.annotation
            if isinstance(image, ImageLoadError):
                records.append(
                    {
                        "index": index,
                        "image": str(annotation.image),
                        "status": "error",
                        "error": str(image),
                    }
                )
                continue
            x = self.classifier.preprocess(image).to(
                device=self.classifier.device, dtype=self.classifier.dtype
            )
            methods, arrays = {}, {}
            for name in self.task.methods:
                explanation = explain_dense(
                    self.classifier,
                    x,
                    task="detection",
                    method=name,
                    layer=self.task.layer,
                    method_options=self.task.method_options.get(name, {}),
                    score_threshold=self.task.score_threshold,
                    iou_threshold=self.task.iou_threshold,
                    source=str(annotation.image),
                    size=image.size,
                )
                methods[name] = self._measure(explanation, x, work)
                arrays[name] = explanation.raw[0].cpu().numpy().astype(np.float32)
            records.append(
                {
                    "index": index,
                    "image": str(annotation.image),
                    "status": "ok",
                    "error": None,
                    "n_gt": len(annotation.boxes),
                    "methods": methods,
                    "arrays": arrays,
                }
            )
        return records

    def _measure(
        self, explanation: DenseExplanation, x: torch.Tensor, work: Work
    ) -> dict[str, Any]:
        """One method's detections of one image: matched, measured; and the missed boxes."""
        annotation = work.annotation
        objects = explanation.objects
        boxes = [_original_box(o["box"], explanation) for o in objects]
        gt_boxes = [list(map(float, b)) for b in annotation.boxes]
        ids = dict(zip(annotation.classes(), work.class_ids, strict=True))
        gt_classes = [ids[label] for label in annotation.labels]
        matches = match_detections(
            boxes,
            [o["class"] for o in objects],
            [o["score"] for o in objects],
            gt_boxes,
            gt_classes,
            self.task.match_iou,
        )
        detections = []
        matched = []
        for k, (found, box, (gt, iou)) in enumerate(zip(objects, boxes, matches, strict=True)):
            entry: dict[str, Any] = {
                "class": found["class"],
                "label": found["label"],
                "score": found["score"],
                "box": [round(v, 2) for v in box],
                "gt": gt,
                "gt_box": None if gt is None else gt_boxes[gt],
                "iou": round(iou, 6),
            }
            if gt is not None:
                matched.append(k)
                if "localization" in self.needs:
                    heat = explanation.heatmap(0, k, original=True)
                    entry["pointing_game"] = pointing_game(
                        heat, [gt_boxes[gt]], tolerance=self.settings.tolerance
                    )
                    entry["energy_pointing_game"] = energy_pointing_game(heat, [gt_boxes[gt]])
            detections.append(entry)
        if matched and self.needs & {"deletion", "insertion"}:
            for key, curve in self._curves(explanation, x, matched).items():
                for row, k in enumerate(matched):
                    detections[k][key] = curve[row].tolist()
                    detections[k][f"{key}_auc"] = float(auc(curve[row])[0])
        taken = {d["gt"] for d in detections if d["gt"] is not None}
        missed = [
            {"gt": g, "label": label, "box": gt_boxes[g]}
            for g, label in enumerate(annotation.labels)
            if g not in taken
        ]
        return {"detections": detections, "missed": missed}

    def _curves(
        self, explanation: DenseExplanation, x: torch.Tensor, matched: list[int]
    ) -> dict[str, np.ndarray]:
        """Deletion and insertion curves of the matched detections' scores: one copy of the
        image per detection, perturbed in the order of its map, scored by ``DetectionScores``
        (mode ``"score"``) as the faithfulness metrics score a class."""
        objects = explanation.objects
        scores = DetectionScores(
            self.classifier.module,
            torch.tensor([o["box"] for o in objects], dtype=torch.float32),
            [o["class"] for o in objects],
            iou_threshold=self.task.iou_threshold,
            mode="score",
        ).to(x.device)
        copies = x.expand(len(matched), *x.shape[1:])
        saliency = explanation.maps[0, matched]
        targets = torch.tensor(matched, dtype=torch.long)
        common = dict(steps=self.settings.steps, batch_size=self.settings.batch_size, score="logit")
        curves = {}
        if "deletion" in self.needs:
            curves["deletion"] = deletion_curve(
                scores,
                copies,
                saliency,
                targets,
                baseline=self.settings.deletion_baseline,
                **common,
            )
        if "insertion" in self.needs:
            curves["insertion"] = insertion_curve(
                scores,
                copies,
                saliency,
                targets,
                baseline=self.settings.insertion_baseline,
                **common,
            )
        return curves


def _original_box(box: Sequence[float], explanation: DenseExplanation) -> list[float]:
    """A box in input pixels -> the original image's pixels (floats; the same mapping as
    ``camlens.localize.scale_box``, without rounding)."""
    height, width = explanation.input_size
    original_w, original_h = explanation.original_size(0)
    sx, sy = original_w / width, original_h / height
    x0, y0, x1, y1 = (float(v) for v in box)
    return [
        min(original_w, max(0.0, x0 * sx)),
        min(original_h, max(0.0, y0 * sy)),
        min(original_w, max(0.0, x1 * sx)),
        min(original_h, max(0.0, y1 * sy)),
    ]
