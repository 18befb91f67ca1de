"""The metric registry: every metric ``camlens evaluate`` reports, in one table.

A metric is one :class:`Metric` entry of :data:`REGISTRY`: its name, a one-line description
(the report's glossary), whether higher or lower is better, its groups (what ``--metrics``
accepts besides names), the per-image *measurements* it is folded from, and its *fold*: how
those per-image values become the data-set value.

How a run uses the table (``camlens.tasks.evaluate``):

1. ``process`` (the model runs): every chosen metric's measurements are taken per image (or
   per annotated class of an image, an *instance*) and stored in the image's record.
2. ``fold`` (pure): each chosen metric's :class:`Fold` receives every image's values, in
   input order, and gives the value (and, for some, the curves of the report).
3. The sanity metrics come from a step that re-initialises the model (the api runs it after
   the pipeline); their entries read that step's result instead of the records.

Adding a metric is one entry in :data:`REGISTRY`, for example the share of images whose map
has its peak inside a box of the class, folded from the existing ``localization``
measurement::

    Metric(
        "my_pointing", "pointing game without tolerance", HIGHER, ("localization",),
        needs=("localization",), fold=lambda settings: InstanceMean("pointing_game"),
    )

A metric that needs a new per-image quantity adds its function here too and names it in
:data:`MEASUREMENTS`: ``instance`` functions see one annotated class's map at the original
image size (:class:`InstanceView`), ``image`` functions one image and all its instances
(:class:`ImageView`), ``batch`` functions the model, the preprocessed batch and the top-1
maps at the input size (:class:`BatchView`, one row per image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from camlens.errors import ConfigError
from camlens.localize import box_from_map
from camlens.metrics import faithfulness as faith
from camlens.metrics import localization as loc

if TYPE_CHECKING:
    from camlens.io.annotations import Annotation
    from camlens.models import Classifier

__all__ = [
    "DEFAULT_METRICS",
    "GROUPS",
    "HIGHER",
    "HIGHER_IS_BETTER",
    "LOWER",
    "MEASUREMENTS",
    "METRICS",
    "REGISTRY",
    "BatchView",
    "BoxAccuracy",
    "Fold",
    "ImageView",
    "InstanceView",
    "Measurement",
    "Metric",
    "MetricSettings",
    "make_settings",
    "resolve_metrics",
]

HIGHER, LOWER = "higher", "lower"


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSettings:
    """What the measurements and folds depend on (besides the model and the maps).

    Attributes:
        metrics: the chosen metric names, in registry order (:func:`resolve_metrics`).
        batch_size: perturbed inputs per forward pass (faithfulness).
        steps: deletion/insertion steps (curves of ``steps + 1`` points).
        deletion_baseline, insertion_baseline: ``"zero"`` or ``"blur"``.
        score: ``"prob"`` or ``"logit"``.
        tolerance: pointing-game tolerance in original-image pixels.
        threshold: Zhou's box threshold (top-1 and GT-known localisation).
        thresholds: the map-threshold grid (MaxBoxAcc, PxAP).
        road_fractions: fractions of pixels ROAD removes.
        seed: seed of ROAD's noise and of the sanity check.
    """

    metrics: list[str]
    batch_size: int = 16
    steps: int = faith.DEFAULT_STEPS
    deletion_baseline: str = "zero"
    insertion_baseline: str = "blur"
    score: str = "prob"
    tolerance: float = 15.0
    threshold: float = 0.2
    thresholds: np.ndarray = field(default_factory=lambda: loc.DEFAULT_THRESHOLDS)
    road_fractions: tuple[float, ...] = faith.ROAD_FRACTIONS
    seed: int = 0

    @property
    def measurements(self) -> list[str]:
        """The measurements to take: those every run takes, and those the chosen metrics
        need, in :data:`MEASUREMENTS` order."""
        needed = set(BASE_MEASUREMENTS)
        for name in self.metrics:
            needed.update(REGISTRY[name].needs)
        return [name for name in MEASUREMENTS if name in needed]

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready settings (``metrics.json``'s ``settings``)."""
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


