"""Engines: where a task's batches run. Both give the same records in the same order.

* ``local``: this process. The task's worker is made once; the next batch is decoded in
  threads while the current one runs (:func:`prefetched`).
* ``ray``: a pool of Ray actors, all of one class (:class:`TaskActor`): each makes the task's
  worker once (loading the model) and processes whole batches; Ray Data hands the results
  back in input order (``preserve_order``).

On a cluster, the output folder must be on a file system every node sees (NFS, a mounted
bucket...), since tasks that write files (``explain``) write them from the actors, and the
inputs must be readable from every node at the same paths. Start the cluster (``ray start
--head`` on one node, ``ray start --address=HEAD:6379`` on the others) and pass ``--engine ray
--ray-address HEAD:6379``. Without an address a local Ray is started with this machine's
cores; a Ray already initialised in the calling process is used as it is. Needs the ``ray``
extra: ``pip install 'camlens[ray]'``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from camlens.batching import chunks
from camlens.errors import ConfigError
from camlens.models import DEFAULT_THRESHOLD_PROB, Classifier
from camlens.pipeline.folder import OutputFolder
from camlens.pipeline.options import RunOptions
from camlens.pipeline.task import Item, Task, Worker

__all__ = [
    "TaskActor",
    "chunks",
    "local_batches",
    "model_for_actors",
    "prefetched",
    "ray_batches",
    "ray_session",
]

T = TypeVar("T")
U = TypeVar("U")

Batches = Iterator[tuple[Sequence[Item], list[dict[str, Any]]]]


def local_batches(worker: Worker, batches: Iterable[Sequence[Item]]) -> Batches:
    """``(batch, records)`` for every batch, in order, in this process.

    A worker with ``compute`` and ``finish`` (see ``Worker.process``) has each batch's files
    written in one background thread while the next batch is computed: on a machine whose
    cores the forward pass does not fill, the writing costs no time. A batch's records are
    yielded only once its files are written, so a stored record still means that its files
    exist (what a resume relies on).
    """
    compute, finish = getattr(worker, "compute", None), getattr(worker, "finish", None)
    if compute is None or finish is None:
        for batch, loaded in prefetched(batches, worker.load):
            yield batch, worker.process(batch, loaded)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="camlens-write") as writer:
        pending: tuple[Sequence[Item], Future[list[dict[str, Any]]]] | None = None
        for batch, loaded in prefetched(batches, worker.load):
            computed = compute(batch, loaded)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, writer.submit(finish, computed))
        if pending is not None:
            yield pending[0], pending[1].result()


class TaskActor:
    """The one Ray actor class: a task's worker, made once per actor; whole batches in (one
    pickled batch per row), their records out."""

    def __init__(self, task: Task, out_dir: str | None, fresh: bool) -> None:
        import torch

        torch.set_num_threads(1)
        folder = OutputFolder(out_dir).attach(fresh=fresh) if out_dir is not None else None
        self.worker = task.start(folder)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for payload in rows["batch"]:
            batch = pickle.loads(payload)
            loaded = [self.worker.load(item) for item in batch]
            out.append(pickle.dumps(self.worker.process(batch, loaded)))
        return {"records": np.array(out, dtype=object)}


def ray_batches(
    task: Task,
    batches: Sequence[Sequence[Item]],
    folder: OutputFolder | None,
    options: RunOptions,
    *,
    fresh: bool,
) -> Batches:
    """``(batch, records)`` for every batch, in order, computed by a pool of Ray actors."""
    if not batches:
        return
    rows = [{"batch": pickle.dumps(list(batch))} for batch in batches]
    out_dir = None if folder is None else str(folder.root)
    with ray_session(options.ray_address, options.workers) as n_workers:
        import ray.data

        dataset = ray.data.from_items(
            rows, override_num_blocks=max(1, min(len(rows), n_workers * 4))
        )
        mapped = dataset.map_batches(
            TaskActor,
            fn_constructor_kwargs={"task": task.for_actors(), "out_dir": out_dir, "fresh": fresh},
            batch_size=1,
            concurrency=n_workers,
            num_cpus=1,
        )
        outputs = mapped.iter_batches(batch_size=1, batch_format="numpy")
        for batch, output in zip(batches, outputs, strict=True):
            yield batch, pickle.loads(output["records"][0])


@contextlib.contextmanager
def ray_session(address: str | None = None, workers: int | None = None) -> Iterator[int]:
    """Start Ray (or join the cluster at ``address``, or use the Ray this process already
    initialised) and yield the number of actors to use: ``workers``, else one per CPU.

    Ray Data is set to keep the input order and to show no progress bars. A Ray started here
    is shut down on exit, also on error.
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


def model_for_actors(classifier: Classifier) -> Classifier | str:
    """What to send to Ray actors: the model's folder when they can rebuild the model from it
    (a model written by ``camlens train``: a few files they read themselves), else the
    ``Classifier`` itself (pickled once per actor)."""
    config = classifier.info.get("config")
    loadable = (
        os.path.isdir(classifier.name)
        and isinstance(config, dict)
        # the folder gives the actors the same kind of model (multilabel, threshold), unless
        # the caller changed them after loading
        and classifier.multilabel == bool(config.get("multilabel", False))
        and classifier.threshold_prob == DEFAULT_THRESHOLD_PROB
    )
    return classifier.name if loadable else classifier


def prefetched(
    batches: Iterable[Sequence[T]], load: Callable[[T], U], *, threads: int = 2
) -> Iterator[tuple[Sequence[T], list[U]]]:
    """``(batch, [load(item) for item in batch])`` for every batch, in order, with the next
    batch already loading in ``threads`` worker threads while the caller works on the current
    one: decoding overlaps inference, and at most two batches are in memory.

    ``load`` should turn a failure into a value (an error record), since an exception it
    raises surfaces here.

    Example:
        >>> [images for _, images in prefetched(chunks(range(5), 2), lambda i: i * i)]
        [[0, 1], [4, 9], [16]]
    """
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="camlens-decode") as pool:
        pending: tuple[Sequence[T], list[Future[U]]] | None = None
        for batch in batches:
            submitted = (batch, [pool.submit(load, item) for item in batch])
            if pending is not None:
                yield pending[0], [future.result() for future in pending[1]]
            pending = submitted
        if pending is not None:
            yield pending[0], [future.result() for future in pending[1]]
