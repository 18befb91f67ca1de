"""What a task is to the pipeline, and what a run gives back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from camlens.pipeline.folder import OutputFolder

#: ``(index, input)``: an input and its position in the run.
Item = tuple[int, Any]


class Worker(Protocol):
    """The part of a task that holds the model: made once per process (the driver, or each
    Ray actor) by :meth:`Task.start`."""

    def load(self, item: Item) -> Any:
        """Decode one input (runs in a thread, one batch ahead); return a failure as a value
        (an error the record will carry), never raise it."""

    def process(self, batch: Sequence[Item], loaded: Sequence[Any]) -> list[dict[str, Any]]:
        """One record per item of ``batch``, in order; the only place a task runs the model.

        A record is a JSON-ready dict with a ``"status"`` (``"ok"`` or ``"error"``) and,
        optionally, ``"arrays"``: a dict of numpy arrays stored beside the records.

        A worker that writes files may split this in two, ``process(batch, loaded) ==
        finish(compute(batch, loaded))``: ``compute`` runs the model, ``finish`` writes the
        batch's files and returns its records. The local engine then writes one batch while
        it computes the next (see ``engines.local_batches``)."""


class Task(Protocol):
    """A batch job: what it computes per input and how its records are summed up.

    Attributes:
        name: recorded with the settings (``"explain"``, ``"evaluate"``, ``"audit-maps"``).
        records_file: the record file in the output folder (``"results.jsonl"``...).
        parts_dir: where the records' arrays go in the output folder.
    """

    name: str
    records_file: str
    parts_dir: str

    def settings(self) -> dict[str, Any]:
        """JSON-ready values a resume must match (the pipeline adds the inputs and batch size)."""

    def describe(self, item: Any) -> Any:
        """A JSON-ready identity of one input (its path...), for the settings' inputs digest."""

    def start(self, folder: OutputFolder | None) -> Worker:
        """Load the model and everything ``process`` needs; files go into ``folder``."""

    def for_actors(self) -> Task:
        """The task as Ray actors receive it (the model as a spec they load, if possible)."""

    def fold(self, records: Iterable[dict[str, Any]]) -> Any:
        """The summary of all records (in input order); pure: never runs the model. The
        iterable may be iterated more than once."""


@dataclass(frozen=True)
class RunResult:
    """What a run did.

    Attributes:
        n_inputs: inputs of the run.
        n_ok, n_error: records with status ok / error (also those of an interrupted run
            that this one resumed).
        n_skipped: inputs already done before a resume.
        out_dir: the output folder (None: records kept in memory).
        summary: the task's ``fold`` of all records.
        resumed: whether the run continued an interrupted one.
    """

    n_inputs: int
    n_ok: int
    n_error: int
    n_skipped: int
    out_dir: Path | None
    summary: Any
    resumed: bool = False

    @property
    def exit_code(self) -> int:
        """The command line's exit status: 0 all inputs done, 1 some failed, 2 no input."""
        if self.n_inputs == 0:
            return 2
        return 1 if self.n_error else 0