def make_settings(metrics: Sequence[str] | str | None = None, **values: Any) -> MetricSettings:
    """Checked :class:`MetricSettings`: the chosen ``metrics`` (:func:`resolve_metrics`) and
    any other of its fields in ``values``; a field not given keeps the default of
    :class:`MetricSettings`. A bad metric, baseline, score or count is a ``ConfigError``.

    Example:
        >>> make_settings("maxboxacc,deletion", steps=10).measurements
        ['localization', 'top1', 'deletion']
    """
    given = MetricSettings(metrics=[], **values)
    for name, value in (
        ("deletion", given.deletion_baseline),
        ("insertion", given.insertion_baseline),
    ):
        if value not in ("zero", "blur"):
            raise ConfigError(f"{name}_baseline must be 'zero' or 'blur', got {value!r}")
    if given.score not in ("prob", "logit"):
        raise ConfigError(f"score must be 'prob' or 'logit', got {given.score!r}")
    return replace(
        given,
        metrics=resolve_metrics(metrics),
        batch_size=_positive(given.batch_size, "batch_size"),
        steps=_positive(given.steps, "steps"),
        tolerance=float(given.tolerance),
        threshold=float(given.threshold),
        thresholds=np.asarray(given.thresholds, dtype=np.float64),
        road_fractions=tuple(float(f) for f in given.road_fractions),
    )


def _positive(value: int, name: str) -> int:
    if int(value) < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return int(value)


# --- per-image measurements --------------------------------------------------------------------


@dataclass
class InstanceView:
    """One annotated class of one image, as ``instance`` measurements see it.

    Attributes:
        label: the annotated label (``None``: unlabelled, evaluated on the top-1 class).
        class_id: the class whose map this is.
        heatmap: the map, (H, W) in [0, 1] at the original image size.
        boxes: the class's ground-truth boxes (original pixels).
        settings: the run's settings.
    """

    label: str | None
    class_id: int
    heatmap: np.ndarray
    boxes: list[Sequence[float]]
    settings: MetricSettings

    @cached_property
    def threshold_ious(self) -> tuple[np.ndarray, np.ndarray]:
        """IoU at every map threshold: the largest region's box, and every region's best."""
        return loc.threshold_ious_both(self.heatmap, self.boxes, self.settings.thresholds)


@dataclass
class ImageView:
    """One image, as ``image`` measurements see it.

    Attributes:
        annotation: its ``Annotation`` (boxes, labels, masks).
        predicted: the model's top-1 class.
        top_map: the top-1 class's map, (H, W) in [0, 1] at the original image size.
        instances: its annotated classes, in the order of ``annotation.classes()``.
        settings: the run's settings.
    """

    annotation: Annotation
    predicted: int
    top_map: np.ndarray
    instances: list[InstanceView]
    settings: MetricSettings


@dataclass
class BatchView:
    """A batch of images, as ``batch`` measurements see it (they may run the model).

    Attributes:
        classifier: the model.
        x: the preprocessed batch (N, C, H, W).
        maps: the top-1 class's maps at the input size, (N, H, W) in [0, 1].
        top1: the top-1 classes (N,).
        settings: the run's settings.
    """

    classifier: Classifier
    x: torch.Tensor
    maps: torch.Tensor
    top1: torch.Tensor
    settings: MetricSettings


def measure_localization(instance: InstanceView) -> dict[str, Any]:
    """``ious`` (largest region's box at every map threshold), ``gt_known_loc`` (box at Zhou's
    threshold has IoU >= 0.5), ``pointing_game`` and ``energy_pointing_game``."""
    heatmap, boxes, settings = instance.heatmap, instance.boxes, instance.settings
    box = box_from_map(heatmap, settings.threshold)
    return {
        "ious": instance.threshold_ious[0].tolist(),
        "gt_known_loc": box is not None and float(loc.box_iou([box], boxes).max()) >= 0.5,
        "pointing_game": loc.pointing_game(heatmap, boxes, tolerance=settings.tolerance),
        "energy_pointing_game": loc.energy_pointing_game(heatmap, boxes),
    }


