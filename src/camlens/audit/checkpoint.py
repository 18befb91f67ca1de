"""The audit's map pass on disk, so that a killed audit resumes where it stopped.

The expensive part of an audit is the map pass: every image through the model. With an output
folder, each batch of maps is written, as it is folded, to ``OUT/maps/part-<first index>.npz``
(atomically, ``camlens.writers.atomic_path``) with everything the fold needs: indices, sources,
classes, predictions, the grid maps (float32, exact), the thumbnails (float16), the original
sizes, the layer and feature size, and the inputs that could not be read: about 28 kB per
image, mostly the 64 x 64 thumbnail. Parts are not compressed: zlib would save a quarter of the
disk space but cost about 1 ms per image on the driver, which folds (and, with Ray, receives)
every batch alone.

Batches are fixed slices of the audit's item list (``batch_size`` items from index 0, whatever
is already done), so a resumed audit folds exactly the batches, in exactly the order, of an
uninterrupted one: the stored parts are read back one at a time (no model calls), only the
slices without a readable part are computed. Every batch, stored or not, is folded in its
stored form (``stored_form``), so the result does not depend on whether it was resumed.

``OUT/audit_run.json`` holds the settings of the run (``run_settings``); a resume with other
settings is refused, naming the keys that differ (``camlens.runner.record_run_settings``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camlens.audit.maps import AuditItem, MapBatch
from camlens.models import Classifier
from camlens.writers import atomic_path

__all__ = [
    "PARTS_DIR",
    "RUN_FILE",
    "MapParts",
    "checkpointed_batches",
    "run_settings",
    "stored_form",
]

#: Folder of the stored map batches, inside the output folder.
PARTS_DIR = "maps"
#: The settings of the run that wrote the parts (a resume must use the same).
RUN_FILE = "audit_run.json"
#: What reading a damaged or foreign part raises.
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def stored_form(batch: MapBatch) -> MapBatch:
    """``batch`` as a part holds it: thumbnails rounded to float16 (maps stay float32).

    Every batch is folded in this form, stored or not, so that an audit gives the same result
    with or without an output folder, resumed or not. The thumbnails only feed the report's
    mean images, drawn with 8 bits per channel: float16 (about 3 decimal digits) loses nothing
    visible.

    Example:
        >>> stored_form(batch).thumbs.dtype
        torch.float32
    """
    return dataclasses.replace(batch, thumbs=batch.thumbs.to(torch.float16).float())


class MapParts:
    """The stored map batches of one output folder (``OUT/maps/part-<first index>.npz``).

    Parameters:
        folder: the parts folder (created on the first write).

    Example:
        >>> parts = MapParts(Path("audit_out/maps"))
        >>> parts.path(64).name
        'part-000000064.npz'
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, first: int) -> Path:
        """Where the part of the slice that starts at item ``first`` lives."""
        return self.folder / f"part-{first:09d}.npz"

    def remove_leftovers(self) -> int:
        """Delete the temporary files of parts whose write was interrupted; return how many."""
        if not self.folder.is_dir():
            return 0
        leftovers = list(self.folder.glob(".part-*.tmp"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def write(self, chunk: Sequence[AuditItem], batch: MapBatch) -> Path:
        """Store the batch of the slice ``chunk`` (atomically)."""
        errors = batch.errors
        arrays = dict(
            slice=np.array([chunk[0][0], chunk[-1][0] + 1], dtype=np.int64),
            indices=np.array(batch.indices, dtype=np.int64),
            sources=np.array(batch.sources, dtype=str),
            maps=batch.maps.numpy().astype(np.float32),
            classes=batch.classes.numpy().astype(np.int64),
            predicted=batch.predicted.numpy().astype(np.int64),
            thumbs=batch.thumbs.numpy().astype(np.float16),
            sizes=np.array(batch.sizes, dtype=np.int64).reshape(-1, 2),
            error_indices=np.array([i for i, _, _ in errors], dtype=np.int64),
            error_sources=np.array([s for _, s, _ in errors], dtype=str),
            error_messages=np.array([m for _, _, m in errors], dtype=str),
            layer=np.array(batch.layer, dtype=str),
            feature_size=np.array(batch.feature_size, dtype=np.int64),
        )
        path = self.path(chunk[0][0])
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        return path

    def read(self, chunk: Sequence[AuditItem]) -> MapBatch:
        """The stored batch of the slice ``chunk``.

        Raises:
            OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile: the part is missing,
                damaged, or holds another slice.
        """
        with np.load(self.path(chunk[0][0]), allow_pickle=False) as part:
            indices = [int(i) for i in part["indices"]]
            error_indices = [int(i) for i in part["error_indices"]]
            if sorted(indices + error_indices) != [item[0] for item in chunk]:
                raise ValueError(f"{self.path(chunk[0][0])} holds other images than its slice")
            return MapBatch(
                indices=indices,
                sources=[str(s) for s in part["sources"]],
                maps=torch.from_numpy(part["maps"].astype(np.float32)),
                classes=torch.from_numpy(part["classes"].astype(np.int64)),
                predicted=torch.from_numpy(part["predicted"].astype(np.int64)),
                thumbs=torch.from_numpy(part["thumbs"].astype(np.float32)),
                sizes=[(int(w), int(h)) for w, h in part["sizes"]],
                errors=[
                    (i, str(s), str(m))
                    for i, s, m in zip(
                        error_indices, part["error_sources"], part["error_messages"], strict=True
                    )
                ],
                layer=str(part["layer"]),
                feature_size=tuple(int(v) for v in part["feature_size"]),
            )

    def readable(self, chunk: Sequence[AuditItem]) -> bool:
        """Whether the slice ``chunk`` has an intact part; a damaged one is deleted."""
        path = self.path(chunk[0][0])
        if not path.exists():
            return False
        try:
            self.read(chunk)
        except _UNREADABLE:
            path.unlink(missing_ok=True)
            return False
        return True


def checkpointed_batches(
    work: Sequence[AuditItem],
    batch_size: int,
    parts: MapParts | None,
    compute: Callable[[list[AuditItem]], Iterable[MapBatch]],
) -> Iterator[MapBatch]:
    """The map batches of ``work``, in order, as fixed slices of ``batch_size`` items.

    Slices with an intact part in ``parts`` are read back (one at a time); the others are
    computed by ``compute`` (called once, with the items of all of them, in order; it must
    return one batch per ``batch_size`` items, as ``local_map_batches`` and
    ``ray_map_batches`` do) and stored. Every batch comes out in ``stored_form``.

    Parameters:
        work: the audit's items, ``(index, source, class)`` with index = position.
        batch_size: items per slice.
        parts: where the batches are stored, or None (compute all, store nothing).
        compute: the engine.

    Example:
        >>> for batch in checkpointed_batches(work, 32, MapParts(out / "maps"), engine):
        ...     fold(batch)
    """
    slices = [work[start : start + batch_size] for start in range(0, len(work), batch_size)]
    if parts is not None:
        parts.remove_leftovers()
    stored = [parts is not None and parts.readable(chunk) for chunk in slices]
    missing = [
        item for chunk, done in zip(slices, stored, strict=True) if not done for item in chunk
    ]
    computed = iter(compute(missing)) if missing else iter(())
    for chunk, done in zip(slices, stored, strict=True):
        if parts is not None and done:
            yield parts.read(chunk)
            continue
        batch = stored_form(next(computed))
        covered = sorted([*batch.indices, *(i for i, _, _ in batch.errors)])
        if covered != [item[0] for item in chunk]:
            raise RuntimeError(
                f"the map engine returned images {covered[:3]}... for the slice that starts at "
                f"{chunk[0][0]}; batches must be consecutive slices of {batch_size} items"
            )
        if parts is not None:
            parts.write(chunk, batch)
        yield batch


# --- the run's settings ----------------------------------------------------------------------


def run_settings(
    classifier: Classifier,
    paths: Sequence[Any],
    item_classes: Sequence[int] | None,
    **settings: Any,
) -> dict[str, Any]:
    """Everything an audit's result depends on (kept in ``audit_run.json``).

    Parameters:
        classifier: the model (its name, a digest of its weights and of its class names).
        paths, item_classes: the resolved items, their files and classes (their number and
            a digest of them).
        settings: the other settings (method, layer, data, seed, batch size, grid...).

    Example:
        >>> run_settings(model, ["a.png"], [0], method="cam", seed=0)["n_items"]
        1
    """
    items = hashlib.sha256()
    for i, path in enumerate(paths):
        items.update(
            json.dumps([str(path), None if item_classes is None else item_classes[i]]).encode()
        )
    weights = hashlib.sha256()
    for name, tensor in classifier.module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        weights.update(f"{name} {flat.dtype} {tuple(tensor.shape)}".encode())
        weights.update(flat.view(torch.uint8).numpy().tobytes())  # any dtype, bfloat16 too
    return {
        "format": 1,
        "model": classifier.name,
        "model_sha256": weights.hexdigest(),
        "labels_sha256": _digest(list(classifier.labels)),
        "n_items": len(paths),
        "items_sha256": items.hexdigest(),
        **settings,
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode("utf-8")).hexdigest()
