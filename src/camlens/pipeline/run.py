"""``run(task, inputs, out_dir, options)``: every batch job goes through here."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

from camlens.errors import ConfigError
from camlens.pipeline.engines import local_batches, ray_batches
from camlens.pipeline.folder import MemoryLog, OutputFolder, RecordLog
from camlens.pipeline.options import RunOptions
from camlens.pipeline.task import RunResult, Task

__all__ = ["Records", "run"]


class Records:
    """A run's records in input order; each iteration reads them afresh (from the output
    folder, one at a time, or from memory)."""

    def __init__(self, log: RecordLog | MemoryLog) -> None:
        self._log = log

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._log.records()


def run(
    task: Task,
    inputs: Sequence[Any],
    out_dir: str | os.PathLike | None,
    options: RunOptions | None = None,
    *,
    folder: OutputFolder | None = None,
) -> RunResult:
    """Run ``task`` over ``inputs`` in batches; keep one record per input; fold them.

    1. The output folder is opened (see ``camlens.pipeline.folder``): a fresh run records
       its settings (the task's, the batch size and a digest of the inputs), a resume checks
       them and continues after the last complete batch.
    2. The task's worker is made once (the model loaded) in this process or in each Ray
       actor; the inputs go through it in fixed slices of ``options.batch_size``, and each
       batch's records are appended in input order.
    3. ``task.fold`` sums up all records (also those of the interrupted run).

    Parameters:
        task: what to compute (``camlens.tasks``).
        inputs: the work items, in order (paths, annotations...).
        out_dir: the output folder; None keeps the records in memory (no resume).
        options: batch size, engine, resume/overwrite, progress (``RunOptions``).
        folder: an ``OutputFolder`` for ``out_dir`` made (and perhaps prepared) by the caller,
            who writes files into it too (the gallery, a report, sample images).

    Returns:
        A ``RunResult`` (counts, and the task's summary).

    Raises:
        ConfigError: bad options, an output folder the rules refuse, a resume with other
            settings or inputs, or a configuration error of the task. A fresh run that fails
            before its first record leaves nothing behind.

    Example:
        >>> import camlens
        >>> from camlens.tasks.explain import ExplainTask
        >>> task = ExplainTask(camlens.load_model())
        >>> inputs = ["photos/cat.jpg", "photos/coffee.jpg", "missing.jpg"]
        >>> result = run(task, inputs, "out", RunOptions(batch_size=2, progress=False))
        >>> result.n_ok, result.n_error, result.exit_code  # a missing file is an error record
        (2, 1, 1)
        >>> again = run(task, inputs, "out", RunOptions(batch_size=2, resume=True, progress=False))
        >>> again.resumed, again.n_skipped  # nothing left to do
        (True, 3)
    """
    options = options or RunOptions()
    items = list(inputs)
    if out_dir is not None and folder is None:
        folder = OutputFolder(out_dir, spell=options.spell)
    if folder is not None:
        if not folder.prepared:
            folder.check(resume=options.resume, overwrite=options.overwrite)
    elif options.resume or options.overwrite:
        raise ConfigError(
            f"{options.spell('resume')} and {options.spell('overwrite')} apply to an output "
            f"folder; give {options.spell('out_dir', '')}"
        )
    size = options.batch_size
    starts = list(range(0, len(items), size))
    worker = task.start(folder) if options.engine == "local" else None
    resumed, done = False, 0
    if folder is not None:
        settings = {**task.settings(), **inputs_settings(task, items, size)}
        resumed = folder.prepare(resume=options.resume, overwrite=options.overwrite)
        folder.record_settings(task.name, settings)
        log: RecordLog | MemoryLog = folder.log(task.records_file, task.parts_dir)
        done = log.resume_point(starts, len(items)) if resumed else 0
        log.claim()
    else:
        log = MemoryLog()
    indexed = list(enumerate(items))
    batches = [indexed[start : start + size] for start in starts if start >= done]
    appended = False
    try:
        if worker is not None:
            computed = local_batches(worker, batches)
        else:
            fresh = folder.fresh if folder is not None else True
            computed = ray_batches(task, batches, folder, options, fresh=fresh)
        bar = tqdm(
            total=len(items) - done,
            unit="img",
            file=sys.stderr,
            disable=not options.progress or len(items) - done <= 3,
        )
        with bar:
            for batch, records in computed:
                if len(records) != len(batch):
                    raise RuntimeError(
                        f"task {task.name} returned {len(records)} records for {len(batch)} inputs"
                    )
                log.append(records, batch[0][0])
                appended = True
                bar.update(len(batch))
    except ConfigError:
        if folder is not None and not appended and not resumed:
            folder.discard()
        raise
    finally:
        if folder is not None:
            folder.close()
    n_ok = n_error = 0
    for record in log.records(arrays=False):
        n_ok += record.get("status") == "ok"
        n_error += record.get("status") == "error"
    return RunResult(
        n_inputs=len(items),
        n_ok=n_ok,
        n_error=n_error,
        n_skipped=done,
        out_dir=None if folder is None else folder.root,
        summary=task.fold(Records(log)),
        resumed=resumed,
    )


def inputs_settings(task: Task, items: Iterable[Any], batch_size: int) -> dict[str, Any]:
    """The settings every run records besides the task's: the batch size, the number of
    inputs and a digest of them (a resume with other inputs is refused)."""
    digest = hashlib.sha256()
    count = 0
    for item in items:
        digest.update(json.dumps(task.describe(item), sort_keys=True).encode("utf-8") + b"\n")
        count += 1
    return {"batch_size": batch_size, "n_inputs": count, "inputs_sha256": digest.hexdigest()}