def measure_ious_all(instance: InstanceView) -> dict[str, Any]:
    """``ious_all``: the best IoU of any region's box at every map threshold (MaxBoxAccV2)."""
    return {"ious_all": instance.threshold_ious[1].tolist()}


def measure_top1(image: ImageView) -> dict[str, Any]:
    """``top1_loc``: the top-1 class is annotated and its map's box (Zhou's threshold) has
    IoU >= 0.5 with a box of that class."""
    gt_classes: list[int] = []
    gt_boxes: list[Sequence[float]] = []
    for instance in image.instances:
        gt_classes += [instance.class_id] * len(instance.boxes)
        gt_boxes += instance.boxes
    top_box = box_from_map(image.top_map, image.settings.threshold)
    return {"top1_loc": loc.top1_localization(image.predicted, top_box, gt_classes, gt_boxes)}


def measure_pixels(image: ImageView) -> dict[str, Any]:
    """``pixels``: PxAP's object/background histograms of the image's maps against its masks
    (nothing without masks)."""
    annotation = image.annotation
    if not annotation.class_masks():
        return {}
    pixels: loc.PixelPrecisionRecall | None = None
    height, width = image.top_map.shape
    for instance in image.instances:
        mask = annotation.mask_for(instance.label)
        if mask is None:
            continue
        if mask.shape != (height, width):
            raise ConfigError(
                f"{annotation.source_of(instance.label)}: mask is {mask.shape[1]}x"
                f"{mask.shape[0]} but the image is {width}x{height}"
            )
        if pixels is None:
            pixels = loc.PixelPrecisionRecall(image.settings.thresholds)
        pixels.add(instance.heatmap, mask)
    if pixels is None:
        return {}
    return {
        "pixels": {
            "object": pixels.object_hist.astype(np.int64).tolist(),
            "background": pixels.background_hist.astype(np.int64).tolist(),
            "n": pixels.n_images,
        }
    }


def _perturbation_options(settings: MetricSettings) -> dict[str, Any]:
    return {"batch_size": settings.batch_size, "score": settings.score}


def measure_curve(batch: BatchView, kind: str) -> dict[str, np.ndarray]:
    """``deletion`` or ``insertion`` (``kind``): the class score while the most salient
    pixels are removed, or put back."""
    s = batch.settings
    curve = faith.deletion_curve if kind == "deletion" else faith.insertion_curve
    baseline = s.deletion_baseline if kind == "deletion" else s.insertion_baseline
    return {
        kind: curve(
            batch.classifier, batch.x, batch.maps, batch.top1, steps=s.steps,
            baseline=baseline, **_perturbation_options(s),
        )
    }  # fmt: skip


def measure_confidence(batch: BatchView) -> dict[str, np.ndarray]:
    """``full`` and ``masked``: the class score on the image and on image x map."""
    full, masked = faith.masked_scores(
        batch.classifier, batch.x, batch.maps, batch.top1, **_perturbation_options(batch.settings)
    )
    return {"full": full, "masked": masked}


def measure_road(batch: BatchView) -> dict[str, np.ndarray]:
    """``road_morf`` and ``road_lerf``: the class score after ROAD removes the most / least
    relevant pixels, at every fraction."""
    s = batch.settings
    scores = {}
    for order in ("morf", "lerf"):
        scores[f"road_{order}"] = faith.road_scores(
            batch.classifier, batch.x, batch.maps, batch.top1, order=order,
            fractions=s.road_fractions, seed=s.seed, **_perturbation_options(s),
        )  # fmt: skip
    return scores


@dataclass(frozen=True)
class Measurement:
    """A per-image quantity, stored in the records, that metrics are folded from.

    Attributes:
        name: what metrics name in ``needs``.
        scope: ``"instance"`` (``compute(InstanceView) -> dict``, keys of the instance),
            ``"image"`` (``compute(ImageView) -> dict``, keys of the image) or ``"batch"``
            (``compute(BatchView) -> {key: array with one row per image}``).
        compute: the function.
    """

    name: str
    scope: str
    compute: Callable[[Any], dict[str, Any]]


