"""``camlens.evaluate``: how good are a model's heat maps on an annotated data set?

For every annotated image and every method, camlens computes the maps of the model's top-1
class and of every annotated class in one call of the method, then:

* **localisation**, on the annotated classes' maps at the original image size (boxes are in
  original pixels): MaxBoxAcc, MaxBoxAccV2, GT-known localisation at Zhou's threshold,
  pointing game, energy-based pointing game, and PxAP / peak pixel IoU when masks are given;
  top-1 localisation on the top-1 class's map;
* **faithfulness**, on the top-1 class's map at the model's input size (the decision the
  model made): deletion and insertion AUC, Average Drop, Increase in Confidence, Average Gain
  and, on request, ROAD;
* **sanity**, on request: Adebayo's cascading randomisation on the first few images.

An image with several annotated classes contributes one *instance* per class to the
class-wise metrics; top-1 localisation and the faithfulness metrics count each image once.
An annotation without a class (``None``: mask folders without class subfolders) is evaluated
on the model's top-1 class, which then counts as right for top-1 localisation.

How it runs: the images go through the model in batches, and each image becomes one small
JSON *record*, what the summary needs of it and never a map::

    {"index": 3, "image": "a.png", "status": "ok", "error": null,
     "methods": {"cam": {"predicted": 0, "predicted_label": "red", "top1_loc": true,
                         "instances": [{"label": "red", "class": 0, "ious": [...],
                                        "gt_known_loc": true, "pointing_game": true,
                                        "energy_pointing_game": 0.93}],
                         "deletion": [...], "insertion": [...], "full": 0.9, "masked": 0.7}}}

(``ious``: the IoU at every map threshold; with the metrics that need them, ``ious_all`` per
instance for MaxBoxAccV2, ``road_morf`` / ``road_lerf`` scores, and ``pixels``: PxAP's
object/background histograms. An unreadable image: ``status`` ``"error"``, no ``methods``.)
The data-set metrics are folded from the records in input order, so memory grows with the
number of images by a few numbers each, and the records can be made anywhere: in this process
(``engine="local"``) or on Ray actors (``engine="ray"``, see ``camlens.ray_engine``), with the
same batches and the same numbers. With ``out_dir`` they are appended to
``OUT/evaluation.jsonl`` as each batch completes, so a run killed at any moment continues with
``resume=True``: a torn last line is dropped, images already recorded are skipped, and the
records are put back in input order before ``metrics.json`` is folded from all of them.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from camlens.api import make_method
from camlens.errors import ConfigError
from camlens.explanation import normalize_maps
from camlens.io import ImageLoadError, load_image
from camlens.io.annotations import Annotation, load_annotations
from camlens.localize import box_from_map
from camlens.methods import METHODS, CAMMethod, get_method
from camlens.metrics import faithfulness as faith
from camlens.metrics import localization as loc
from camlens.metrics.sanity import cascading_randomization
from camlens.models import Classifier, load_model
from camlens.runner import chunks, iter_jsonl, prefetched, prepare_output, record_run_settings
from camlens.targets import class_index
from camlens.writers import JsonlWriter, atomic_path, write_json

__all__ = [
    "DEFAULT_METRICS",
    "ENGINES",
    "HIGHER_IS_BETTER",
    "METRICS",
    "OUTPUT_ENTRIES",
    "RECORDS_FILE",
    "evaluate",
    "make_methods",
    "resolve_metrics",
]

#: The per-image records of a run with ``out_dir``: one JSON object per line and annotated image.
RECORDS_FILE = "evaluation.jsonl"
#: The settings of the run that wrote the records (a resume must use the same).
SETTINGS_FILE = "evaluation.json"
METRICS_FILE = "metrics.json"
#: Everything ``camlens evaluate`` writes into its output folder (what ``overwrite`` removes).
OUTPUT_ENTRIES = (
    METRICS_FILE,
    "report.html",
    "curves",
    "gallery",
    RECORDS_FILE,
    SETTINGS_FILE,
    "samples",
)
ENGINES = ("local", "ray")

#: Every metric ``evaluate`` can report, with a one-line definition (report glossary).
METRICS: dict[str, str] = {
    "maxboxacc": "MaxBoxAcc: best share of images whose largest-region box has IoU >= 0.5 "
    "with a ground-truth box, over map thresholds 0..0.99 (Choe et al. 2020)",
    "maxboxacc_v2": "MaxBoxAccV2: as MaxBoxAcc with boxes of all regions, averaged over IoU "
    "0.3, 0.5, 0.7 (Choe et al. 2022)",
    "top1_loc": "top-1 localisation: the top-1 class is right and its map's box (Zhou's "
    "threshold) has IoU >= 0.5 with a box of that class (Zhou et al. 2016)",
    "gt_known_loc": "GT-known localisation: the annotated class's box at Zhou's threshold has "
    "IoU >= 0.5",
    "pointing_game": "pointing game: the map's peak lies within the tolerance (15 px) of a "
    "box of the class (Zhang et al. 2016)",
    "energy_pointing_game": "energy-based pointing game: share of the map's mass inside the "
    "class's boxes (Wang et al. 2020)",
    "pxap": "PxAP: area under the pixel precision-recall curve against masks (Choe et al.)",
    "mask_iou": "peak pixel IoU between the thresholded map and the masks, best threshold",
    "deletion_auc": "deletion AUC: class probability while the most salient pixels are "
    "removed (lower is better; Petsiuk et al. 2018)",
    "insertion_auc": "insertion AUC: class probability while the most salient pixels are put "
    "back into a blurred image (higher is better)",
    "average_drop": "Average Drop: mean relative drop of the class probability on image x map "
    "(lower is better; Chattopadhay et al. 2018)",
    "increase_in_confidence": "Increase in Confidence: share of images whose probability rises "
    "on image x map",
    "average_gain": "Average Gain: mean relative gain of the probability on image x map "
    "(Zhang et al. 2023)",
    "road_morf": "ROAD MoRF: mean probability after removing 10..90 % most relevant pixels "
    "with noisy linear imputation (lower is better; Rong et al. 2022)",
    "road_lerf": "ROAD LeRF: the same removing the least relevant pixels (higher is better)",
    "road_combined": "ROAD combined: (LeRF - MoRF) / 2 (higher is better)",
    "sanity_spearman": "sanity: rank correlation of maps of the trained and the fully "
    "randomised model (lower is better; Adebayo et al. 2018)",
    "sanity_ssim": "sanity: SSIM of maps of the trained and the fully randomised model "
    "(lower is better)",
}

#: Whether a larger value is better, per metric (for the report's highlighting).
HIGHER_IS_BETTER: dict[str, bool] = {
    **dict.fromkeys(METRICS, True),
    "deletion_auc": False,
    "average_drop": False,
    "road_morf": False,
    "sanity_spearman": False,
    "sanity_ssim": False,
}

_GROUPS: dict[str, tuple[str, ...]] = {
    "localization": (
        "maxboxacc",
        "maxboxacc_v2",
        "top1_loc",
        "gt_known_loc",
        "pointing_game",
        "energy_pointing_game",
        "pxap",
        "mask_iou",
    ),
    "faithfulness": (
        "deletion_auc",
        "insertion_auc",
        "average_drop",
        "increase_in_confidence",
        "average_gain",
    ),
    "deletion": ("deletion_auc",),
    "insertion": ("insertion_auc",),
    "confidence": ("average_drop", "increase_in_confidence", "average_gain"),
    "mask": ("pxap", "mask_iou"),
    "road": ("road_morf", "road_lerf", "road_combined"),
    "sanity": ("sanity_spearman", "sanity_ssim"),
}
_GROUPS["all"] = tuple(METRICS)

#: What ``evaluate`` computes when ``metrics`` is not given: localisation and the fast
#: faithfulness metrics (ROAD and the sanity check take much longer; ask for them).
DEFAULT_METRICS: tuple[str, ...] = _GROUPS["localization"] + _GROUPS["faithfulness"]


def resolve_metrics(metrics: Sequence[str] | str | None) -> list[str]:
    """Metric names (or groups: localization, faithfulness, confidence, deletion, insertion,
    mask, road, sanity, all) -> the metric keys, in canonical order.

    Example:
        >>> resolve_metrics("maxboxacc,road")
        ['maxboxacc', 'road_morf', 'road_lerf', 'road_combined']
    """
    if metrics is None:
        return list(DEFAULT_METRICS)
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    chosen: set[str] = set()
    for raw in names:
        name = raw.strip().lower().replace("-", "_")
        if not name:
            continue
        if name in _GROUPS:
            chosen.update(_GROUPS[name])
        elif name in METRICS:
            chosen.add(name)
        else:
            raise ConfigError(
                f"unknown metric {raw!r}; choose from {', '.join(METRICS)} "
                f"or the groups {', '.join(_GROUPS)}"
            )
    if not chosen:
        raise ConfigError("no metric selected")
    return [name for name in METRICS if name in chosen]


@dataclass(frozen=True)
class _Settings:
    metrics: list[str]
    batch_size: int
    steps: int
    deletion_baseline: str
    insertion_baseline: str
    score: str
    tolerance: float
    threshold: float
    thresholds: np.ndarray
    road_fractions: tuple[float, ...]
    seed: int

    def wants(self, *names: str) -> bool:
        return any(name in self.metrics for name in names)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "steps": self.steps,
            "deletion_baseline": self.deletion_baseline,
            "insertion_baseline": self.insertion_baseline,
            "score": self.score,
            "pointing_tolerance_px": self.tolerance,
            "box_threshold": self.threshold,
            "map_thresholds": [float(t) for t in self.thresholds],
            "road_fractions": list(self.road_fractions),
            "seed": self.seed,
        }


#: One unit of work: (index in the annotation list, its annotation, its class ids).
WorkItem = tuple[int, Annotation, list[int | None]]


def evaluate(
    model: Classifier | nn.Module | str,
    annotations: str | os.PathLike | Sequence[Annotation],
    *,
    methods: Sequence[str | CAMMethod] | str = ("cam", "gradcam"),
    metrics: Sequence[str] | str | None = None,
    image_root: str | os.PathLike | None = None,
    layer: str | None = None,
    batch_size: int = 16,
    steps: int = 100,
    deletion_baseline: str = "zero",
    insertion_baseline: str = "blur",
    score: str = "prob",
    tolerance: float = 15.0,
    threshold: float = 0.2,
    thresholds: Sequence[float] = loc.DEFAULT_THRESHOLDS,
    road_fractions: Sequence[float] = faith.ROAD_FRACTIONS,
    sanity_images: int = 8,
    sanity_stages: int | Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Score heat-map methods on an annotated data set.

    Parameters:
        model: a ``Classifier``, a spec for ``load_model`` or an ``nn.Module``.
        annotations: a path for ``load_annotations`` (CSV, COCO JSON, VOC XML, mask folder) or
            a list of ``Annotation``. Labels are class names of the model (case-insensitive)
            or class ids.
        methods: method names (``camlens.METHODS``) or method instances (reused, e.g. to
            draw the report's gallery without finding the layer again), a list or a
            comma-separated string; ``"all"`` runs every registered method.
        metrics: metric names or groups (see :func:`resolve_metrics`); default
            :data:`DEFAULT_METRICS`. PxAP and mask IoU need masks.
        image_root: folder that relative image paths of ``annotations`` refer to.
        layer: feature layer for every method (default: found automatically).
        batch_size: images per method call, and perturbed inputs per forward pass. Batches
            are consecutive slices of the annotation list, whatever the engine and however
            often the run was resumed, so the numbers do not depend on either.
        steps: deletion/insertion steps (the curves have ``steps + 1`` points).
        deletion_baseline, insertion_baseline: ``"zero"`` or ``"blur"`` (RISE's defaults).
        score: ``"prob"`` (softmax) or ``"logit"`` for the faithfulness metrics.
        tolerance: pointing-game tolerance in original-image pixels (15 in the paper).
        threshold: Zhou's box threshold for top-1 and GT-known localisation.
        thresholds: the map-threshold grid of MaxBoxAcc and PxAP.
        road_fractions: fractions of pixels ROAD removes.
        sanity_images: how many images (the first ones) the sanity check uses.
        sanity_stages: stages of the sanity check (see ``cascading_randomization``).
        seed: seed of ROAD's noise and of the sanity check's re-initialisation.
        progress: show a progress bar on stderr (images done).
        out_dir: write ``evaluation.json`` (the settings), ``evaluation.jsonl`` (one record per
            annotated image, appended as each batch completes) and ``metrics.json`` (the
            returned dict) there. A non-empty folder is refused unless ``resume`` or
            ``overwrite``. Without ``out_dir`` the records are kept in memory.
        resume: continue an interrupted run in ``out_dir``: a torn last line is dropped,
            images already recorded are skipped, the rest are computed, and the metrics are
            folded from all records. The settings must equal the interrupted run's
            (``ConfigError`` naming those that differ).
        overwrite: remove camlens' previous outputs in ``out_dir`` (:data:`OUTPUT_ENTRIES`,
            never other files) and start again.
        engine: ``"local"`` (this process) or ``"ray"`` (a pool of Ray actors, each loading
            the model once; see ``camlens.ray_engine``). Both give the same numbers; the
            sanity check always runs here.
        ray_address: address of a running Ray cluster (default: start a local Ray).
        workers: Ray actors (default: one per CPU).

    Returns:
        A JSON-ready dict, the content of ``metrics.json``::

            {"n_images": ..., "n_instances": ..., "n_failed": ..., "model": ..., "metrics": [...],
             "methods": {"cam": {"maxboxacc": ..., "top1_loc": ..., ...}, ...},
             "curves": {"cam": {"deletion": [...], "insertion": [...], "boxacc": {...}}},
             "sanity": {"cam": [{"stage": "_fc", "spearman": ..., "ssim": ...}, ...]},
             "per_image": {"cam": [{"image": ..., "label": ..., "iou": ...}, ...]},
             "errors": [{"image": ..., "error": ...}], "settings": {...}}

        All metrics are fractions in [0, 1] (papers often print them x 100); a metric that
        cannot be computed (no masks, no image) is ``None``.

    Raises:
        ConfigError: unknown method, metric or engine, a label that is not a class of the
            model, bad annotations; a non-empty ``out_dir`` without ``resume`` or
            ``overwrite``; a resume with other settings.

    Example:
        >>> result = camlens.evaluate(
        ...     "efficientnet_lite0", "data/sample_boxes.csv", image_root="samples",
        ...     methods=["cam"], metrics="localization")  # the bundled photos, written first
        >>> round(result["methods"]["cam"]["maxboxacc"], 3)
        0.667
        >>> result = camlens.evaluate("efficientnet_lite0", "boxes.csv", out_dir="ev",
        ...                           engine="ray", resume=True)  # continue a killed run
    """
    classifier = model if isinstance(model, Classifier) else load_model(model)
    items, source = _annotations(annotations, image_root)
    settings = _make_settings(
        metrics, batch_size, steps, deletion_baseline, insertion_baseline, score, tolerance,
        threshold, thresholds, road_fractions, seed,
    )  # fmt: skip
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    work = [(i, item, _class_ids(item, classifier)) for i, item in enumerate(items)]
    instances = make_methods(classifier, methods, layer)
    job = _actor_job(model, classifier, methods, instances, layer, settings)
    store = _RecordStore(
        None if out_dir is None else Path(out_dir),
        _run_settings(classifier, items, instances, layer, settings),
    )
    done = store.open(resume=resume, overwrite=overwrite)
    store.append(
        _records(classifier, instances, work, done, job, engine, ray_address, workers, progress)
    )
    sanity = _sanity(
        classifier, items, store.records, instances, settings, sanity_images, layer, sanity_stages
    )
    result = _summarize(
        store.records, [m.name for m in instances], settings, classifier.name, source, sanity
    )
    store.write_metrics(result)
    return result


