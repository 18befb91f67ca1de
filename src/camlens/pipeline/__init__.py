"""One pipeline for every batch job: a task's inputs in batches, through one engine, into one
output folder.

* :class:`RunOptions`: how a job runs (batch size, device, engine, resume/overwrite).
* :class:`OutputFolder`: what may be written, kept or removed; the run's settings; records.
* engines: ``local`` (this process, decoding one batch ahead) and ``ray`` (one actor class,
  :class:`TaskActor`, that runs any task).
* :func:`run`: ``run(task, inputs, out_dir, options) -> RunResult``.

A task (``camlens.tasks``) supplies ``settings()``, a worker with ``load``/``process`` (the only
place that runs the model) and ``fold(records)``; see :class:`Task`.
"""

from camlens.pipeline.engines import TaskActor, chunks, model_for_actors, prefetched, ray_session
from camlens.pipeline.folder import (
    OutputFolder,
    RecordLog,
    as_output_folder,
    drop_torn_tail,
    iter_jsonl,
)
from camlens.pipeline.options import DEFAULT_BATCH_SIZE, ENGINES, RunOptions, spelling
from camlens.pipeline.run import Records, run
from camlens.pipeline.task import Item, RunResult, Task, Worker

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ENGINES",
    "Item",
    "OutputFolder",
    "RecordLog",
    "Records",
    "RunOptions",
    "RunResult",
    "Task",
    "TaskActor",
    "Worker",
    "as_output_folder",
    "chunks",
    "drop_torn_tail",
    "iter_jsonl",
    "model_for_actors",
    "prefetched",
    "ray_session",
    "run",
    "spelling",
]
