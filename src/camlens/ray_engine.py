"""The Ray engine: the same jobs as the local engine, spread over a pool of Ray actors.

One start-up serves every batch command (``camlens explain``, ``camlens evaluate``,
``camlens audit``): :func:`ordered_map_batches` starts or joins Ray (:func:`ray_session`), lets
Ray Data read the list of work items, sends batches of them to a pool of actors (each loads
the model once) and gives the driver the actors' output batches in input order
(``preserve_order``). What the actors do is the command's: ``explain`` writes every input's
overlays and raw maps with the same writers as the local engine and returns its record
(``_RayExplainer`` below), ``evaluate`` returns per-image metric records, ``audit`` returns
small per-image maps; the driver appends records and folds statistics exactly as the local
engine does, so both engines give the same results.

On a cluster, the output folder must be on a file system that every node sees (NFS, a
mounted bucket...), since explain's actors write overlays and raw maps there directly, and the
input images must be readable from every node at the same paths. Start the cluster
(``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on the others) and pass
``--engine ray --ray-address HEAD:6379``. Without an address a local Ray is started with this
machine's cores; a Ray already initialised in the calling process (``ray.init(...)``) is
used as it is. Needs the ``ray`` extra: ``pip install 'camlens[ray]'``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camlens.errors import ConfigError
from camlens.models import Classifier
from camlens.runner import BatchExplainer, ExplainJob

__all__ = ["model_for_actors", "ordered_map_batches", "ray_records", "ray_session"]


@contextlib.contextmanager
def ray_session(address: str | None = None, workers: int | None = None) -> Iterator[int]:
    """Start Ray (or join the cluster at ``address``, or use the Ray this process already
    initialised) and yield the number of actors to use: ``workers``, else one per CPU.

    Ray Data is set to keep the input order and to show no progress bars. A Ray started here
    is shut down on exit, also on error.

    Example:
        >>> with ray_session(workers=2) as n_workers:
        ...     ...  # ray.data pipelines
    """
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ConfigError("--engine ray needs the ray extra: pip install 'camlens[ray]'") from error
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            num_cpus=None if address else os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        yield workers or max(1, int(ray.available_resources().get("CPU", 1)))
    finally:
        if started_here:
            ray.shutdown()


def ordered_map_batches(
    rows: Sequence[Mapping[str, Any]],
    actor_cls: type,
    actor_kwargs: Mapping[str, Any],
    batch_size: int,
    *,
    address: str | None = None,
    workers: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``actor_cls`` over ``rows`` on a pool of Ray actors; yield the output batches in
    input order.

    Parameters:
        rows: the work items, small JSON-like dicts of equal keys (paths, indices...).
        actor_cls: a callable class: ``actor_cls(**actor_kwargs)`` once per actor (load the
            model there), then ``actor(batch)`` with ``batch`` a dict of numpy columns of at
            most ``batch_size`` rows; it returns a dict of numpy columns (any number of rows).
        actor_kwargs: the constructor's arguments, serialised once per actor.
        batch_size: rows per actor call, and rows per yielded batch.
        address, workers: see :func:`ray_session`.

    Example:
        >>> for out in ordered_map_batches([{"index": 0}, {"index": 1}], Doubler, {}, 2):
        ...     print(out["value"])
        [0 2]
    """
    if not rows:
        return
    with ray_session(address, workers) as n_workers:
        import ray.data

        dataset = ray.data.from_items(
            list(rows), override_num_blocks=max(1, min(len(rows), n_workers * 4))
        )
        mapped = dataset.map_batches(
            actor_cls,
            fn_constructor_kwargs=dict(actor_kwargs),
            batch_size=batch_size,
            concurrency=n_workers,
            num_cpus=1,
        )
        yield from mapped.iter_batches(batch_size=batch_size, batch_format="numpy")


def model_for_actors(classifier: Classifier) -> Classifier | str:
    """What to send to the actors: the model's folder when they can rebuild the model from it
    (a model written by ``camlens train``, a few files they read themselves), else the
    ``Classifier`` itself (pickled once per actor)."""
    loadable = os.path.isdir(classifier.name) and classifier.info.get("config") is not None
    return classifier.name if loadable else classifier


class _RayExplainer:
    """Actor: one ``BatchExplainer`` per actor; batches in, JSON records out."""

    def __init__(self, job: ExplainJob, out_dir: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.explainer = BatchExplainer(job, out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [(int(i), str(s)) for i, s in zip(batch["index"], batch["source"], strict=True)]
        records = self.explainer.explain_sources(items)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def ray_records(
    job: ExplainJob,
    pending: list[tuple[int, str]],
    out_dir: Path,
    *,
    address: str | None = None,
    workers: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Explain ``pending`` on Ray and yield the records in input order."""
    batches = ordered_map_batches(
        [{"index": i, "source": s} for i, s in pending],
        _RayExplainer,
        {"job": job, "out_dir": str(out_dir)},
        job.batch_size,
        address=address,
        workers=workers,
    )
    for batch in batches:
        for record in batch["record"]:
            yield json.loads(record)
