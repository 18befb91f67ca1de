"""Does the map point at the object? Box, point and pixel localisation metrics.

Conventions: a heat map is an (H, W) array at the resolution of the image whose boxes are
given, larger meaning more important (camlens' ``Explanation.heatmap(..., original=True)``:
``relu`` and divided by the maximum, so in [0, 1]). Boxes are ``(x0, y0, x1, y1)`` in
pixel-edge coordinates (see :mod:`camlens.localize`): area ``(x1 - x0) * (y1 - y0)``.
Thresholds are fractions of the map's maximum, and a pixel is kept when it is strictly above
(``map > t * max``), as in Zhou et al.'s 20 % rule.

References:
    Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016 (boxes at
    20 % of the maximum, top-1 localisation).
    Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020,
    and "Evaluation for Weakly Supervised Object Localization: Protocol, Metrics, and
    Datasets", TPAMI 2022 (MaxBoxAcc, MaxBoxAccV2, PxAP).
    Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 / IJCV 2018
    (pointing game, 15 px tolerance).
    Wang et al., "Score-CAM", CVPR-W 2020 (energy-based pointing game).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from camlens.localize import box_from_map

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MaxBoxAcc",
    "PixelPrecisionRecall",
    "box_iou",
    "boxes_at_threshold",
    "energy_pointing_game",
    "max_box_acc",
    "max_box_acc_v2",
    "pointing_game",
    "threshold_ious",
    "threshold_ious_both",
    "top1_localization",
]

#: Choe et al.'s threshold grid: 0, 0.01, ..., 0.99 of the map's maximum.
DEFAULT_THRESHOLDS: np.ndarray = np.round(np.arange(100) * 0.01, 2)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

Boxes = Sequence[Sequence[float]]


def box_iou(a: Sequence[float] | Boxes, b: Sequence[float] | Boxes) -> float | np.ndarray:
    """Intersection over union of boxes (pixel-edge coordinates).

    Parameters:
        a: one box ``(x0, y0, x1, y1)`` or N boxes (N, 4).
        b: one box or M boxes (M, 4).

    Returns:
        A float for two single boxes, else the (N, M) matrix of IoUs. Empty boxes have IoU 0.

    Example:
        >>> box_iou((0, 0, 2, 2), (1, 0, 3, 2))   # intersection 2, union 6
        0.3333333333333333
    """
    single = np.ndim(a) == 1 and np.ndim(b) == 1
    boxes_a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    boxes_b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    y0 = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    x1 = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    y1 = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = _areas(boxes_a)[:, None]
    area_b = _areas(boxes_b)[None, :]
    union = area_a + area_b - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float(iou[0, 0]) if single else iou


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def boxes_at_threshold(
    heatmap: np.ndarray, threshold: float = 0.2, *, all_components: bool = False
) -> list[tuple[int, int, int, int]]:
    """Boxes of the regions above ``threshold`` x the map's maximum.

    Parameters:
        heatmap: (H, W) map.
        threshold: fraction of the maximum (Zhou et al.: 0.2).
        all_components: return the box of every 8-connected component (MaxBoxAccV2) instead of
            only the largest one (Zhou's rule, ``camlens.localize.box_from_map``).

    Returns:
        A list of ``(x0, y0, x1, y1)``; empty when the map has no positive value.

    Example:
        >>> m = np.zeros((4, 6)); m[0, 0] = 1.0; m[2:4, 3:6] = 0.5
        >>> boxes_at_threshold(m, 0.2), boxes_at_threshold(m, 0.2, all_components=True)
        ([(3, 2, 6, 4)], [(0, 0, 1, 1), (3, 2, 6, 4)])
    """
    if not all_components:
        box = box_from_map(heatmap, threshold)
        return [] if box is None else [box]
    heatmap = np.asarray(heatmap, dtype=np.float64)
    peak = float(np.nanmax(heatmap)) if heatmap.size else 0.0
    if not peak > 0:
        return []
    labels, _ = ndimage.label(heatmap > threshold * peak, structure=_EIGHT_CONNECTED)
    return [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)]


def threshold_ious(
    heatmap: np.ndarray,
    gt_boxes: Boxes,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    all_components: bool = False,
) -> np.ndarray:
    """For each threshold, the IoU of the best-matching (predicted, ground-truth) box pair.

    The building block of MaxBoxAcc: one connected-component labelling per threshold, the
    largest component's box (or, with ``all_components``, every component's box) against
    every ground-truth box, keeping the largest IoU (Choe et al.'s ``BoxEvaluator``).

    Returns:
        (T,) float array; 0 at thresholds where nothing is above the threshold.

    Example:
        >>> m = np.zeros((10, 10)); m[2:6, 2:6] = 1.0
        >>> threshold_ious(m, [(2, 2, 6, 6)], [0.0, 0.5]).tolist()
        [1.0, 1.0]
    """
    largest, best = threshold_ious_both(heatmap, gt_boxes, thresholds)
    return best if all_components else largest


def threshold_ious_both(
    heatmap: np.ndarray, gt_boxes: Boxes, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`threshold_ious` for the largest component and for all components at once (one
    labelling per threshold serves both MaxBoxAcc and MaxBoxAccV2)."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    largest = np.zeros(len(thresholds))
    best = np.zeros(len(thresholds))
    peak = float(np.nanmax(heatmap)) if heatmap.size else 0.0
    if not peak > 0 or len(gt) == 0:
        return largest, best
    for t, threshold in enumerate(thresholds):
        labels, count = ndimage.label(heatmap > threshold * peak, structure=_EIGHT_CONNECTED)
        if count == 0:
            continue
        boxes = [
            (s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)
        ]
        ious = box_iou(boxes, gt).max(axis=1)
        largest[t] = ious[int(np.argmax(np.bincount(labels.ravel())[1:]))]
        best[t] = ious.max()
    return largest, best


@dataclass(frozen=True)
class MaxBoxAcc:
    """MaxBoxAcc over a set of maps.

    Attributes:
        value: mean over ``iou_thresholds`` of the best accuracy (fraction in [0, 1]).
        per_iou: {IoU threshold: best accuracy}.
        best_thresholds: {IoU threshold: the map threshold that reaches it}.
        thresholds: the map thresholds tried.
        curves: {IoU threshold: (T,) BoxAcc at each map threshold}.
    """

    value: float
    per_iou: dict[float, float]
    best_thresholds: dict[float, float]
    thresholds: np.ndarray
    curves: dict[float, np.ndarray]

    @classmethod
    def from_ious(
        cls,
        ious: np.ndarray,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        iou_thresholds: Sequence[float] = (0.5,),
    ) -> MaxBoxAcc:
        """From an (N, T) array of :func:`threshold_ious` rows, one per image."""
        ious = np.asarray(ious, dtype=np.float64).reshape(-1, len(thresholds))
        thresholds = np.asarray(thresholds, dtype=np.float64)
        curves, per_iou, best = {}, {}, {}
        for delta in iou_thresholds:
            curve = (ious >= delta).mean(axis=0) if len(ious) else np.zeros(len(thresholds))
            index = int(np.argmax(curve))
            curves[delta], per_iou[delta], best[delta] = (
                curve,
                float(curve[index]),
                thresholds[index],
            )
        value = float(np.mean(list(per_iou.values())))
        return cls(value, per_iou, {k: float(v) for k, v in best.items()}, thresholds, curves)


def max_box_acc(
    heatmaps: Sequence[np.ndarray],
    gt_boxes: Sequence[Boxes],
    *,
    iou_threshold: float = 0.5,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> MaxBoxAcc:
    """MaxBoxAcc (Choe et al. 2020): the best box accuracy over a grid of map thresholds.

    ``BoxAcc(t) = mean_n 1[ IoU(box(map_n, t), GT_n) >= iou_threshold ]`` where ``box`` is
    the bounding box of the largest connected component above ``t`` x max and the IoU is with
    the best-matching ground-truth box; ``MaxBoxAcc = max_t BoxAcc(t)``. The maps are those of
    the ground-truth class (the "GT-known" setting), and one threshold serves the whole set.

    Differences to the reference code (``clovaai/wsolevaluation``): components are 8-connected
    pixel sets and the largest is the one with most pixels (OpenCV contours by polygon area
    there), and IoU uses pixel-edge boxes (inclusive ``+1`` areas there). The map is not
    quantised to 8 bits.

    Example:
        >>> m = np.zeros((10, 10)); m[2:6, 2:6] = 1.0
        >>> max_box_acc([m], [[(2, 2, 6, 6)]]).value
        1.0
    """
    ious = [threshold_ious(h, b, thresholds) for h, b in zip(heatmaps, gt_boxes, strict=True)]
    return MaxBoxAcc.from_ious(np.array(ious), thresholds, (iou_threshold,))


#: MaxBoxAccV2 averages over these IoU thresholds (Choe et al., TPAMI 2022).
V2_IOU_THRESHOLDS = (0.3, 0.5, 0.7)


def max_box_acc_v2(
    heatmaps: Sequence[np.ndarray],
    gt_boxes: Sequence[Boxes],
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> MaxBoxAcc:
    """MaxBoxAccV2 (Choe et al., TPAMI 2022): ``mean over d in {0.3, 0.5, 0.7} of
    max_t BoxAcc(t, d)``, where each predicted map may propose the box of *every* connected
    component above ``t`` and the best (predicted, ground-truth) pair counts.

    The best threshold is chosen separately for each IoU threshold ``d`` (as in the reference
    code); ``best_thresholds`` lists them.

    Example:
        >>> m = np.zeros((10, 10)); m[2:6, 2:6] = 1.0
        >>> max_box_acc_v2([m], [[(2, 2, 6, 6)]]).per_iou
        {0.3: 1.0, 0.5: 1.0, 0.7: 1.0}
    """
    ious = [
        threshold_ious(h, b, thresholds, all_components=True)
        for h, b in zip(heatmaps, gt_boxes, strict=True)
    ]
    return MaxBoxAcc.from_ious(np.array(ious), thresholds, V2_IOU_THRESHOLDS)


def top1_localization(
    predicted_class: int,
    predicted_box: Sequence[float] | None,
    gt_classes: Sequence[int],
    gt_boxes: Boxes,
    *,
    iou_threshold: float = 0.5,
) -> bool:
    """Top-1 localisation (Zhou et al. 2016, ILSVRC): the top-1 class is a ground-truth class
    and the box of its map overlaps a ground-truth box *of that class* with IoU >= 0.5.

    Parameters:
        predicted_class: the model's top-1 class.
        predicted_box: the box of the top-1 class's map (Zhou's 20 % rule), or None.
        gt_classes: the class of each ground-truth box.
        gt_boxes: the ground-truth boxes.

    Example:
        >>> top1_localization(3, (0, 0, 10, 10), [3], [(0, 0, 10, 8)])
        True
        >>> top1_localization(4, (0, 0, 10, 10), [3], [(0, 0, 10, 8)])
        False
    """
    if predicted_box is None:
        return False
    same = [box for c, box in zip(gt_classes, gt_boxes, strict=True) if c == predicted_class]
    return bool(same) and float(box_iou([predicted_box], same).max()) >= iou_threshold


def pointing_game(
    heatmap: np.ndarray,
    gt_boxes: Boxes = (),
    *,
    tolerance: float = 15.0,
    mask: np.ndarray | None = None,
) -> bool:
    """Pointing game (Zhang et al. 2016): is the map's maximum on the object?

    A hit when the peak pixel's centre is within ``tolerance`` pixels (Euclidean) of a
    ground-truth box, or of a pixel of ``mask`` when a mask is given (the paper's setting:
    15 px). Several maxima: the first in row-major order. A map without a positive value is a
    miss.

    Example:
        >>> m = np.zeros((50, 50)); m[40, 40] = 1.0
        >>> pointing_game(m, [(0, 0, 10, 10)]), pointing_game(m, [(0, 0, 30, 30)], tolerance=15)
        (False, True)
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.size == 0 or not np.nanmax(heatmap) > 0:
        return False
    row, col = np.unravel_index(int(np.nanargmax(heatmap)), heatmap.shape)
    if mask is not None:
        return _near_mask(np.asarray(mask, dtype=bool), row, col, tolerance)
    x, y = col + 0.5, row + 0.5  # the pixel's centre in pixel-edge coordinates
    for x0, y0, x1, y1 in np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4):
        dx = max(x0 - x, 0.0, x - x1)
        dy = max(y0 - y, 0.0, y - y1)
        if dx * dx + dy * dy <= tolerance * tolerance:
            return True
    return False


