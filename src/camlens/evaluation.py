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
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from camlens.targets import class_index

__all__ = [
    "DEFAULT_METRICS",
    "HIGHER_IS_BETTER",
    "METRICS",
    "evaluate",
    "make_methods",
    "resolve_metrics",
]

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


@dataclass
class _Instance:
    """One (image, annotated class) pair."""

    image: str
    label: str | None
    class_id: int
    predicted: int
    ious: np.ndarray
    ious_all: np.ndarray
    gt_known: bool
    pointing: bool
    energy: float
    image_index: int


@dataclass
class _MethodState:
    """Everything accumulated for one method over the data set."""

    method: CAMMethod
    instances: list[_Instance] = field(default_factory=list)
    top1_hits: list[bool] = field(default_factory=list)
    pixels: loc.PixelPrecisionRecall | None = None
    deletion: list[np.ndarray] = field(default_factory=list)
    insertion: list[np.ndarray] = field(default_factory=list)
    full: list[np.ndarray] = field(default_factory=list)
    masked: list[np.ndarray] = field(default_factory=list)
    road_morf: list[np.ndarray] = field(default_factory=list)
    road_lerf: list[np.ndarray] = field(default_factory=list)


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
        batch_size: images per method call, and perturbed inputs per forward pass.
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
        progress: show a progress bar on stderr (images x methods done).

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
        ConfigError: unknown method or metric, a label that is not a class of the model, bad
            annotations.

    Example:
        >>> result = camlens.evaluate(
        ...     "efficientnet_lite0", "data/sample_boxes.csv", image_root="samples",
        ...     methods=["cam"], metrics="localization")  # the bundled photos, written first
        >>> round(result["methods"]["cam"]["maxboxacc"], 3)
        0.667
    """
    classifier = model if isinstance(model, Classifier) else load_model(model)
    items, source = _annotations(annotations, image_root)
    settings = _Settings(
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
    for name, value in (("deletion", deletion_baseline), ("insertion", insertion_baseline)):
        if value not in ("zero", "blur"):
            raise ConfigError(f"{name}_baseline must be 'zero' or 'blur', got {value!r}")
    if score not in ("prob", "logit"):
        raise ConfigError(f"score must be 'prob' or 'logit', got {score!r}")
    class_ids = [_class_ids(item, classifier) for item in items]
    states = {
        instance.name: _MethodState(instance)
        for instance in make_methods(classifier, methods, layer)
    }
    errors: list[dict[str, str]] = []
    kept: list[torch.Tensor] = []
    n_images = 0
    bar = tqdm(
        total=len(items) * len(states),
        desc="images x methods",
        unit="img",
        file=sys.stderr,
        disable=not progress,
    )
    with bar:
        for start in range(0, len(items), settings.batch_size):
            batch = list(range(start, min(start + settings.batch_size, len(items))))
            loaded = _load_batch(items, batch, errors)
            if loaded:
                indices = [i for i, _ in loaded]
                x = classifier.preprocess([image for _, image in loaded])
                for name, state in states.items():
                    bar.set_postfix_str(name)
                    _evaluate_batch(
                        classifier, state, x, loaded, items, class_ids, indices, settings
                    )
                    bar.update(len(loaded))
                room = sanity_images - sum(t.shape[0] for t in kept)
                if settings.wants("sanity_spearman", "sanity_ssim") and room > 0:
                    kept.append(x[:room])
                n_images += len(loaded)
            bar.update((len(batch) - len(loaded)) * len(states))
    sanity = {}
    if kept and settings.wants("sanity_spearman", "sanity_ssim"):
        x_sanity = torch.cat(kept)
        for name in states:
            stages = cascading_randomization(
                classifier, x_sanity, name, layer=layer, stages=sanity_stages, seed=seed
            )
            sanity[name] = [stage.as_dict() for stage in stages]
    return _summary(classifier, source, settings, states, sanity, errors, n_images)


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


def _load_batch(
    items: list[Annotation], batch: list[int], errors: list[dict[str, str]]
) -> list[tuple[int, Image.Image]]:
    loaded = []
    for i in batch:
        try:
            image = load_image(items[i].image)
        except ImageLoadError as error:
            errors.append({"image": str(items[i].image), "error": str(error)})
            continue
        if items[i].size is not None and image.size != tuple(items[i].size):
            errors.append(
                {
                    "image": str(items[i].image),
                    "error": f"the image is {image.size[0]}x{image.size[1]} but was "
                    f"{items[i].size[0]}x{items[i].size[1]} when the annotations were read",
                }
            )
            continue
        loaded.append((i, image))
    return loaded


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


def _evaluate_batch(
    classifier: Classifier,
    state: _MethodState,
    x: torch.Tensor,
    loaded: list[tuple[int, Image.Image]],
    items: list[Annotation],
    class_ids: list[list[int | None]],
    indices: list[int],
    settings: _Settings,
) -> None:
    result = state.method.run(x, _targets_fn([class_ids[i] for i in indices]))
    raw = result.raw.cpu()
    targets = result.targets.cpu()
    for row, (i, image) in enumerate(loaded):
        _localize(state, raw[row], targets[row], items[i], image.size, i, settings)
    top1 = targets[:, 0]
    maps = normalize_maps(raw[:, :1], tuple(x.shape[-2:]))[:, 0]
    _faithfulness(classifier, state, x, maps, top1, settings)


def _localize(
    state: _MethodState,
    raw: torch.Tensor,
    targets: torch.Tensor,
    item: Annotation,
    size: tuple[int, int],
    index: int,
    settings: _Settings,
) -> None:
    width, height = size
    predicted = int(targets[0])
    top_map = normalize_maps(raw[None, :1], (height, width))[0, 0].numpy()
    masks = item.class_masks() if settings.wants("pxap", "mask_iou") else {}
    gt_classes, gt_boxes = [], []
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
        box = box_from_map(heatmap, settings.threshold)
        ious, ious_all = loc.threshold_ious_both(heatmap, boxes, settings.thresholds)
        mask = item.mask_for(label) if masks else None
        if mask is not None and state.pixels is None:
            state.pixels = loc.PixelPrecisionRecall(settings.thresholds)
        if mask is not None:
            if mask.shape != (height, width):
                raise ConfigError(
                    f"{item.source_of(label)}: mask is {mask.shape[1]}x{mask.shape[0]} but the "
                    f"image is {width}x{height}"
                )
            state.pixels.add(heatmap, mask)
        state.instances.append(
            _Instance(
                image=str(item.image),
                label=label,
                class_id=class_id,
                predicted=predicted,
                ious=ious,
                ious_all=ious_all,
                gt_known=box is not None and float(loc.box_iou([box], boxes).max()) >= 0.5,
                pointing=loc.pointing_game(heatmap, boxes, tolerance=settings.tolerance),
                energy=loc.energy_pointing_game(heatmap, boxes),
                image_index=index,
            )
        )
    unlabelled = None in item.classes()
    top_box = box_from_map(top_map, settings.threshold)
    if unlabelled:
        gt_classes = [predicted if c is None else c for c in gt_classes]
    state.top1_hits.append(loc.top1_localization(predicted, top_box, gt_classes, gt_boxes))


def _faithfulness(
    classifier: Classifier,
    state: _MethodState,
    x: torch.Tensor,
    maps: torch.Tensor,
    top1: torch.Tensor,
    settings: _Settings,
) -> None:
    common = {"batch_size": settings.batch_size, "score": settings.score}
    if settings.wants("deletion_auc"):
        state.deletion.append(
            faith.deletion_curve(
                classifier,
                x,
                maps,
                top1,
                steps=settings.steps,
                baseline=settings.deletion_baseline,
                **common,
            )
        )
    if settings.wants("insertion_auc"):
        state.insertion.append(
            faith.insertion_curve(
                classifier,
                x,
                maps,
                top1,
                steps=settings.steps,
                baseline=settings.insertion_baseline,
                **common,
            )
        )
    if settings.wants("average_drop", "increase_in_confidence", "average_gain"):
        full, masked = faith.masked_scores(classifier, x, maps, top1, **common)
        state.full.append(full)
        state.masked.append(masked)
    if settings.wants("road_morf", "road_lerf", "road_combined"):
        for order, store in (("morf", state.road_morf), ("lerf", state.road_lerf)):
            store.append(
                faith.road_scores(
                    classifier,
                    x,
                    maps,
                    top1,
                    order=order,
                    fractions=settings.road_fractions,
                    seed=settings.seed,
                    **common,
                )
            )


def _summary(
    classifier: Classifier,
    source: str,
    settings: _Settings,
    states: dict[str, _MethodState],
    sanity: dict[str, list[dict]],
    errors: list[dict[str, str]],
    n_images: int,
) -> dict[str, Any]:
    methods, curves, per_image = {}, {}, {}
    for name, state in states.items():
        values, curves[name], per_image[name] = _method_summary(classifier, state, settings)
        if sanity.get(name):
            values["sanity_spearman"] = sanity[name][-1]["spearman"]
            values["sanity_ssim"] = sanity[name][-1]["ssim"]
        methods[name] = {key: values.get(key) for key in settings.metrics}
        methods[name].update(_extras(values, settings))
    first = next(iter(states.values()), None)
    return {
        "n_images": n_images,
        "n_instances": len(first.instances) if first else 0,
        "n_failed": len(errors),
        "model": classifier.name,
        "annotations": source,
        "metrics": settings.metrics,
        "methods": methods,
        "curves": curves,
        "sanity": sanity,
        "per_image": per_image,
        "errors": errors,
        "settings": settings.as_dict(),
    }


def _extras(values: dict[str, Any], settings: _Settings) -> dict[str, Any]:
    """Keys that accompany a metric: the best threshold of MaxBoxAcc."""
    if settings.wants("maxboxacc") and "maxboxacc_threshold" in values:
        return {"maxboxacc_threshold": values["maxboxacc_threshold"]}
    return {}


def _method_summary(
    classifier: Classifier, state: _MethodState, settings: _Settings
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    instances = state.instances
    thresholds = settings.thresholds
    values: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    best_index = 0
    if instances:
        v1 = loc.MaxBoxAcc.from_ious(np.stack([s.ious for s in instances]), thresholds)
        best_index = int(np.argmax(v1.curves[0.5]))
        values["maxboxacc"] = v1.value
        values["maxboxacc_threshold"] = v1.best_thresholds[0.5]
        if settings.wants("maxboxacc"):
            curves["boxacc"] = {
                "thresholds": _floats(thresholds),
                "0.5": _floats(v1.curves[0.5]),
            }
        if settings.wants("maxboxacc_v2"):
            v2 = loc.MaxBoxAcc.from_ious(
                np.stack([s.ious_all for s in instances]), thresholds, loc.V2_IOU_THRESHOLDS
            )
            values["maxboxacc_v2"] = v2.value
            curves["boxacc_v2"] = {str(d): _floats(c) for d, c in v2.curves.items()}
        values["gt_known_loc"] = _mean([s.gt_known for s in instances])
        values["pointing_game"] = _mean([s.pointing for s in instances])
        values["energy_pointing_game"] = _mean([s.energy for s in instances])
    values["top1_loc"] = _mean(state.top1_hits)
    if state.pixels is not None:
        values["pxap"] = _finite(state.pixels.pxap)
        values["mask_iou"] = _finite(state.pixels.peak_iou)
    faithful = _faithfulness_summary(state, settings, values, curves)
    records = [
        _record(classifier, s, best_index, thresholds, faithful.get(s.image_index, {}))
        for s in instances
    ]
    return values, curves, records


def _faithfulness_summary(
    state: _MethodState, settings: _Settings, values: dict[str, Any], curves: dict[str, Any]
) -> dict[int, dict[str, float]]:
    per_image: dict[int, dict[str, float]] = {}
    for key, store in (("deletion", state.deletion), ("insertion", state.insertion)):
        if store:
            curve = np.concatenate(store)
            areas = faith.auc(curve)
            values[f"{key}_auc"] = float(areas.mean())
            curves[key] = _floats(curve.mean(axis=0))
            for index, area in zip(_images_in_order(state), areas, strict=True):
                per_image.setdefault(index, {})[f"{key}_auc"] = float(area)
    if state.full:
        full, masked = np.concatenate(state.full), np.concatenate(state.masked)
        values["average_drop"] = faith.average_drop(full, masked)
        values["increase_in_confidence"] = faith.increase_in_confidence(full, masked)
        values["average_gain"] = faith.average_gain(full, masked)
    if state.road_morf:
        morf, lerf = np.concatenate(state.road_morf), np.concatenate(state.road_lerf)
        values["road_morf"] = float(morf.mean())
        values["road_lerf"] = float(lerf.mean())
        values["road_combined"] = float((lerf.mean() - morf.mean()) / 2)
        curves["road"] = {
            "fractions": list(settings.road_fractions),
            "morf": _floats(morf.mean(axis=0)),
            "lerf": _floats(lerf.mean(axis=0)),
        }
    return per_image


def _images_in_order(state: _MethodState) -> list[int]:
    return list(dict.fromkeys(s.image_index for s in state.instances))


def _record(
    classifier: Classifier,
    instance: _Instance,
    best_index: int,
    thresholds: np.ndarray,
    faithful: dict[str, float],
) -> dict[str, Any]:
    return {
        "image": instance.image,
        "name": Path(instance.image).name,
        "label": instance.label,
        "class": instance.class_id,
        "predicted": instance.predicted,
        "predicted_label": classifier.label(instance.predicted),
        "iou": float(instance.ious[best_index]),
        "iou_threshold_map": float(thresholds[best_index]),
        "gt_known_loc": instance.gt_known,
        "pointing_game": instance.pointing,
        "energy_pointing_game": instance.energy,
        **faithful,
    }


def _mean(values: Sequence[float | bool]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _floats(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]
