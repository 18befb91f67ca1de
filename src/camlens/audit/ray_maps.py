"""The audit's Ray engine: maps computed by a pool of Ray actors, statistics kept by the driver.

Ray Data reads the ``(index, source, class)`` items; ``map_batches`` sends batches to actors
that each load the model once (``MapComputer``) and return, per image, its grid map, classes,
thumbnail and size (a few kilobytes, never the input-size maps); the driver folds them into
the audit statistics in input order (``preserve_order``), exactly as the local engine does,
so both engines give the same audit. The counterfactual tests (a few hundred forward passes)
run on the driver. Ray is started by ``camlens.ray_engine.ordered_map_batches``, the one
start-up every command shares. Needs the ``ray`` extra: ``pip install 'camlens[ray]'``;
``address`` connects to a running cluster (see ``camlens.ray_engine``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from camlens.audit.maps import AuditItem, MapBatch, MapComputer
from camlens.models import Classifier, load_model
from camlens.ray_engine import model_for_actors, ordered_map_batches

__all__ = ["ray_map_batches"]

_NO_CLASS = -1


class _RayMapper:
    """Actor: one ``MapComputer``; batches of items in, per-image rows out."""

    def __init__(self, model: Classifier | str, method: str, layer: str | None, grid: int):
        torch.set_num_threads(1)
        classifier = load_model(model) if isinstance(model, str) else model
        self.computer = MapComputer(classifier, method, layer, grid=grid)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [
            (int(i), str(s), None if int(c) == _NO_CLASS else int(c))
            for i, s, c in zip(batch["index"], batch["source"], batch["cls"], strict=True)
        ]
        result = self.computer.compute_items(items)
        return _rows(result, items, self.computer.grid, self.computer.thumb_side)


def _rows(
    result: MapBatch, items: Sequence[AuditItem], grid: int, thumb_side: int
) -> dict[str, np.ndarray]:
    """One row per item, in item order (unreadable items carry their error message)."""
    n = len(items)
    position = {index: row for row, index in enumerate(result.indices)}
    errors = {index: message for index, _, message in result.errors}
    rows = {
        "index": np.array([i for i, _, _ in items], dtype=np.int64),
        "source": np.array([s for _, s, _ in items], dtype=object),
        "error": np.array([errors.get(i, "") for i, _, _ in items], dtype=object),
        "maps": np.zeros((n, grid * grid), dtype=np.float32),
        "cls": np.zeros(n, dtype=np.int64),
        "predicted": np.zeros(n, dtype=np.int64),
        "thumbs": np.zeros((n, 3 * thumb_side * thumb_side), dtype=np.float32),
        "size": np.zeros((n, 2), dtype=np.int64),
        "feature_size": np.zeros((n, 2), dtype=np.int64),
        "layer": np.array([result.layer] * n, dtype=object),
    }
    for out, (index, _, _) in enumerate(items):
        row = position.get(index)
        if row is None:
            continue
        rows["maps"][out] = result.maps[row].reshape(-1).numpy()
        rows["cls"][out] = int(result.classes[row])
        rows["predicted"][out] = int(result.predicted[row])
        rows["thumbs"][out] = result.thumbs[row].reshape(-1).numpy()
        rows["size"][out] = result.sizes[row]
        rows["feature_size"][out] = result.feature_size
    return rows


def _batch(rows: dict[str, np.ndarray], grid: int) -> MapBatch:
    good = np.array([not e for e in rows["error"]], dtype=bool)
    side = round((rows["thumbs"].shape[1] // 3) ** 0.5)
    sizes = [tuple(int(v) for v in s) for s in rows["size"][good]]
    feature = rows["feature_size"][good]
    return MapBatch(
        indices=[int(i) for i in rows["index"][good]],
        sources=[str(s) for s in rows["source"][good]],
        maps=torch.from_numpy(rows["maps"][good].reshape(-1, grid, grid).copy()),
        classes=torch.from_numpy(rows["cls"][good].copy()),
        predicted=torch.from_numpy(rows["predicted"][good].copy()),
        thumbs=torch.from_numpy(rows["thumbs"][good].reshape(-1, 3, side, side).copy()),
        sizes=sizes,
        errors=[
            (int(i), str(s), str(e))
            for i, s, e in zip(rows["index"], rows["source"], rows["error"], strict=True)
            if e
        ],
        layer=str(rows["layer"][good][0]) if good.any() else "",
        feature_size=tuple(int(v) for v in feature[0]) if good.any() else (0, 0),
    )


def ray_map_batches(
    model: Classifier | str,
    method: str,
    layer: str | None,
    grid: int,
    items: Sequence[AuditItem],
    batch_size: int,
    *,
    address: str | None = None,
    workers: int | None = None,
) -> Iterator[MapBatch]:
    """``MapBatch`` objects for ``items``, in order, computed on Ray actors."""
    spec = model_for_actors(model) if isinstance(model, Classifier) else model
    batches = ordered_map_batches(
        [{"index": i, "source": s, "cls": _NO_CLASS if c is None else c} for i, s, c in items],
        _RayMapper,
        {"model": spec, "method": method, "layer": layer, "grid": grid},
        batch_size,
        address=address,
        workers=workers,
    )
    for rows in batches:
        yield _batch(rows, grid)