def _near_mask(mask: np.ndarray, row: int, col: int, tolerance: float) -> bool:
    radius = int(np.floor(tolerance))
    r0, r1 = max(row - radius, 0), min(row + radius + 1, mask.shape[0])
    c0, c1 = max(col - radius, 0), min(col + radius + 1, mask.shape[1])
    rows, cols = np.nonzero(mask[r0:r1, c0:c1])
    distance2 = (rows + r0 - row) ** 2 + (cols + c0 - col) ** 2
    return bool(np.any(distance2 <= tolerance * tolerance))


def energy_pointing_game(heatmap: np.ndarray, gt_boxes: Boxes) -> float:
    """Energy-based pointing game (Wang et al. 2020): the share of the map's mass inside the
    ground-truth boxes (their union).

    ``sum(map inside) / sum(map)`` for the map with negative values set to 0; 0 for a map
    without positive mass. Box edges are rounded to whole pixels.

    Example:
        >>> m = np.zeros((4, 4)); m[0, 0] = 3.0; m[3, 3] = 1.0
        >>> energy_pointing_game(m, [(0, 0, 2, 2)])
        0.75
    """
    heatmap = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0, None)
    total = heatmap.sum()
    if not total > 0:
        return 0.0
    return float(heatmap[box_union_mask(gt_boxes, heatmap.shape)].sum() / total)


