"""The output folder: the record store, the order of ``evaluation.jsonl``, the settings file."""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from camlens.errors import ConfigError
from camlens.evaluation.registry import _Settings
from camlens.io.annotations import Annotation
from camlens.methods import CAMMethod
from camlens.models import Classifier
from camlens.runner import iter_jsonl, prepare_output, record_run_settings
from camlens.writers import JsonlWriter, atomic_path, write_json

#: The per-image records of a run with ``out_dir``: one JSON object per line and annotated image.
RECORDS_FILE = "evaluation.jsonl"
#: The settings of the run that wrote the records (a resume must use the same).
SETTINGS_FILE = "evaluation.json"
METRICS_FILE = "metrics.json"
#: Everything ``camlens evaluate`` writes into its output folder (what ``overwrite`` removes).
OUTPUT_ENTRIES = (
    METRICS_FILE,
    "report.html",
    "curves",
    "gallery",
    RECORDS_FILE,
    SETTINGS_FILE,
    "samples",
)


class _RecordStore:
    """Where the records go: ``out_dir/evaluation.jsonl`` (with ``evaluation.json``, the run's
    settings), or a list in memory when there is no output folder."""

    def __init__(self, out_dir: Path | None, settings: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.path = None if out_dir is None else out_dir / RECORDS_FILE
        self.settings = settings
        self._kept: list[dict[str, Any]] = []

    def open(self, *, resume: bool, overwrite: bool) -> set[int]:
        """Prepare the folder; return the indices of the images already recorded."""
        if self.out_dir is None:
            if resume or overwrite:
                raise ConfigError("resume and overwrite apply to an output folder; give out_dir")
            return set()
        done = prepare_output(
            self.out_dir, resume=resume, overwrite=overwrite, entries=OUTPUT_ENTRIES,
            results=RECORDS_FILE, key="index",
        )  # fmt: skip
        record_run_settings(
            self.out_dir, SETTINGS_FILE, self.settings, resume=resume, has_results=bool(done)
        )
        return done

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Store ``records`` (each line is written and flushed as it comes), then put the file
        in input order."""
        if self.path is None:
            self._kept.extend(records)
            return
        with JsonlWriter(self.path, append=True) as writer:
            for record in records:
                writer.write(record)
        _put_in_order(self.path)

    def records(self) -> Iterator[dict[str, Any]]:
        """The records, in input order (read from the file one at a time)."""
        return iter(self._kept) if self.path is None else iter_jsonl(self.path)

    def write_metrics(self, result: dict[str, Any]) -> None:
        if self.out_dir is not None:
            write_json(self.out_dir / METRICS_FILE, result)


def _run_settings(
    classifier: Classifier,
    items: Sequence[Annotation],
    instances: Sequence[CAMMethod],
    layer: str | None,
    settings: _Settings,
) -> dict[str, Any]:
    """Everything the records depend on (a resume must match it)."""
    content = [[str(a.image), [list(b) for b in a.boxes], a.labels] for a in items]
    digest = hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()
    return {
        "model": classifier.name,
        "annotations_sha256": digest,
        "n_annotated_images": len(items),
        "methods": [m.name for m in instances],
        "layer": layer,
        "metrics": settings.metrics,
        **settings.as_dict(),
    }


def _put_in_order(path: Path) -> None:
    """Rewrite ``path`` in input order with one record per image (the last one written), if
    it is not already so.

    The file is normally in order already: each run appends its records in input order, and a
    resume continues after the records of the interrupted run. Otherwise its sorted stretches
    are merged one line at a time, in bounded memory, into a new file that replaces it.
    """
    starts, previous, size = [0], None, 0
    for index, line in _indexed_lines(path):
        if previous is not None and index <= previous:
            starts.append(size)
        previous, size = index, size + len(line)
    if len(starts) == 1:
        return
    runs = [_indexed_lines(path, start, end) for start, end in pairwise([*starts, size])]
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        pending: tuple[int, bytes] | None = None
        for entry in heapq.merge(*runs, key=lambda e: e[0]):
            if pending is not None and pending[0] != entry[0]:
                out.write(pending[1])
            pending = entry
        if pending is not None:
            out.write(pending[1])


def _indexed_lines(
    path: Path, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """``(record index, line)`` for the lines of ``path`` between byte offsets."""
    with open(path, "rb") as handle:
        handle.seek(start)
        position = start
        for line in handle:
            if end is not None and position >= end:
                return
            position += len(line)
            yield json.loads(line)["index"], line