#: Every measurement, in the order they are taken.
MEASUREMENTS: dict[str, Measurement] = {
    m.name: m
    for m in (
        Measurement("localization", "instance", measure_localization),
        Measurement("ious_all", "instance", measure_ious_all),
        Measurement("top1", "image", measure_top1),
        Measurement("pixels", "image", measure_pixels),
        Measurement("deletion", "batch", partial(measure_curve, kind="deletion")),
        Measurement("insertion", "batch", partial(measure_curve, kind="insertion")),
        Measurement("confidence", "batch", measure_confidence),
        Measurement("road", "batch", measure_road),
    )
}

#: Taken in every run: the per-image table, the report's gallery and the instance counts use
#: them.
BASE_MEASUREMENTS = ("localization", "top1")


# --- folds -------------------------------------------------------------------------------------


class Fold:
    """Folds one method's per-image values (a record's ``methods[name]``), given in input
    order by :meth:`add`, into a data-set value. Keeps counts, sums and a few numbers per
    image, never every image's curves or IoU rows."""

    def add(self, values: dict[str, Any]) -> None:
        raise NotImplementedError

    def value(self) -> float | None:
        """The data-set value; ``None`` when it cannot be computed (no image, no mask...)."""
        raise NotImplementedError

    def extras(self) -> dict[str, Any]:
        """Values shown beside the metric's (MaxBoxAcc's best threshold)."""
        return {}

    def curves(self) -> dict[str, Any]:
        """Series for the report (``metrics.json``'s ``curves``)."""
        return {}


class ImageMean(Fold):
    """The mean of a per-image value (``None`` without images)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.values: list[Any] = []

    def add(self, values: dict[str, Any]) -> None:
        self.values.append(values[self.key])

    def value(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None


class InstanceMean(ImageMean):
    """The mean of a per-instance value over all annotated classes of all images."""

    def add(self, values: dict[str, Any]) -> None:
        self.values += [instance[self.key] for instance in values["instances"]]


class BoxAccuracy(Fold):
    """MaxBoxAcc from per-instance IoU rows: the share of instances whose IoU reaches each
    IoU threshold at each map threshold (counts, not rows), its best map threshold, averaged
    over the IoU thresholds (``MaxBoxAcc.from_ious`` without keeping every IoU).

    Parameters:
        thresholds: the map-threshold grid.
        key: the instances' IoU rows (``"ious"``, ``"ious_all"``).
        deltas: the IoU thresholds.
        curve: the name of its curve in ``curves`` (None: no curve).
        with_thresholds: the curve lists the map thresholds too.
        best_key: the name under which :meth:`extras` gives the best map threshold.
    """

    def __init__(
        self,
        thresholds: np.ndarray,
        key: str = "ious",
        deltas: Sequence[float] = (0.5,),
        *,
        curve: str | None = None,
        with_thresholds: bool = False,
        best_key: str | None = None,
    ) -> None:
        self.thresholds = thresholds
        self.key = key
        self.curve = curve
        self.with_thresholds = with_thresholds
        self.best_key = best_key
        self.hits = {delta: np.zeros(len(thresholds)) for delta in deltas}
        self.n = 0

    def add(self, values: dict[str, Any]) -> None:
        for instance in values["instances"]:
            self.n += 1
            ious = np.asarray(instance[self.key])
            for delta, hits in self.hits.items():
                hits += ious >= delta

    def result(self) -> loc.MaxBoxAcc | None:
        """The ``MaxBoxAcc`` of the instances so far (None without instances)."""
        if not self.n:
            return None
        curves = {delta: count / self.n for delta, count in self.hits.items()}
        best = {delta: int(np.argmax(curve)) for delta, curve in curves.items()}
        per_iou = {delta: float(curves[delta][i]) for delta, i in best.items()}
        return loc.MaxBoxAcc(
            value=float(np.mean(list(per_iou.values()))),
            per_iou=per_iou,
            best_thresholds={delta: float(self.thresholds[i]) for delta, i in best.items()},
            thresholds=self.thresholds,
            curves=curves,
        )

    def best_index(self) -> int:
        """The index of the best map threshold at the first IoU threshold (0 without data)."""
        result = self.result()
        return 0 if result is None else int(np.argmax(next(iter(result.curves.values()))))

    def value(self) -> float | None:
        result = self.result()
        return None if result is None else result.value

    def extras(self) -> dict[str, Any]:
        result = self.result()
        if result is None or self.best_key is None:
            return {}
        return {self.best_key: next(iter(result.best_thresholds.values()))}

    def curves(self) -> dict[str, Any]:
        result = self.result()
        if result is None or self.curve is None:
            return {}
        series = {str(delta): _floats(curve) for delta, curve in result.curves.items()}
        if self.with_thresholds:
            series = {"thresholds": _floats(self.thresholds), **series}
        return {self.curve: series}


class PixelFold(Fold):
    """PxAP or peak pixel IoU from the images' pooled pixel histograms."""

    def __init__(self, thresholds: np.ndarray, attribute: str) -> None:
        self.pixels = loc.PixelPrecisionRecall(thresholds)
        self.attribute = attribute
        self.seen = False

    def add(self, values: dict[str, Any]) -> None:
        if "pixels" in values:
            pixels = values["pixels"]
            self.pixels.add_counts(pixels["object"], pixels["background"], pixels["n"])
            self.seen = True

    def value(self) -> float | None:
        if not self.seen:
            return None
        value = getattr(self.pixels, self.attribute)
        return float(value) if np.isfinite(value) else None


