"""The Ray engine: the same job as the local engine, spread over Ray actors.

Ray Data reads the list of ``(index, path)`` items, ``map_batches`` sends batches to a pool of
actors (each loads the model once: ``runner.BatchExplainer``), every actor writes its inputs'
files with the same writers as the local engine, and the driver receives the records in input
order (``preserve_order``) and appends them to ``results.jsonl``.

On a cluster, ``out_dir`` must be on a file system that every node sees (NFS, a mounted
bucket...), since the actors write overlays and raw maps there directly. Start the cluster
(``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on the others) and pass
``--engine ray --ray-address HEAD:6379``. Without an address a local Ray is started with
this machine's cores. Needs the ``ray`` extra: ``pip install 'camlens[ray]'``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from camlens.errors import ConfigError
from camlens.runner import BatchExplainer, ExplainJob


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
        n_workers = workers or max(1, int(ray.available_resources().get("CPU", 1)))
        dataset = ray.data.from_items(
            [{"index": i, "source": s} for i, s in pending],
            override_num_blocks=max(1, min(len(pending), n_workers * 4)),
        )
        records = dataset.map_batches(
            _RayExplainer,
            fn_constructor_kwargs={"job": job, "out_dir": str(out_dir)},
            batch_size=job.batch_size,
            concurrency=n_workers,
            num_cpus=1,
        )
        for row in records.iter_rows():
            yield json.loads(row["record"])
    finally:
        if started_here:
            ray.shutdown()
