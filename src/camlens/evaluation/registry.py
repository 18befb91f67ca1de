"""The metrics ``evaluate`` can report, their groups, and the settings of a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from camlens.errors import ConfigError

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


def _positive(value: int, name: str) -> int:
    if int(value) < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return int(value)