def box_union_mask(boxes: Boxes, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of the union of ``boxes``, edges rounded to whole pixels."""
    height, width = shape
    inside = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, c1 = int(np.clip(round(x0), 0, width)), int(np.clip(round(x1), 0, width))
        r0, r1 = int(np.clip(round(y0), 0, height)), int(np.clip(round(y1), 0, height))
        inside[r0:r1, c0:c1] = True
    return inside


class PixelPrecisionRecall:
    """Pixel precision-recall of maps against masks, pooled over images: PxAP and peak IoU.

    Choe et al.'s ``MaskEvaluator``: each map pixel's value goes into a histogram over the
    threshold grid, one for object pixels and one for background pixels; at threshold ``t``,
    true positives are the object pixels with value >= t, false positives the background
    pixels with value >= t. ``PxAP = sum_t precision(t) * (recall(t) - recall(t+))``, the area
    under the precision-recall curve; ``peak_iou = max_t TP / (TP + FP + FN)``. Maps should be
    in [0, 1] (``Explanation.heatmap``).

    Example:
        >>> pr = PixelPrecisionRecall()
        >>> pr.add(np.array([[1.0, 0.0]]), np.array([[True, False]]))
        >>> pr.pxap, pr.peak_iou
        (1.0, 1.0)
    """

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        self.edges = np.unique(edges)
        self.object_hist = np.zeros(len(self.edges) - 1)
        self.background_hist = np.zeros(len(self.edges) - 1)
        self.n_images = 0

    def add(self, heatmap: np.ndarray, mask: np.ndarray) -> None:
        """Add one image's map and its object mask (same shape)."""
        heatmap = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0, 1.0)
        mask = np.asarray(mask, dtype=bool)
        if heatmap.shape != mask.shape:
            raise ValueError(f"map {heatmap.shape} and mask {mask.shape} differ in shape")
        self.object_hist += np.histogram(heatmap[mask], bins=self.edges)[0]
        self.background_hist += np.histogram(heatmap[~mask], bins=self.edges)[0]
        self.n_images += 1

    def add_counts(
        self, object_hist: Sequence[float], background_hist: Sequence[float], n_images: int = 1
    ) -> None:
        """Add pixel counts made elsewhere: the ``object_hist`` and ``background_hist`` of
        another ``PixelPrecisionRecall`` on the same threshold grid (the histograms are
        additive, so images can be measured in other processes and pooled here).

        Example:
            >>> part = PixelPrecisionRecall(); part.add(np.array([[1.0, 0.0]]), np.array([[1, 0]]))
            >>> pooled = PixelPrecisionRecall()
            >>> pooled.add_counts(part.object_hist, part.background_hist, part.n_images)
            >>> pooled.pxap
            1.0
        """
        object_hist = np.asarray(object_hist, dtype=np.float64)
        background_hist = np.asarray(background_hist, dtype=np.float64)
        bins = len(self.object_hist)
        if object_hist.shape != (bins,) or background_hist.shape != (bins,):
            raise ValueError(
                f"histograms of {object_hist.shape} and {background_hist.shape} bins do not fit "
                f"this threshold grid's {bins} bins; pool counts made on the same thresholds"
            )
        self.object_hist += object_hist
        self.background_hist += background_hist
        self.n_images += n_images

    def _counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Reversed cumulative sums: entry j counts the pixels at or above edges[-2 - j].
        tp = self.object_hist[::-1].cumsum()
        fp = self.background_hist[::-1].cumsum()
        fn = self.object_hist.sum() - tp
        return tp, fp, fn

    @property
    def pxap(self) -> float:
        """Pixel average precision in [0, 1] (NaN before any object pixel was added)."""
        tp, fp, fn = self._counts()
        if not (tp + fn).any():
            return float("nan")
        predicted = tp + fp
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = tp / (tp + fn)
        keep = predicted[1:] > 0
        return float((precision[1:] * np.diff(recall))[keep].sum())

    @property
    def peak_iou(self) -> float:
        """The best pixel IoU over the thresholds, pooled over images (NaN when empty)."""
        tp, fp, fn = self._counts()
        union = tp + fp + fn
        if not union.any():
            return float("nan")
        return float(np.max(np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)))
