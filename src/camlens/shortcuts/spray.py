"""Group: Spectral Relevance Analysis (SpRAy, Lapuschkin et al. 2019).

Per class, the maps are downsampled to a small grid, flattened and clustered with spectral
clustering on a k-nearest-neighbour graph; the number of clusters is read from the eigengap
of the graph's normalised Laplacian. Distinct strategies of the model (looking at the object
vs. looking at a tag in the corner) become distinct clusters, each with its size, mean map and
exemplar images (the members closest to the cluster's mean map).

Memory is bounded: each class keeps at most ``capacity`` maps, a seeded reservoir sample
(Vitter's Algorithm R) of all its maps, so every image has the same chance to be kept
whatever the order and the size of the data set.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import csgraph, csr_matrix

from camlens.errors import ConfigError
from camlens.localize import box_from_map

__all__ = [
    "Cluster",
    "Reservoir",
    "SprayResult",
    "eigengap_cluster_count",
    "knn_affinity",
    "spectral_relevance_analysis",
]


class Reservoir:
    """A seeded uniform sample of at most ``capacity`` items from a stream (Algorithm R).

    Parameters:
        capacity: the most items kept.
        seed: anything ``numpy.random.default_rng`` accepts; the same seed and stream give
            the same sample.

    Example:
        >>> r = Reservoir(3, seed=0)
        >>> for i in range(100):
        ...     r.add(i)
        >>> len(r.items), r.seen
        (3, 100)
    """

    def __init__(self, capacity: int, seed: Any = 0) -> None:
        if capacity < 1:
            raise ConfigError(f"a reservoir needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self.items: list[Any] = []
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def add(self, item: Any) -> None:
        """Offer one item: kept with probability ``capacity / seen``."""
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            slot = int(self._rng.integers(0, self.seen + 1))
            if slot < self.capacity:
                self.items[slot] = item
        self.seen += 1


class ClassReservoirs:
    """One ``Reservoir`` per key (class), each seeded by ``(seed, key)``."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.seed = seed
        self.by_key: dict[Hashable, Reservoir] = {}

    def add(self, key: int, item: Any) -> None:
        if key not in self.by_key:
            self.by_key[key] = Reservoir(self.capacity, seed=[self.seed, int(key)])
        self.by_key[key].add(item)

    def items(self, key: int) -> list[Any]:
        return self.by_key[key].items if key in self.by_key else []


def knn_affinity(vectors: np.ndarray, n_neighbors: int) -> csr_matrix:
    """Symmetric k-nearest-neighbour connectivity: ``A = (C + C^T) / 2`` with ``C[i, j] = 1``
    when ``j`` is among the ``n_neighbors`` nearest neighbours of ``i`` (Euclidean).

    Example:
        >>> knn_affinity(np.array([[0.0], [1.0], [5.0]]), 1).toarray()
        array([[0. , 1. , 0. ],
               [1. , 0. , 0.5],
               [0. , 0.5, 0. ]])
    """
    from sklearn.neighbors import kneighbors_graph  # imported on use (~0.5 s), as below

    connectivity = kneighbors_graph(vectors, n_neighbors, mode="connectivity", include_self=False)
    return csr_matrix(0.5 * (connectivity + connectivity.T))


def eigengap_cluster_count(
    affinity: csr_matrix | np.ndarray, max_clusters: int
) -> tuple[int, list[float]]:
    """Number of clusters from the eigengap of the normalised graph Laplacian.

    With eigenvalues ``l_0 <= l_1 <= ...`` of ``L = I - D^-1/2 A D^-1/2``, the count is the
    ``k`` in ``1..max_clusters`` with the largest gap ``l_k - l_(k-1)``: a graph of ``k``
    well-separated groups has ``k`` eigenvalues near 0 and then a jump.

    Returns:
        ``(k, eigenvalues)``: the count and the ``max_clusters + 1`` smallest eigenvalues.

    Example:
        >>> a = np.kron(np.eye(2), np.ones((3, 3)) - np.eye(3))  # two triangles
        >>> eigengap_cluster_count(a, 4)[0]
        2
    """
    dense = affinity.toarray() if hasattr(affinity, "toarray") else np.asarray(affinity, float)
    n = dense.shape[0]
    if n < 3:
        return 1, [0.0] * n
    laplacian = csgraph.laplacian(dense, normed=True)
    values = np.clip(np.linalg.eigvalsh(laplacian), 0.0, None)[: max_clusters + 1]
    gaps = np.diff(values)
    count = int(np.argmax(gaps)) + 1 if len(gaps) else 1
    return count, [round(float(v), 6) for v in values]