def _make_settings(
    metrics: Sequence[str] | str | None,
    batch_size: int,
    steps: int,
    deletion_baseline: str,
    insertion_baseline: str,
    score: str,
    tolerance: float,
    threshold: float,
    thresholds: Sequence[float],
    road_fractions: Sequence[float],
    seed: int,
) -> _Settings:
    for name, value in (("deletion", deletion_baseline), ("insertion", insertion_baseline)):
        if value not in ("zero", "blur"):
            raise ConfigError(f"{name}_baseline must be 'zero' or 'blur', got {value!r}")
    if score not in ("prob", "logit"):
        raise ConfigError(f"score must be 'prob' or 'logit', got {score!r}")
    return _Settings(
        metrics=resolve_metrics(metrics),
        batch_size=_positive(batch_size, "batch_size"),
        steps=_positive(steps, "steps"),
        deletion_baseline=deletion_baseline,
        insertion_baseline=insertion_baseline,
        score=score,
        tolerance=float(tolerance),
        threshold=float(threshold),
        thresholds=np.asarray(thresholds, dtype=np.float64),
        road_fractions=tuple(float(f) for f in road_fractions),
        seed=seed,
    )


def _annotations(
    annotations: str | os.PathLike | Sequence[Annotation], image_root: str | os.PathLike | None
) -> tuple[list[Annotation], str]:
    if isinstance(annotations, (str, os.PathLike)):
        return load_annotations(annotations, image_root=image_root), str(annotations)
    items = list(annotations)
    if not all(isinstance(item, Annotation) for item in items):
        raise ConfigError("annotations must be a path or a list of camlens Annotation objects")
    return items, "(in memory)"


