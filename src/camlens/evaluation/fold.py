"""Folding the records into the summary (the content of ``metrics.json``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camlens.evaluation.registry import _Settings
from camlens.metrics import faithfulness as faith
from camlens.metrics import localization as loc


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
