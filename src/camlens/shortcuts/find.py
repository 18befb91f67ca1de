"""Find: where does the model look for each class, across a whole data set?

Maps arrive in batches and are folded into per-class statistics on a fixed grid (``grid`` x
``grid`` cells covering the whole image, whatever its size), so memory does not grow with the
number of images:

* the **mean map** of each class: the mean of its normalised maps (``normalize_maps``: relu,
  resize, divide by the maximum);
* the **top-pixel frequency** of each class: for every cell, the share of the class's images
  whose map has that cell among its ``top_fraction`` most activated cells.

Objects move from image to image, so on honest data the frequency is spread thin (about
``top_fraction`` everywhere). A shortcut at a fixed place (a source tag in a corner, a ruler
along an edge) is hot on most images of its class *at the same cells*. ``find_hotspots``
finds such compact regions on the frequency map with ``scipy.ndimage`` and keeps those that
are hot for this class much more often than for the other classes (a place where the objects
of every class tend to be is not a class-specific shortcut).

How many images a region affects needs each image's top cells once the region is known; they
are spooled, 1 bit per cell, to a temporary file (``TopCellSpool``) instead of kept in memory.

With annotations (boxes or masks), every image also gets the share of its map's mass that
lies *outside* the object, and the worst images are kept (a bounded heap).
"""

from __future__ import annotations

import heapq
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from camlens.errors import ConfigError
from camlens.io.annotations import mask_box
from camlens.writers import Closing

__all__ = [
    "ClassMapStats",
    "Hotspot",
    "MapAccumulator",
    "TopCellSpool",
    "find_hotspots",
    "heat_share",
    "region_box",
    "top_cell_masks",
]