def _positive(value: int, name: str) -> int:
    if int(value) < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return int(value)


def make_methods(
    classifier: Classifier, methods: Sequence[str | CAMMethod] | str, layer: str | None = None
) -> list[CAMMethod]:
    """Method instances for ``methods`` (names, instances, a comma-separated string or
    ``"all"``), one per distinct method, in order.

    Example:
        >>> [m.name for m in make_methods(model, "cam, gradcam,cam")]
        ['cam', 'gradcam']
    """
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    items = [n.strip() if isinstance(n, str) else n for n in items]
    items = [n for n in items if not isinstance(n, str) or n]
    if items == ["all"]:
        items = list(METHODS)
    if not items:
        raise ConfigError("no method selected")
    instances: dict[str, CAMMethod] = {}
    for item in items:
        if isinstance(item, CAMMethod):
            instances.setdefault(item.name, item)
            continue
        name = get_method(item).name
        if name not in instances:
            instances[name] = make_method(classifier, name, layer)
    return list(instances.values())


def _class_ids(item: Annotation, classifier: Classifier) -> list[int | None]:
    """Class id of each distinct label of ``item`` (None for unlabelled)."""
    ids = []
    for label in item.classes():
        if label is None:
            ids.append(None)
            continue
        text = label.strip()
        if text.isdigit() and int(text) < max(len(classifier.labels), 1):
            ids.append(int(text))
            continue
        try:
            ids.append(class_index(text, classifier.labels))
        except ConfigError as error:
            raise ConfigError(
                f"{item.source_of(label)}: label {label!r} is not a class of model "
                f"{classifier.name!r}: {error} Labels must be the model's class names or ids."
            ) from None
    return ids