class CurveArea(Fold):
    """The mean area under the per-image curves ``key``, and the mean curve."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.total: np.ndarray | int = 0
        self.areas: list[float] = []

    def add(self, values: dict[str, Any]) -> None:
        curve = np.asarray(values[self.key])
        self.total = self.total + curve
        self.areas.append(float(faith.auc(curve)[0]))

    def value(self) -> float | None:
        return float(np.mean(self.areas)) if self.areas else None

    def curves(self) -> dict[str, Any]:
        if not self.areas:
            return {}
        return {self.key: _floats(self.total / len(self.areas))}


class PerImage(Fold):
    """Keeps every image's values of ``keys`` (a number or a short row each)."""

    def __init__(self, *keys: str) -> None:
        self.kept: dict[str, list[Any]] = {key: [] for key in keys}

    def add(self, values: dict[str, Any]) -> None:
        for key, kept in self.kept.items():
            kept.append(values[key])

    @property
    def n_images(self) -> int:
        """The images kept so far."""
        return len(next(iter(self.kept.values())))

    def array(self, key: str) -> np.ndarray:
        """The values of ``key`` of every image, one row per image."""
        return np.asarray(self.kept[key])


class ScorePair(PerImage):
    """A statistic of the per-image ``full`` and ``masked`` scores (Average Drop...)."""

    def __init__(self, statistic: Callable[[np.ndarray, np.ndarray], float]) -> None:
        super().__init__("full", "masked")
        self.statistic = statistic

    def value(self) -> float | None:
        return self.statistic(self.array("full"), self.array("masked")) if self.n_images else None


class Road(PerImage):
    """ROAD's mean MoRF or LeRF score, or their combination (LeRF - MoRF) / 2, and the mean
    score per removed fraction."""

    def __init__(self, fractions: Sequence[float], which: str) -> None:
        super().__init__("road_morf", "road_lerf")
        self.fractions = list(fractions)
        self.which = which

    def value(self) -> float | None:
        if not self.n_images:
            return None
        morf, lerf = self.array("road_morf").mean(), self.array("road_lerf").mean()
        return float({"morf": morf, "lerf": lerf, "combined": (lerf - morf) / 2}[self.which])

    def curves(self) -> dict[str, Any]:
        if not self.n_images:
            return {}
        return {
            "road": {
                "fractions": self.fractions,
                "morf": _floats(self.array("road_morf").mean(axis=0)),
                "lerf": _floats(self.array("road_lerf").mean(axis=0)),
            }
        }