BoxF = tuple[float, float, float, float]
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def top_cell_masks(maps: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """Which cells of each map are among its ``top_fraction`` most activated ones.

    Parameters:
        maps: (N, G, G) maps in [0, 1].
        top_fraction: share of the cells to mark, in (0, 1]; at least one cell is marked.

    Returns:
        (N, G, G) bool; a map without any positive value marks nothing.

    Example:
        >>> m = torch.tensor([[[0.1, 0.9], [0.5, 0.0]]])
        >>> top_cell_masks(m, 0.5)
        tensor([[[False,  True],
                 [ True, False]]])
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ConfigError(f"top_fraction must lie in (0, 1], got {top_fraction}")
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    k = max(1, math.ceil(top_fraction * flat.shape[1]))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen.scatter_(1, flat.topk(k, dim=1).indices, True)
    chosen &= (flat.amax(dim=1, keepdim=True) > 0) & (flat > 0)
    return chosen.reshape(maps.shape)


@dataclass
class ClassMapStats:
    """Running statistics of one class's maps on the grid.

    Attributes:
        count: images of the class seen.
        heated: images whose map has a positive value (only these enter the frequency).
        map_sum: (G, G) sum of the normalised maps.
        top_count: (G, G) how many maps had each cell among their top cells.
        image_sum: (3, S, S) sum of the images in [0, 1] (for the report's mean image).
        object_count: (G, G) with annotations: how many annotated images have their object on
            each cell; ``n_objects`` such images.
        n_annotated: annotated images with a non-empty map (they enter the outside share).
        outside_sum: sum over annotated images of the share of map mass outside the object.
        mostly_outside: annotated images with more than half of the mass outside the object.
        worst: min-heap of ``(outside_share, index, source)``, the worst ``n_worst`` images.
    """

    count: int = 0
    heated: int = 0
    map_sum: np.ndarray | None = None
    top_count: np.ndarray | None = None
    image_sum: np.ndarray | None = None
    object_count: np.ndarray | None = None
    n_objects: int = 0
    n_annotated: int = 0
    outside_sum: float = 0.0
    mostly_outside: int = 0
    worst: list[tuple[float, int, str]] = field(default_factory=list)

    @property
    def mean_map(self) -> np.ndarray:
        """(G, G) mean normalised map (zeros before any image)."""
        return self.map_sum / max(self.count, 1)

    @property
    def frequency(self) -> np.ndarray:
        """(G, G) share of the class's heated maps that have each cell among their top cells."""
        return self.top_count / max(self.heated, 1)

    @property
    def object_frequency(self) -> np.ndarray:
        """(G, G) share of the annotated images whose object covers each cell."""
        return self.object_count / max(self.n_objects, 1)

    @property
    def mean_image(self) -> np.ndarray:
        """(S, S, 3) mean image in [0, 1]."""
        return np.transpose(self.image_sum / max(self.count, 1), (1, 2, 0))


class MapAccumulator:
    """Fold batches of maps into per-class statistics (bounded memory).

    Parameters:
        grid: side of the grid the maps are compared on.
        top_fraction: share of cells counted as a map's "top" cells.
        image_side: side of the accumulated mean images.
        n_worst: annotated images kept per class, worst outside share first.

    Example:
        >>> acc = MapAccumulator(grid=4, top_fraction=0.25)
        >>> tops = acc.update(torch.rand(8, 4, 4), torch.zeros(8, dtype=torch.long))
        >>> acc.stats[0].count, tops.shape
        (8, torch.Size([8, 4, 4]))
    """

    def __init__(
        self,
        *,
        grid: int = 32,
        top_fraction: float = 0.05,
        image_side: int = 64,
        n_worst: int = 8,
    ) -> None:
        if grid < 2:
            raise ConfigError(f"the grid needs at least 2 x 2 cells, got {grid}")
        self.grid = grid
        self.top_fraction = top_fraction
        self.image_side = image_side
        self.n_worst = n_worst
        self.stats: dict[int, ClassMapStats] = {}

    def class_stats(self, cls: int) -> ClassMapStats:
        if cls not in self.stats:
            g, s = self.grid, self.image_side
            self.stats[cls] = ClassMapStats(
                map_sum=np.zeros((g, g)),
                top_count=np.zeros((g, g), dtype=np.int64),
                image_sum=np.zeros((3, s, s)),
                object_count=np.zeros((g, g), dtype=np.int64),
            )
        return self.stats[cls]

    def update(
        self,
        maps: torch.Tensor,
        classes: torch.Tensor,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add a batch; return its top-cell masks (N, G, G) bool (for ``TopCellSpool``).

        Sums are taken in float64, so the statistics do not depend on how the maps are
        grouped into batches.

        Parameters:
            maps: (N, G, G) normalised maps on the grid.
            classes: (N,) class index of each image.
            images: (N, 3, S, S) images in [0, 1] at ``image_side``, or None.
        """
        if maps.shape[-2:] != (self.grid, self.grid):
            raise ConfigError(f"maps must be {self.grid} x {self.grid}, got {tuple(maps.shape)}")
        maps = maps.detach().float().cpu()
        tops = top_cell_masks(maps, self.top_fraction)
        heated = maps.flatten(1).amax(dim=1) > 0
        for cls in classes.unique().tolist():
            members = classes == cls
            stats = self.class_stats(int(cls))
            stats.count += int(members.sum())
            stats.heated += int((members & heated).sum())
            stats.map_sum += maps[members].double().sum(dim=0).numpy()
            stats.top_count += tops[members].sum(dim=0).numpy()
            if images is not None:
                stats.image_sum += images[members].double().sum(dim=0).numpy()
        return tops

    def add_object(
        self, cls: int, index: int, source: str, grid_map: np.ndarray, obj: np.ndarray
    ) -> float | None:
        """Record an annotated image: its (G, G) map and object mask on the grid.

        Returns:
            The share of the map's mass outside the object, or None when the map is empty.
        """
        stats = self.class_stats(cls)
        stats.object_count += obj.astype(np.int64)
        stats.n_objects += 1
        share = outside_share(grid_map, obj)
        if share is None:
            return None
        stats.n_annotated += 1
        stats.outside_sum += share
        stats.mostly_outside += share > 0.5
        item = (share, -index, source)
        if len(stats.worst) < self.n_worst:
            heapq.heappush(stats.worst, item)
        else:
            heapq.heappushpop(stats.worst, item)
        return share

    def other_frequency(self, cls: int) -> np.ndarray:
        """(G, G) top-cell frequency pooled over every class but ``cls``."""
        top = np.zeros((self.grid, self.grid))
        heated = 0
        for other, stats in self.stats.items():
            if other != cls:
                top += stats.top_count
                heated += stats.heated
        return top / max(heated, 1)


def outside_share(grid_map: np.ndarray, obj: np.ndarray) -> float | None:
    """Share of a map's mass that lies outside the object mask (None for an empty map).

    Example:
        >>> outside_share(np.array([[1.0, 3.0]]), np.array([[True, False]]))
        0.75
    """
    total = float(grid_map.sum())
    if not total > 0:
        return None
    return float(grid_map[~obj].sum()) / total


def heat_share(mean_map: np.ndarray, region: np.ndarray) -> float:
    """Share of a (mean) map's mass inside ``region`` (a boolean mask of the same shape).

    Example:
        >>> heat_share(np.array([[1.0, 3.0], [0.0, 0.0]]), np.array([[False, True], [False, False]]))
        0.75
    """
    total = float(mean_map.sum())
    return float(mean_map[region].sum()) / total if total > 0 else 0.0


@dataclass
class Hotspot:
    """A compact region that is hot on many images of one class at the same place.

    Attributes:
        cls: the class index.
        region: (G, G) bool, the region's cells.
        box: ``(x0, y0, x1, y1)`` of the region as fractions of the image width and height.
        cells: the region's box in grid cells (exclusive ends).
        area: the region's cells as a share of the image.
        frequency: mean top-cell frequency of the class over the region's cells.
        peak_frequency: highest top-cell frequency in the region.
        other_frequency: mean top-cell frequency of the other classes over the region.
    """

    cls: int
    region: np.ndarray
    box: BoxF
    cells: tuple[int, int, int, int]
    area: float
    frequency: float
    peak_frequency: float
    other_frequency: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [round(v, 4) for v in self.box],
            "area": round(self.area, 4),
            "frequency": round(self.frequency, 4),
            "peak_frequency": round(self.peak_frequency, 4),
            "other_frequency": round(self.other_frequency, 4),
        }


def region_box(region: np.ndarray) -> tuple[tuple[int, int, int, int], BoxF]:
    """Bounding box of a (G, G) mask, in cells and as fractions of the image.

    Example:
        >>> m = np.zeros((4, 4), dtype=bool); m[0:2, 1:3] = True
        >>> region_box(m)
        ((1, 0, 3, 2), (0.25, 0.0, 0.75, 0.5))
    """
    cells = mask_box(region)
    height, width = region.shape
    return cells, (cells[0] / width, cells[1] / height, cells[2] / width, cells[3] / height)


def find_hotspots(
    frequency: np.ndarray,
    other_frequency: np.ndarray | None = None,
    *,
    cls: int = 0,
    min_frequency: float = 0.3,
    specificity: float = 2.0,
    max_area: float = 0.25,
) -> list[Hotspot]:
    """Compact regions whose cells are top cells on many of a class's images.

    A region grows (8-connected) over the cells with a frequency of at least
    ``min_frequency / 2`` around a seed of at least ``min_frequency`` (hysteresis, so that the
    box covers the whole hot spot and not only its core). It is kept when it covers at most
    ``max_area`` of the image (compact; an object-sized blob in the middle is not a hotspot)
    and when its mean frequency is at least ``specificity`` times the other classes' mean
    frequency there (a place where every class looks is not a shortcut of one class).

    Parameters:
        frequency: (G, G) top-cell frequency of the class, in [0, 1].
        other_frequency: (G, G) the same for the other classes pooled; None skips the check.
        cls: the class index stored in the results.
        min_frequency: seed level.
        specificity: required ratio to the other classes' frequency.
        max_area: largest region, as a share of the image.

    Returns:
        The hotspots, most frequent first.

    Example:
        >>> f = np.full((8, 8), 0.05); f[0:2, 0:2] = 0.9
        >>> [h.box for h in find_hotspots(f)]
        [(0.0, 0.0, 0.25, 0.25)]
    """
    frequency = np.asarray(frequency, dtype=np.float64)
    seeds = frequency >= min_frequency
    if not seeds.any():
        return []
    labels, count = ndimage.label(frequency >= min_frequency / 2, structure=_EIGHT_CONNECTED)
    grid_cells = frequency.size
    hotspots = []
    for label in range(1, count + 1):
        region = labels == label
        if not (region & seeds).any() or region.sum() / grid_cells > max_area:
            continue
        mean = float(frequency[region].mean())
        other = float(other_frequency[region].mean()) if other_frequency is not None else 0.0
        if other_frequency is not None and mean < specificity * other:
            continue
        cells, box = region_box(region)
        hotspots.append(
            Hotspot(
                cls=cls,
                region=region,
                box=box,
                cells=cells,
                area=float(region.sum()) / grid_cells,
                frequency=mean,
                peak_frequency=float(frequency[region].max()),
                other_frequency=other,
            )
        )
    return sorted(hotspots, key=lambda h: -h.peak_frequency)


class TopCellSpool(Closing):
    """Each image's top-cell mask, 1 bit per cell, in a temporary file (not in memory).

    Example:
        >>> with TopCellSpool(grid=4) as spool:
        ...     spool.append(torch.zeros(3, 4, 4, dtype=torch.bool), torch.tensor([0, 1, 0]))
        ...     region = np.zeros((4, 4), dtype=bool); region[0, 0] = True
        ...     spool.count_covering([(0, region)], min_cover=0.5)
        [0]
    """

    def __init__(self, grid: int, *, chunk: int = 4096) -> None:
        self.grid = grid
        self.row_bytes = (grid * grid + 7) // 8
        self.chunk = chunk
        self.classes: list[int] = []
        self._file = tempfile.TemporaryFile(prefix="camlens-audit-")  # noqa: SIM115

    def append(self, tops: torch.Tensor, classes: torch.Tensor) -> None:
        """Add the (N, G, G) masks of a batch and the (N,) class of each image."""
        packed = np.packbits(tops.reshape(tops.shape[0], -1).numpy().astype(bool), axis=1)
        self._file.seek(0, 2)
        self._file.write(packed.tobytes())
        self.classes.extend(int(c) for c in classes.tolist())

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self._file.seek(0)
        classes = np.asarray(self.classes, dtype=np.int64)
        start = 0
        while start < len(classes):
            data = self._file.read(self.chunk * self.row_bytes)
            rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, self.row_bytes)
            bits = np.unpackbits(rows, axis=1, count=self.grid * self.grid).astype(bool)
            yield classes[start : start + len(rows)], bits
            start += len(rows)

    def count_covering(self, regions: list[tuple[int, np.ndarray]], min_cover: float) -> list[int]:
        """For each ``(class, region)``: the class's images whose top cells cover at least
        ``min_cover`` of the region's cells (the region is hot on that image).

        Parameters:
            regions: class index and (G, G) bool region, one pair per question.
            min_cover: share of the region's cells that must be top cells, in (0, 1].
        """
        counts = [0] * len(regions)
        flat = [(cls, region.reshape(-1)) for cls, region in regions]
        for classes, bits in self._chunks():
            for i, (cls, region) in enumerate(flat):
                members = bits[classes == cls]
                if len(members):
                    cover = members[:, region].sum(axis=1) / max(int(region.sum()), 1)
                    counts[i] += int((cover >= min_cover).sum())
        return counts

    def close(self) -> None:
        self._file.close()
