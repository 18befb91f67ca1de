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
#: A 3-D box ``(x0, y0, z0, x1, y1, z1)`` in voxel-edge coordinates: x = column (w),
#: y = row (h), z = slice (d); the ends are exclusive.
Box3D = tuple[int, int, int, int, int, int]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_TWENTY_SIX_CONNECTED = np.ones((3, 3, 3), dtype=bool)


def normalize_maps(raw: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``relu(raw)`` upsampled to ``size`` = (H, W) and divided by each map's maximum.

    Maps of volumes, (N, K, d, h, w) with ``size`` = (D, H, W), are upsampled trilinearly
    (the same rule in 3-D).

    Parameters:
        raw: (N, K, h, w) or (N, K, d, h, w) signed maps.
        size: output (height, width), or (depth, height, width) for volumes.

    Returns:
        (N, K, H, W) or (N, K, D, H, W) float32 in [0, 1].

    Example:
        >>> normalize_maps(torch.tensor([[[[-1.0, 2.0]]]]), (1, 2))
        tensor([[[[0., 1.]]]])
        >>> normalize_maps(torch.ones(1, 1, 1, 2, 2), (2, 4, 4)).shape
        torch.Size([1, 1, 2, 4, 4])
    """
    n, k, *grid = raw.shape
    size = tuple(int(s) for s in size)
    if len(grid) != len(size) or len(size) not in (2, 3):
        raise ValueError(
            f"normalize_maps: maps of shape {tuple(raw.shape)} cannot be resized to {size}; "
            "give (H, W) for (N, K, h, w) maps or (D, H, W) for (N, K, d, h, w) maps"
        )
    positive = raw.float().relu().reshape(n * k, 1, *grid)
    if tuple(grid) != size:
        mode = "bilinear" if len(size) == 2 else "trilinear"
        positive = F.interpolate(positive, size=size, mode=mode, align_corners=False)
    peak = positive.flatten(1).amax(dim=1).view(-1, 1, *([1] * len(size)))
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


def box3d_from_map(volume_map: np.ndarray, threshold: float = 0.2) -> Box3D | None:
    """3-D bounding box of the largest region above ``threshold * max(volume_map)``.

    Zhou et al.'s rule in 3-D: keep the voxels above the threshold, take the largest connected
    component (26-connectivity: voxels touching by a face, an edge or a corner,
    ``scipy.ndimage.label``) and return its bounding box.

    Parameters:
        volume_map: (D, H, W) array (slice, row, column); larger means more important.
        threshold: fraction of the maximum, in [0, 1).

    Returns:
        ``(x0, y0, z0, x1, y1, z1)``: x the column (W axis), y the row (H axis), z the slice
        (D axis), in voxel-edge coordinates (the box covers columns ``x0 .. x1 - 1``, rows
        ``y0 .. y1 - 1``, slices ``z0 .. z1 - 1``); ``None`` when the map has no positive value.

    Example:
        >>> m = np.zeros((4, 5, 6)); m[1:3, 2:4, 3:6] = 1.0; m[0, 0, 0] = 1.0
        >>> box3d_from_map(m)
        (3, 2, 1, 6, 4, 3)
    """
    volume_map = np.asarray(volume_map, dtype=np.float64)
    if volume_map.ndim != 3:
        raise ValueError(
            f"box3d_from_map needs a (D, H, W) map, got shape {volume_map.shape}; "
            "use box_from_map for (H, W) maps"
        )
    peak = float(np.nanmax(volume_map)) if volume_map.size else 0.0
    if not peak > 0:
        return None
    labels, count = ndimage.label(volume_map > threshold * peak, structure=_TWENTY_SIX_CONNECTED)
    if count == 0:
        return None
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    slices = ndimage.find_objects((labels == largest).astype(np.int32))[0]
    (z0, z1), (y0, y1), (x0, x1) = ((int(s.start), int(s.stop)) for s in slices)
    return (x0, y0, z0, x1, y1, z1)


def world_box(box: Box3D, affine: np.ndarray) -> tuple[float, ...]:
    """The world extent of a voxel box: the axis-aligned bounds of its eight corners.

    The corners are the box's outer voxel faces (voxel centres sit at integer indices, so the
    box ``x0 .. x1`` spans ``x0 - 0.5 .. x1 - 0.5``), mapped by ``affine``, which takes a
    voxel index ``(d, h, w, 1)`` = (z, y, x, 1) to world millimetres (``camlens.io.volumes``
    convention: RAS+).

    Parameters:
        box: ``(x0, y0, z0, x1, y1, z1)`` from :func:`box3d_from_map`.
        affine: (4, 4) array.

    Returns:
        ``(xmin, ymin, zmin, xmax, ymax, zmax)`` in world coordinates (floats).

    Example:
        >>> world_box((0, 0, 0, 2, 2, 2), np.diag([3.0, 2.0, 1.0, 1.0]))
        (-1.5, -1.0, -0.5, 4.5, 3.0, 1.5)
    """
    x0, y0, z0, x1, y1, z1 = box
    corners = np.array(
        [(z, y, x) for z in (z0, z1) for y in (y0, y1) for x in (x0, x1)], dtype=np.float64
    )
    affine = np.asarray(affine, dtype=np.float64)
    world = (corners - 0.5) @ affine[:3, :3].T + affine[:3, 3]
    low, high = world.min(axis=0), world.max(axis=0)
    return tuple(float(v) for v in (*low, *high))