def _floats(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


# --- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One metric (see the module docstring).

    Attributes:
        name: its key in ``metrics.json``.
        description: one line for the report's glossary.
        better: :data:`HIGHER` or :data:`LOWER`.
        groups: the groups that select it (``--metrics localization``).
        needs: the :data:`MEASUREMENTS` it is folded from.
        fold: ``fold(settings) -> Fold``; ``None`` for a metric of the sanity step.
        sanity: for a metric of the sanity step: its value from that step's stages of one
            method (``None`` otherwise).
    """

    name: str
    description: str
    better: str
    groups: tuple[str, ...]
    needs: tuple[str, ...] = ()
    fold: Callable[[MetricSettings], Fold] | None = None
    sanity: Callable[[list[dict[str, Any]]], float | None] | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.better == HIGHER


_LOCALIZATION = ("localization",)
_MASK = ("localization", "mask")

#: Every metric, in the order of ``metrics.json`` and the report.
REGISTRY: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "maxboxacc",
            "MaxBoxAcc: best share of images whose largest-region box has IoU >= 0.5 with a "
            "ground-truth box, over map thresholds 0..0.99 (Choe et al. 2020)",
            HIGHER, _LOCALIZATION, ("localization",),
            lambda s: BoxAccuracy(
                s.thresholds, "ious", (0.5,), curve="boxacc", with_thresholds=True,
                best_key="maxboxacc_threshold",
            ),
        ),
        Metric(
            "maxboxacc_v2",
            "MaxBoxAccV2: as MaxBoxAcc with boxes of all regions, averaged over IoU 0.3, 0.5, "
            "0.7 (Choe et al. 2022)",
            HIGHER, _LOCALIZATION, ("localization", "ious_all"),
            lambda s: BoxAccuracy(
                s.thresholds, "ious_all", loc.V2_IOU_THRESHOLDS, curve="boxacc_v2"
            ),
        ),
        Metric(
            "top1_loc",
            "top-1 localisation: the top-1 class is right and its map's box (Zhou's threshold) "
            "has IoU >= 0.5 with a box of that class (Zhou et al. 2016)",
            HIGHER, _LOCALIZATION, ("top1",), lambda s: ImageMean("top1_loc"),
        ),
        Metric(
            "gt_known_loc",
            "GT-known localisation: the annotated class's box at Zhou's threshold has IoU >= 0.5",
            HIGHER, _LOCALIZATION, ("localization",), lambda s: InstanceMean("gt_known_loc"),
        ),
        Metric(
            "pointing_game",
            "pointing game: the map's peak lies within the tolerance (15 px) of a box of the "
            "class (Zhang et al. 2016)",
            HIGHER, _LOCALIZATION, ("localization",), lambda s: InstanceMean("pointing_game"),
        ),
        Metric(
            "energy_pointing_game",
            "energy-based pointing game: share of the map's mass inside the class's boxes "
            "(Wang et al. 2020)",
            HIGHER, _LOCALIZATION, ("localization",),
            lambda s: InstanceMean("energy_pointing_game"),
        ),
        Metric(
            "pxap",
            "PxAP: area under the pixel precision-recall curve against masks (Choe et al.)",
            HIGHER, _MASK, ("pixels",), lambda s: PixelFold(s.thresholds, "pxap"),
        ),
        Metric(
            "mask_iou",
            "peak pixel IoU between the thresholded map and the masks, best threshold",
            HIGHER, _MASK, ("pixels",), lambda s: PixelFold(s.thresholds, "peak_iou"),
        ),
        Metric(
            "deletion_auc",
            "deletion AUC: class probability while the most salient pixels are removed (lower "
            "is better; Petsiuk et al. 2018)",
            LOWER, ("faithfulness", "deletion"), ("deletion",), lambda s: CurveArea("deletion"),
        ),
        Metric(
            "insertion_auc",
            "insertion AUC: class probability while the most salient pixels are put back into "
            "a blurred image (higher is better)",
            HIGHER, ("faithfulness", "insertion"), ("insertion",),
            lambda s: CurveArea("insertion"),
        ),
        Metric(
            "average_drop",
            "Average Drop: mean relative drop of the class probability on image x map (lower "
            "is better; Chattopadhay et al. 2018)",
            LOWER, ("faithfulness", "confidence"), ("confidence",),
            lambda s: ScorePair(faith.average_drop),
        ),
        Metric(
            "increase_in_confidence",
            "Increase in Confidence: share of images whose probability rises on image x map",
            HIGHER, ("faithfulness", "confidence"), ("confidence",),
            lambda s: ScorePair(faith.increase_in_confidence),
        ),
        Metric(
            "average_gain",
            "Average Gain: mean relative gain of the probability on image x map (Zhang et al. "
            "2023)",
            HIGHER, ("faithfulness", "confidence"), ("confidence",),
            lambda s: ScorePair(faith.average_gain),
        ),
        Metric(
            "road_morf",
            "ROAD MoRF: mean probability after removing 10..90 % most relevant pixels with "
            "noisy linear imputation (lower is better; Rong et al. 2022)",
            LOWER, ("road",), ("road",), lambda s: Road(s.road_fractions, "morf"),
        ),
        Metric(
            "road_lerf",
            "ROAD LeRF: the same removing the least relevant pixels (higher is better)",
            HIGHER, ("road",), ("road",), lambda s: Road(s.road_fractions, "lerf"),
        ),
        Metric(
            "road_combined",
            "ROAD combined: (LeRF - MoRF) / 2 (higher is better)",
            HIGHER, ("road",), ("road",), lambda s: Road(s.road_fractions, "combined"),
        ),
        Metric(
            "sanity_spearman",
            "sanity: rank correlation of maps of the trained and the fully randomised model "
            "(lower is better; Adebayo et al. 2018)",
            LOWER, ("sanity",), sanity=lambda stages: stages[-1]["spearman"],
        ),
        Metric(
            "sanity_ssim",
            "sanity: SSIM of maps of the trained and the fully randomised model (lower is "
            "better)",
            LOWER, ("sanity",), sanity=lambda stages: stages[-1]["ssim"],
        ),
    )
}  # fmt: skip

#: Every metric with its one-line description (the report's glossary).
METRICS: dict[str, str] = {name: metric.description for name, metric in REGISTRY.items()}

#: Whether a larger value is better, per metric (the report's arrows and highlighting).
HIGHER_IS_BETTER: dict[str, bool] = {
    name: metric.higher_is_better for name, metric in REGISTRY.items()
}

#: Groups of metrics (what ``--metrics`` accepts besides names), each in registry order.
GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(name for name, metric in REGISTRY.items() if group in metric.groups)
    for group in dict.fromkeys(g for metric in REGISTRY.values() for g in metric.groups)
}
GROUPS["all"] = tuple(REGISTRY)

#: What ``evaluate`` computes when ``metrics`` is not given: localisation and the fast
#: faithfulness metrics (ROAD and the sanity check take much longer; ask for them).
DEFAULT_METRICS: tuple[str, ...] = tuple(
    name
    for name, metric in REGISTRY.items()
    if {"localization", "faithfulness"} & set(metric.groups)
)


def resolve_metrics(metrics: Sequence[str] | str | None) -> list[str]:
    """Metric names (or groups: localization, faithfulness, confidence, deletion, insertion,
    mask, road, sanity, all) -> the metric keys, in registry order.

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
        if name in GROUPS:
            chosen.update(GROUPS[name])
        elif name in REGISTRY:
            chosen.add(name)
        else:
            raise ConfigError(
                f"unknown metric {raw!r}; choose from {', '.join(REGISTRY)} "
                f"or the groups {', '.join(GROUPS)}"
            )
    if not chosen:
        raise ConfigError("no metric selected")
    return [name for name in REGISTRY if name in chosen]