def _targets_fn(ids_per_image: list[list[int | None]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Target columns: [top-1, annotated class 1, ...], unlabelled or padding -> top-1."""
    width = max(len(ids) for ids in ids_per_image)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        top1 = logits.argmax(dim=1).tolist()
        rows = []
        for ids, best in zip(ids_per_image, top1, strict=True):
            row = [best] + [best if c is None else c for c in ids]
            rows.append(row + [best] * (width + 1 - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    return pick


# --- per-image records ---------------------------------------------------------------------


class _BatchEvaluator:
    """Turns batches of annotated images into records (see the module docstring): load,
    preprocess, run every method once per batch, measure. Used in-process by the local engine
    and by each actor of the Ray engine."""

    def __init__(
        self, classifier: Classifier, methods: Sequence[CAMMethod], settings: _Settings
    ) -> None:
        self.classifier = classifier
        self.methods = list(methods)
        self.settings = settings

    def records(self, batch: Sequence[WorkItem]) -> list[dict[str, Any]]:
        """One record per item of ``batch``, in order."""
        return self.measure(batch, [self.load(work) for work in batch])

    @staticmethod
    def load(work: WorkItem) -> Image.Image | ImageLoadError:
        """The decoded image of one item, or the error that prevented it."""
        try:
            return _load(work[1])
        except ImageLoadError as error:
            return error

    def measure(
        self, batch: Sequence[WorkItem], images: Sequence[Image.Image | ImageLoadError]
    ) -> list[dict[str, Any]]:
        """The records of ``batch`` from its ``images`` (as ``load`` returns them), in order."""
        records: dict[int, dict[str, Any]] = {}
        loaded: list[tuple[WorkItem, Image.Image]] = []
        for work, image in zip(batch, images, strict=True):
            if isinstance(image, ImageLoadError):
                records[work[0]] = _error_record(work[0], work[1], str(image))
            else:
                loaded.append((work, image))
        if loaded:
            x = self.classifier.preprocess([image for _, image in loaded])
            measured = {method.name: self._measure(method, x, loaded) for method in self.methods}
            for row, ((index, item, _), _) in enumerate(loaded):
                records[index] = {
                    "index": index,
                    "image": str(item.image),
                    "status": "ok",
                    "error": None,
                    "methods": {name: values[row] for name, values in measured.items()},
                }
        return [records[index] for index, _, _ in batch]

    def _measure(
        self, method: CAMMethod, x: torch.Tensor, loaded: list[tuple[WorkItem, Image.Image]]
    ) -> list[dict[str, Any]]:
        """Per image of the batch: what the summary needs of ``method``."""
        result = method.run(x, _targets_fn([ids for (_, _, ids), _ in loaded]))
        raw, targets = result.raw.cpu(), result.targets.cpu()
        values = [
            _localize(self.classifier, raw[row], targets[row], item, image.size, self.settings)
            for row, ((_, item, _), image) in enumerate(loaded)
        ]
        maps = normalize_maps(raw[:, :1], tuple(x.shape[-2:]))[:, 0]
        faithful = _faithfulness(self.classifier, x, maps, targets[:, 0], self.settings)
        for key, array in faithful.items():
            for row, value in enumerate(values):
                value[key] = array[row].tolist()
        return values


def _load(item: Annotation) -> Image.Image:
    image = load_image(item.image)
    if item.size is not None and image.size != tuple(item.size):
        raise ImageLoadError(
            f"the image is {image.size[0]}x{image.size[1]} but was "
            f"{item.size[0]}x{item.size[1]} when the annotations were read"
        )
    return image


def _error_record(index: int, item: Annotation, message: str) -> dict[str, Any]:
    return {"index": index, "image": str(item.image), "status": "error", "error": message}


def _localize(
    classifier: Classifier,
    raw: torch.Tensor,
    targets: torch.Tensor,
    item: Annotation,
    size: tuple[int, int],
    settings: _Settings,
) -> dict[str, Any]:
    """One image's localisation values: per annotated class, the IoUs at every map threshold
    and the box, point and energy values; the top-1 hit; the pixel histograms (masks)."""
    width, height = size
    predicted = int(targets[0])
    top_map = normalize_maps(raw[None, :1], (height, width))[0, 0].numpy()
    masks = item.class_masks() if settings.wants("pxap", "mask_iou") else {}
    pixels: loc.PixelPrecisionRecall | None = None
    instances, gt_classes, gt_boxes = [], [], []
    for column, label in enumerate(item.classes(), start=1):
        class_id = int(targets[column])
        boxes = item.boxes_for(label)
        gt_classes += [class_id] * len(boxes)
        gt_boxes += boxes
        heatmap = (
            top_map
            if class_id == predicted
            else normalize_maps(raw[None, column : column + 1], (height, width))[0, 0].numpy()
        )
        mask = item.mask_for(label) if masks else None
        if mask is not None:
            if mask.shape != (height, width):
                raise ConfigError(
                    f"{item.source_of(label)}: mask is {mask.shape[1]}x{mask.shape[0]} but the "
                    f"image is {width}x{height}"
                )
            if pixels is None:
                pixels = loc.PixelPrecisionRecall(settings.thresholds)
            pixels.add(heatmap, mask)
        box = box_from_map(heatmap, settings.threshold)
        ious, ious_all = loc.threshold_ious_both(heatmap, boxes, settings.thresholds)
        instance = {
            "label": label,
            "class": class_id,
            "ious": ious.tolist(),
            "gt_known_loc": box is not None and float(loc.box_iou([box], boxes).max()) >= 0.5,
            "pointing_game": loc.pointing_game(heatmap, boxes, tolerance=settings.tolerance),
            "energy_pointing_game": loc.energy_pointing_game(heatmap, boxes),
        }
        if settings.wants("maxboxacc_v2"):
            instance["ious_all"] = ious_all.tolist()
        instances.append(instance)
    if None in item.classes():
        gt_classes = [predicted if c is None else c for c in gt_classes]
    top_box = box_from_map(top_map, settings.threshold)
    values = {
        "predicted": predicted,
        "predicted_label": classifier.label(predicted),
        "top1_loc": loc.top1_localization(predicted, top_box, gt_classes, gt_boxes),
        "instances": instances,
    }
    if pixels is not None:
        values["pixels"] = {
            "object": pixels.object_hist.astype(np.int64).tolist(),
            "background": pixels.background_hist.astype(np.int64).tolist(),
            "n": pixels.n_images,
        }
    return values


def _faithfulness(
    classifier: Classifier,
    x: torch.Tensor,
    maps: torch.Tensor,
    top1: torch.Tensor,
    settings: _Settings,
) -> dict[str, np.ndarray]:
    """The batch's faithfulness values, one row per image: ``deletion`` and ``insertion``
    curves, ``full`` and ``masked`` scores, ``road_morf`` and ``road_lerf`` scores."""
    common = {"batch_size": settings.batch_size, "score": settings.score}
    values: dict[str, np.ndarray] = {}
    if settings.wants("deletion_auc"):
        values["deletion"] = faith.deletion_curve(
            classifier, x, maps, top1, steps=settings.steps, baseline=settings.deletion_baseline,
            **common,
        )  # fmt: skip
    if settings.wants("insertion_auc"):
        values["insertion"] = faith.insertion_curve(
            classifier, x, maps, top1, steps=settings.steps, baseline=settings.insertion_baseline,
            **common,
        )  # fmt: skip
    if settings.wants("average_drop", "increase_in_confidence", "average_gain"):
        values["full"], values["masked"] = faith.masked_scores(classifier, x, maps, top1, **common)
    if settings.wants("road_morf", "road_lerf", "road_combined"):
        for order in ("morf", "lerf"):
            values[f"road_{order}"] = faith.road_scores(
                classifier, x, maps, top1, order=order, fractions=settings.road_fractions,
                seed=settings.seed, **common,
            )  # fmt: skip
    return values


# --- engines ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ActorJob:
    """What each Ray actor needs to build its ``_BatchEvaluator``: a model spec it loads itself
    or the ``Classifier``, and method names or instances (pickled together with the
    ``Classifier``, so that they share its module)."""

    model: Classifier | str
    methods: tuple[str | CAMMethod, ...]
    layer: str | None
    settings: _Settings


def _actor_job(
    model: Classifier | nn.Module | str,
    classifier: Classifier,
    requested: Sequence[str | CAMMethod] | str,
    instances: list[CAMMethod],
    layer: str | None,
    settings: _Settings,
) -> _ActorJob:
    given_instances = not isinstance(requested, str) and any(
        isinstance(m, CAMMethod) for m in requested
    )
    if given_instances:
        return _ActorJob(classifier, tuple(instances), layer, settings)
    from camlens.ray_engine import model_for_actors

    spec = model if isinstance(model, str) else model_for_actors(classifier)
    return _ActorJob(spec, tuple(m.name for m in instances), layer, settings)


class _RayEvaluator:
    """Ray actor: one ``_BatchEvaluator``; rows of pickled batches in, JSON records out."""

    def __init__(self, job: _ActorJob) -> None:
        torch.set_num_threads(1)
        classifier = load_model(job.model) if isinstance(job.model, str) else job.model
        methods = make_methods(classifier, list(job.methods), job.layer)
        self.evaluator = _BatchEvaluator(classifier, methods, job.settings)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [
            json.dumps(record)
            for payload in rows["batch"]
            for record in self.evaluator.records(pickle.loads(payload))
        ]
        return {"record": np.array(records, dtype=object)}


def _records(
    classifier: Classifier,
    instances: list[CAMMethod],
    work: list[WorkItem],
    done: set[int],
    job: _ActorJob,
    engine: str,
    ray_address: str | None,
    workers: int | None,
    progress: bool,
) -> Iterator[dict[str, Any]]:
    """The records of the images not ``done``, in input order.

    Batches are the consecutive slices of ``batch_size`` annotated images, always the same
    ones: a batch that is partly done is computed whole (the records already there are not
    written again), so that every image is measured in the same company as in an
    uninterrupted run (ROAD's noise depends on an image's position in its batch). The local
    engine decodes the next batch in threads while the current one is measured
    (``runner.prefetched``).
    """
    batches = [
        b for b in chunks(work, job.settings.batch_size) if any(i not in done for i, *_ in b)
    ]
    todo = sum(1 for b in batches for i, *_ in b if i not in done)
    if engine == "ray" and batches:
        from camlens.ray_engine import ordered_map_batches

        # Pickled: annotations carry paths, tuples and lazy mask readers, not table columns.
        rows = [{"batch": pickle.dumps(batch)} for batch in batches]
        outputs = ordered_map_batches(
            rows, _RayEvaluator, {"job": job}, 1, address=ray_address, workers=workers
        )
        computed = (json.loads(r) for output in outputs for r in output["record"])
    else:
        evaluator = _BatchEvaluator(classifier, instances, job.settings)
        computed = (
            record
            for batch, images in prefetched(batches, evaluator.load)
            for record in evaluator.measure(batch, images)
        )
    bar = tqdm(total=todo, desc="images", unit="img", file=sys.stderr, disable=not progress)
    with bar:
        for record in computed:
            if record["index"] not in done:
                bar.update(1)
                yield record


# --- the output folder -----------------------------------------------------------------------


class _RecordStore:
    """Where the records go: ``out_dir/evaluation.jsonl`` (with ``evaluation.json``, the run's
    settings), or a list in memory when there is no output folder."""

    def __init__(self, out_dir: Path | None, settings: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.path = None if out_dir is None else out_dir / RECORDS_FILE
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self._kept: list[dict[str, Any]] = []

    def open(self, *, resume: bool, overwrite: bool) -> set[int]:
        """Prepare the folder; return the indices of the images already recorded."""
        if self.out_dir is None:
            if resume or overwrite:
                raise ConfigError("resume and overwrite apply to an output folder; give out_dir")
            return set()
        done = prepare_output(
            self.out_dir, resume=resume, overwrite=overwrite, entries=OUTPUT_ENTRIES,
            results=RECORDS_FILE, key="index",
        )  # fmt: skip
        record_run_settings(
            self.out_dir, SETTINGS_FILE, self.settings, resume=resume, has_results=bool(done)
        )
        return done

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Store ``records`` (each line is written and flushed as it comes), then put the file
        in input order."""
        if self.path is None:
            self._kept.extend(records)
            return
        with JsonlWriter(self.path, append=True) as writer:
            for record in records:
                writer.write(record)
        _put_in_order(self.path)

    def records(self) -> Iterator[dict[str, Any]]:
        """The records, in input order (read from the file one at a time)."""
        return iter(self._kept) if self.path is None else iter_jsonl(self.path)

    def write_metrics(self, result: dict[str, Any]) -> None:
        if self.out_dir is not None:
            write_json(self.out_dir / METRICS_FILE, result)


def _run_settings(
    classifier: Classifier,
    items: Sequence[Annotation],
    instances: Sequence[CAMMethod],
    layer: str | None,
    settings: _Settings,
) -> dict[str, Any]:
    """Everything the records depend on (a resume must match it)."""
    content = [[str(a.image), [list(b) for b in a.boxes], a.labels] for a in items]
    digest = hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()
    return {
        "model": classifier.name,
        "annotations_sha256": digest,
        "n_annotated_images": len(items),
        "methods": [m.name for m in instances],
        "layer": layer,
        "metrics": settings.metrics,
        **settings.as_dict(),
    }


def _put_in_order(path: Path) -> None:
    """Rewrite ``path`` in input order with one record per image (the last one written), if
    it is not already so.

    The file is normally in order already: each run appends its records in input order, and a
    resume continues after the records of the interrupted run. Otherwise its sorted stretches
    are merged one line at a time, in bounded memory, into a new file that replaces it.
    """
    starts, previous, size = [0], None, 0
    for index, line in _indexed_lines(path):
        if previous is not None and index <= previous:
            starts.append(size)
        previous, size = index, size + len(line)
    if len(starts) == 1:
        return
    runs = [_indexed_lines(path, start, end) for start, end in pairwise([*starts, size])]
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        pending: tuple[int, bytes] | None = None
        for entry in heapq.merge(*runs, key=lambda e: e[0]):
            if pending is not None and pending[0] != entry[0]:
                out.write(pending[1])
            pending = entry
        if pending is not None:
            out.write(pending[1])


def _indexed_lines(
    path: Path, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """``(record index, line)`` for the lines of ``path`` between byte offsets."""
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        for line in handle:
            if end is not None and position >= end:
                return
            position += len(line)
            yield json.loads(line)["index"], line


def _sanity(
    classifier: Classifier,
    items: Sequence[Annotation],
    records: Callable[[], Iterable[dict[str, Any]]],
    instances: Sequence[CAMMethod],
    settings: _Settings,
    n_images: int,
    layer: str | None,
    stages: int | Sequence[str] | None,
) -> dict[str, list[dict]]:
    """Cascading randomisation of every method on the first ``n_images`` readable images (run
    here, whatever the engine: it re-initialises copies of the model)."""
    if not settings.wants("sanity_spearman", "sanity_ssim"):
        return {}
    images = []
    for record in records():
        if len(images) >= n_images:
            break
        if record["status"] == "ok":
            images.append(load_image(items[record["index"]].image))
    if not images:
        return {}
    x = classifier.preprocess(images)
    return {
        method.name: [
            stage.as_dict()
            for stage in cascading_randomization(
                classifier, x, method.name, layer=layer, stages=stages, seed=settings.seed
            )
        ]
        for method in instances
    }


# --- folding the records into the summary ------------------------------------------------------


class _MethodFold:
    """One method's data-set statistics, folded from its per-image values in input order.

    Holds counts and sums (box-accuracy hits per map threshold, the sum of the curves, the
    pixel histograms) and a few numbers per instance or image; never the per-threshold IoUs
    or curves of every image.
    """

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        n = len(settings.thresholds)
        self.n_instances = 0
        self.hits = {delta: np.zeros(n) for delta in (0.5,)}
        self.hits_v2 = {delta: np.zeros(n) for delta in loc.V2_IOU_THRESHOLDS}
        self.gt_known: list[bool] = []
        self.pointing: list[bool] = []
        self.energy: list[float] = []
        self.top1: list[bool] = []
        self.pixels: loc.PixelPrecisionRecall | None = None
        self.curve_sums: dict[str, np.ndarray] = {}
        self.areas: dict[str, list[float]] = {"deletion": [], "insertion": []}
        self.scores: dict[str, list] = {"full": [], "masked": [], "road_morf": [], "road_lerf": []}

    def add(self, values: dict[str, Any]) -> None:
        """Fold one image's values (a record's ``methods[name]``)."""
        for instance in values["instances"]:
            self.n_instances += 1
            ious = np.asarray(instance["ious"])
            for delta, hits in self.hits.items():
                hits += ious >= delta
            if "ious_all" in instance:
                ious_all = np.asarray(instance["ious_all"])
                for delta, hits in self.hits_v2.items():
                    hits += ious_all >= delta
            self.gt_known.append(instance["gt_known_loc"])
            self.pointing.append(instance["pointing_game"])
            self.energy.append(instance["energy_pointing_game"])
        self.top1.append(values["top1_loc"])
        if "pixels" in values:
            if self.pixels is None:
                self.pixels = loc.PixelPrecisionRecall(self.settings.thresholds)
            pixels = values["pixels"]
            self.pixels.add_counts(pixels["object"], pixels["background"], pixels["n"])
        for key in ("deletion", "insertion"):
            if key in values:
                curve = np.asarray(values[key])
                self.curve_sums[key] = self.curve_sums.get(key, 0) + curve
                self.areas[key].append(float(faith.auc(curve)[0]))
        for key, store in self.scores.items():
            if key in values:
                store.append(values[key])

    def summary(self) -> tuple[dict[str, Any], dict[str, Any], int]:
        """The metric values, the curves, and the best map threshold's index (MaxBoxAcc)."""
        settings, thresholds = self.settings, self.settings.thresholds
        values: dict[str, Any] = {}
        curves: dict[str, Any] = {}
        best_index = 0
        if self.n_instances:
            v1 = _box_accuracy(self.hits, self.n_instances, thresholds)
            best_index = int(np.argmax(v1.curves[0.5]))
            values["maxboxacc"] = v1.value
            values["maxboxacc_threshold"] = v1.best_thresholds[0.5]
            if settings.wants("maxboxacc"):
                curves["boxacc"] = {
                    "thresholds": _floats(thresholds),
                    "0.5": _floats(v1.curves[0.5]),
                }
            if settings.wants("maxboxacc_v2"):
                v2 = _box_accuracy(self.hits_v2, self.n_instances, thresholds)
                values["maxboxacc_v2"] = v2.value
                curves["boxacc_v2"] = {str(d): _floats(c) for d, c in v2.curves.items()}
            values["gt_known_loc"] = _mean(self.gt_known)
            values["pointing_game"] = _mean(self.pointing)
            values["energy_pointing_game"] = _mean(self.energy)
        values["top1_loc"] = _mean(self.top1)
        if self.pixels is not None:
            values["pxap"] = _finite(self.pixels.pxap)
            values["mask_iou"] = _finite(self.pixels.peak_iou)
        for key, total in self.curve_sums.items():
            values[f"{key}_auc"] = float(np.mean(self.areas[key]))
            curves[key] = _floats(total / len(self.areas[key]))
        if self.scores["full"]:
            full, masked = np.asarray(self.scores["full"]), np.asarray(self.scores["masked"])
            values["average_drop"] = faith.average_drop(full, masked)
            values["increase_in_confidence"] = faith.increase_in_confidence(full, masked)
            values["average_gain"] = faith.average_gain(full, masked)
        if self.scores["road_morf"]:
            morf = np.asarray(self.scores["road_morf"])
            lerf = np.asarray(self.scores["road_lerf"])
            values["road_morf"] = float(morf.mean())
            values["road_lerf"] = float(lerf.mean())
            values["road_combined"] = float((lerf.mean() - morf.mean()) / 2)
            curves["road"] = {
                "fractions": list(settings.road_fractions),
                "morf": _floats(morf.mean(axis=0)),
                "lerf": _floats(lerf.mean(axis=0)),
            }
        return values, curves, best_index


def _box_accuracy(hits: dict[float, np.ndarray], n: int, thresholds: np.ndarray) -> loc.MaxBoxAcc:
    """``MaxBoxAcc.from_ious`` from the counts of instances whose IoU reaches each IoU
    threshold at each map threshold (the same numbers, without keeping every IoU)."""
    curves = {delta: count / n for delta, count in hits.items()}
    best = {delta: int(np.argmax(curve)) for delta, curve in curves.items()}
    per_iou = {delta: float(curves[delta][i]) for delta, i in best.items()}
    return loc.MaxBoxAcc(
        value=float(np.mean(list(per_iou.values()))),
        per_iou=per_iou,
        best_thresholds={delta: float(thresholds[i]) for delta, i in best.items()},
        thresholds=thresholds,
        curves=curves,
    )


def _summarize(
    records: Callable[[], Iterable[dict[str, Any]]],
    names: Sequence[str],
    settings: _Settings,
    model: str,
    source: str,
    sanity: dict[str, list[dict]],
) -> dict[str, Any]:
    """The content of ``metrics.json``, folded from the records in input order.

    ``records`` returns a fresh iterator over them: they are read twice, once for the
    statistics and once for the per-image table (which needs MaxBoxAcc's best threshold).
    """
    folds = {name: _MethodFold(settings) for name in names}
    errors: list[dict[str, str]] = []
    n_images = 0
    for record in records():
        if record["status"] != "ok":
            errors.append({"image": record["image"], "error": record["error"]})
            continue
        n_images += 1
        for name, fold in folds.items():
            fold.add(record["methods"][name])
    methods, curves, best = {}, {}, {}
    for name, fold in folds.items():
        values, curves[name], best[name] = fold.summary()
        if sanity.get(name):
            values["sanity_spearman"] = sanity[name][-1]["spearman"]
            values["sanity_ssim"] = sanity[name][-1]["ssim"]
        methods[name] = {key: values.get(key) for key in settings.metrics}
        methods[name].update(_extras(values, settings))
    per_image: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for record in records():
        if record["status"] == "ok":
            for name in names:
                per_image[name] += _per_image(
                    record, record["methods"][name], best[name], settings.thresholds
                )
    first = next(iter(folds.values()), None)
    return {
        "n_images": n_images,
        "n_instances": first.n_instances if first else 0,
        "n_failed": len(errors),
        "model": model,
        "annotations": source,
        "metrics": settings.metrics,
        "methods": methods,
        "curves": curves,
        "sanity": sanity,
        "per_image": per_image,
        "errors": errors,
        "settings": settings.as_dict(),
    }


def _per_image(
    record: dict[str, Any], values: dict[str, Any], best_index: int, thresholds: np.ndarray
) -> list[dict[str, Any]]:
    """The ``per_image`` rows of one image for one method: one per annotated class, with the
    IoU at MaxBoxAcc's best map threshold and the image's deletion/insertion areas."""
    faithful = {
        f"{key}_auc": float(faith.auc(np.asarray(values[key]))[0])
        for key in ("deletion", "insertion")
        if key in values
    }
    return [
        {
            "image": record["image"],
            "name": Path(record["image"]).name,
            "label": instance["label"],
            "class": instance["class"],
            "predicted": values["predicted"],
            "predicted_label": values["predicted_label"],
            "iou": float(instance["ious"][best_index]),
            "iou_threshold_map": float(thresholds[best_index]),
            "gt_known_loc": instance["gt_known_loc"],
            "pointing_game": instance["pointing_game"],
            "energy_pointing_game": instance["energy_pointing_game"],
            **faithful,
        }
        for instance in values["instances"]
    ]


def _extras(values: dict[str, Any], settings: _Settings) -> dict[str, Any]:
    """Keys that accompany a metric: the best threshold of MaxBoxAcc."""
    if settings.wants("maxboxacc") and "maxboxacc_threshold" in values:
        return {"maxboxacc_threshold": values["maxboxacc_threshold"]}
    return {}


def _mean(values: Sequence[float | bool]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _floats(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]