@dataclass
class Cluster:
    """One group of similar maps.

    Attributes:
        members: indices (into the analysed maps) of the cluster's maps.
        mean_map: (S, S) mean of the members' maps.
        exemplars: the members closest to the mean map, closest first.
        focus: Zhou's box (20 % threshold) of the mean map, as fractions of the image.
    """

    members: list[int]
    mean_map: np.ndarray
    exemplars: list[int]
    focus: tuple[float, float, float, float] | None

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass
class SprayResult:
    """SpRAy on one class: the clusters (largest first) and the eigenvalues behind the count."""

    n_maps: int
    n_clusters: int
    eigenvalues: list[float]
    labels: np.ndarray
    clusters: list[Cluster] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_maps": self.n_maps,
            "n_clusters": self.n_clusters,
            "eigenvalues": self.eigenvalues,
        }


def spectral_relevance_analysis(
    maps: np.ndarray,
    *,
    max_clusters: int = 6,
    n_neighbors: int | None = None,
    n_exemplars: int = 4,
    seed: int = 0,
) -> SprayResult:
    """Cluster one class's maps (SpRAy).

    Parameters:
        maps: (N, S, S) maps in [0, 1], already downsampled.
        max_clusters: the largest number of clusters the eigengap may choose.
        n_neighbors: neighbours in the affinity graph (default ``min(10, N - 1)``).
        n_exemplars: exemplars per cluster.
        seed: seeds the spectral embedding's label assignment.

    Returns:
        A ``SprayResult``; fewer than 3 maps make one cluster.

    Example:
        >>> a = np.zeros((10, 4, 4)); a[:5, 0, 0] = 1; a[5:, 3, 3] = 1
        >>> spectral_relevance_analysis(a, n_neighbors=3).n_clusters
        2
    """
    maps = np.asarray(maps, dtype=np.float64)
    n = len(maps)
    if n == 0:
        return SprayResult(0, 0, [], np.zeros(0, dtype=np.int64))
    vectors = maps.reshape(n, -1)
    labels = np.zeros(n, dtype=np.int64)
    count, eigenvalues = 1, [0.0]
    if n >= 3:
        k = min(n_neighbors or 10, n - 1)
        affinity = knn_affinity(vectors, k)
        count, eigenvalues = eigengap_cluster_count(affinity, min(max_clusters, n - 1))
        if count > 1:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Graph is not fully connected")
                from sklearn.cluster import SpectralClustering

                labels = SpectralClustering(
                    n_clusters=count,
                    affinity="precomputed",
                    assign_labels="cluster_qr",
                    random_state=seed,
                ).fit_predict(affinity)
    clusters = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        mean = maps[members].mean(axis=0)
        distances = np.linalg.norm(vectors[members] - mean.reshape(-1), axis=1)
        order = members[np.argsort(distances, kind="stable")]
        box = box_from_map(mean)
        focus = None
        if box is not None:
            side_y, side_x = mean.shape
            focus = (box[0] / side_x, box[1] / side_y, box[2] / side_x, box[3] / side_y)
        clusters.append(Cluster(members.tolist(), mean, order[:n_exemplars].tolist(), focus))
    clusters.sort(key=lambda c: (-c.size, c.members[0]))
    return SprayResult(n, len(clusters), eigenvalues, labels, clusters)
