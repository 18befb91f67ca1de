"""How good is a heat map? Localisation, faithfulness and sanity metrics.

* :mod:`camlens.metrics.localization`: boxes at a threshold, top-1 localisation, MaxBoxAcc
  and MaxBoxAccV2, pointing game, energy-based pointing game, PxAP and peak pixel IoU.
* :mod:`camlens.metrics.faithfulness`: deletion and insertion (RISE), Average Drop, Increase
  in Confidence, Average Gain, ROAD with noisy linear imputation.
* :mod:`camlens.metrics.sanity`: Adebayo et al.'s cascading model randomisation.
* :mod:`camlens.metrics.registry`: every metric ``camlens.evaluate`` reports (name, direction,
  groups, the per-image measurement it needs and its fold), one entry each.

``camlens.evaluate`` runs them all over an annotated data set.
"""

from camlens.metrics.faithfulness import (
    auc,
    average_drop,
    average_gain,
    deletion_curve,
    increase_in_confidence,
    insertion_curve,
    masked_scores,
    noisy_linear_impute,
    road_scores,
)
from camlens.metrics.localization import (
    DEFAULT_THRESHOLDS,
    MaxBoxAcc,
    PixelPrecisionRecall,
    box_iou,
    boxes_at_threshold,
    energy_pointing_game,
    max_box_acc,
    max_box_acc_v2,
    pointing_game,
    threshold_ious,
    top1_localization,
)
from camlens.metrics.sanity import SanityStage, cascading_randomization, map_similarity

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MaxBoxAcc",
    "PixelPrecisionRecall",
    "SanityStage",
    "auc",
    "average_drop",
    "average_gain",
    "box_iou",
    "boxes_at_threshold",
    "cascading_randomization",
    "deletion_curve",
    "energy_pointing_game",
    "increase_in_confidence",
    "insertion_curve",
    "map_similarity",
    "masked_scores",
    "max_box_acc",
    "max_box_acc_v2",
    "noisy_linear_impute",
    "pointing_game",
    "road_scores",
    "threshold_ious",
    "top1_localization",
]
