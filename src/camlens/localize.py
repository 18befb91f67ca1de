"""From raw maps to normalised maps, and boxes from maps: Zhou et al. 2016's rule.

``normalize_maps`` is the heat-map contract's one normalisation (``relu``, bilinear
upsampling, division by the maximum); every map camlens shows or measures goes through it.

Keep the pixels above ``threshold`` x the map's maximum (20 % in the CAM paper), take the
largest connected component (8-connectivity, ``scipy.ndimage.label``) and return its bounding
box. Boxes are ``(x0, y0, x1, y1)`` in pixel-edge coordinates: the box covers columns
``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from camlens.io.annotations import mask_box

Box = tuple[int, int, int, int]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def normalize_maps(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``relu(raw)`` upsampled to ``size`` = (H, W) and divided by each map's maximum.

    Parameters:
        raw: (N, K, h, w) signed maps.
        size: output (height, width).

    Returns:
        (N, K, H, W) float32 in [0, 1].

    Example:
        >>> normalize_maps(torch.tensor([[[[-1.0, 2.0]]]]), (1, 2))
        tensor([[[[0., 1.]]]])
    """
    n, k, h, w = raw.shape
    positive = raw.float().relu().reshape(n * k, 1, h, w)
    if (h, w) != tuple(size):
        positive = F.interpolate(positive, size=size, mode="bilinear", align_corners=False)
    peak = positive.amax(dim=(-2, -1), keepdim=True)
    # One full-size pass: ``positive`` is a fresh tensor (relu, interpolate), divided in place;
    # a map whose peak is 0 is all zeros already, one whose peak is NaN becomes zeros.
    maps = positive.div_(peak.clamp_min(1e-30))
    empty = ~(peak > 0)
    if empty.any():
        maps.masked_fill_(empty, 0.0)
    return maps.reshape(n, k, *size)


def box_from_map(heatmap: np.ndarray, threshold: float = 0.2) -> Box | None:
    """Bounding box of the largest region above ``threshold * max(heatmap)``.

    Parameters:
        heatmap: (H, W) array; larger means more important.
        threshold: fraction of the maximum, in [0, 1).

    Returns:
        ``(x0, y0, x1, y1)`` with exclusive ``x1, y1``, or ``None`` when the map has no
        positive value.

    Example:
        >>> m = np.zeros((5, 6)); m[1:3, 2:5] = 1.0
        >>> box_from_map(m)
        (2, 1, 5, 3)
    """
    heatmap = np.asarray(heatmap, dtype=np.float64)
    peak = float(np.nanmax(heatmap)) if heatmap.size else 0.0
    if not peak > 0:
        return None
    mask = heatmap > threshold * peak
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    return mask_box(labels == largest)


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """Map a box between image sizes given as ``(width, height)``.

    Example:
        >>> scale_box((0, 0, 112, 56), (224, 224), (640, 480))
        (0, 0, 320, 120)
    """
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    x0, y0, x1, y1 = box
    return (
        min(to_size[0], max(0, round(x0 * sx))),
        min(to_size[1], max(0, round(y0 * sy))),
        min(to_size[0], max(1, round(x1 * sx))),
        min(to_size[1], max(1, round(y1 * sy))),
    )
