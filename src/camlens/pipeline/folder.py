"""The output folder of a run: the one place that decides what may be written, kept or removed.

Rules (the same for every command that writes a folder):

* A folder that is not empty is refused unless the run resumes (``--resume``) or replaces
  camlens' earlier outputs (``--overwrite``); ``--out`` naming a file is refused.
* camlens records every file and folder it creates in a manifest *before* creating it
  (``OUT/.camlens/written/*.txt``, one file per writing process, so that Ray actors on other
  nodes never share one). ``--overwrite`` removes exactly what the manifest lists, nothing
  else; a fresh run never replaces a file that is already there (it refuses, naming it).
* The run's settings are kept in ``OUT/.camlens/run.json``; a resume with other settings (or
  other inputs) is refused, naming what differs.
* Nothing is created before :meth:`OutputFolder.open`, which a job calls only once its
  configuration is valid; a job that fails with a configuration error before its first record
  removes what it created (:meth:`OutputFolder.discard`).
* Records are appended one batch at a time, in input order (:class:`RecordLog`): arrays go to
  a part file per batch (written atomically first), then the batch's JSON lines in one write.
  A killed run leaves a prefix of whole and partial batches; a resume drops a torn last line
  and the partial batch, and continues with the next input, so the records always equal an
  uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camlens.errors import PYTHON_SPELLING, ConfigError
from camlens.writers import atomic_path, write_json

#: Serialises manifest updates (``OutputFolder.path``) of the threads that write outputs.
_MANIFEST_LOCK = threading.Lock()

__all__ = [
    "STATE_DIR",
    "MemoryLog",
    "OutputFolder",
    "RecordLog",
    "as_output_folder",
    "drop_torn_tail",
    "iter_jsonl",
]

#: camlens' own bookkeeping inside an output folder.
STATE_DIR = ".camlens"
RUN_FILE = f"{STATE_DIR}/run.json"
WRITTEN_DIR = f"{STATE_DIR}/written"

Spell = Callable[..., str]


#: The temporary file of an unfinished ``writers.atomic_path`` write of ``<name>``.
_TEMPORARY = re.compile(r"\.(.+)\.[^.]+\.tmp")


class OutputFolder:
    """An output folder whose camlens-written files are known (see the module docstring).

    Parameters:
        path: the folder.
        spell: how to name an option in messages (``RunOptions.spell``).

    Example:
        >>> from camlens.writers import write_text
        >>> folder = OutputFolder("out")
        >>> folder.open("explain", {"method": "cam"}, resume=False, overwrite=False)
        False
        >>> write_text(folder.path("notes/a.txt"), "hello")  # recorded, then written
        PosixPath('out/notes/a.txt')
        >>> folder.close()
        >>> _ = Path("out/mine.txt").write_text("a file of yours")
        >>> OutputFolder("out").open("explain", {"method": "gradcam"}, resume=True, overwrite=False)
        Traceback (most recent call last):
        camlens.errors.ConfigError: cannot resume in 'out': the settings differ ... (method) - ...
        >>> OutputFolder("out").open("explain", {"method": "gradcam"}, resume=False, overwrite=True)
        False
        >>> sorted(p.name for p in Path("out").iterdir())  # only what camlens wrote was removed
        ['.camlens', 'mine.txt']
    """

    def __init__(self, path: str | os.PathLike, *, spell: Spell = PYTHON_SPELLING) -> None:
        self.root = Path(path)
        self.spell = spell
        self._shard: Any = None
        self._fresh = True
        self._created_root = False
        self._prepared: bool | None = None
        self._shard_name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.txt"

    # --- checks (no side effects) ----------------------------------------------------------

    def check(self, *, resume: bool, overwrite: bool, resumable: bool = True) -> None:
        """Refuse what :meth:`open` would refuse, without creating anything (``resumable``:
        whether the job can resume at all, for the message).

        Raises:
            ConfigError: the path is a file; the folder is not empty and neither ``resume`` nor
                ``overwrite`` is set; ``resume`` without settings to check against.
        """
        if resume and overwrite:
            raise ConfigError(
                f"{self.spell('resume')} and {self.spell('overwrite')} exclude each other; "
                "choose one"
            )
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(
                f"the output folder {str(self.root)!r} is a file; give "
                f"{self.spell('out_dir', '')} a folder (it is created when missing)"
            )
        if not self._has_entries() or overwrite:
            return
        if not resume:
            count = sum(1 for _ in self.root.iterdir())
            continuing = (
                f"{self.spell('resume')} to continue an interrupted run there, "
                if resumable
                else ""
            )
            raise ConfigError(
                f"the output folder {str(self.root)!r} is not empty ({count} entries); use "
                f"{continuing}{self.spell('overwrite')} to replace what camlens wrote there "
                f"before (other files are kept), or choose another {self.spell('out_dir', '')}"
            )
        if not (self.root / RUN_FILE).is_file():
            raise ConfigError(
                f"cannot resume in {str(self.root)!r}: it holds no camlens run settings "
                f"({RUN_FILE}), so what it holds cannot be checked against this run (a folder "
                f"of an older camlens, or not a camlens output folder); use "
                f"{self.spell('overwrite')} or choose another {self.spell('out_dir', '')}"
            )

    def previous_run(self) -> dict[str, Any] | None:
        """The ``run.json`` of the run that wrote this folder, if any."""
        path = self.root / RUN_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # --- opening ---------------------------------------------------------------------------

    def open(self, task: str, settings: dict[str, Any], *, resume: bool, overwrite: bool) -> bool:
        """Make the folder ready for a run of ``task`` and check or record its settings;
        return whether the run resumes an interrupted one (:meth:`prepare`, then
        :meth:`record_settings`)."""
        resumed = self.prepare(resume=resume, overwrite=overwrite)
        self.record_settings(task, settings)
        return resumed

    def prepare(self, *, resume: bool, overwrite: bool) -> bool:
        """Make the folder ready (see :meth:`check`); with ``overwrite``, remove what camlens
        wrote there before. Returns whether the run resumes an interrupted one (a resume in
        an empty or missing folder starts afresh)."""
        if self._prepared is not None:
            return self._prepared
        self.check(resume=resume, overwrite=overwrite)
        if resume and self.previous_run() is not None:
            self._fresh = False
            self._remove_stale_temporaries()
        else:
            if overwrite:
                self.remove_previous()
            self._created_root = not self.root.exists()
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self._record(STATE_DIR + "/")  # proves the folder is writable, before any work
            except OSError as error:
                raise ConfigError(
                    f"cannot write the output folder {str(self.root)!r}: "
                    f"{error.strerror or error}; choose a folder you can write "
                    f"({self.spell('out_dir', '')})"
                ) from None
        self._prepared = not self._fresh
        return self._prepared

    def record_settings(self, task: str, settings: dict[str, Any]) -> None:
        """A fresh run records ``task`` and ``settings`` (JSON-ready); a resume checks them
        against the interrupted run's, as they read back from JSON.

        Raises:
            ConfigError: the folder is not prepared; a resume whose task or settings differ
                (the message names the keys and both values).
        """
        if self._prepared is None:
            raise ConfigError("prepare the output folder before recording settings")
        settings = json.loads(json.dumps(settings))
        if self._fresh:
            write_json(self.path(RUN_FILE), {"task": task, "settings": settings})
            return
        previous = self.previous_run() or {}
        then = {"task": previous.get("task"), **previous.get("settings", {})}
        check_same_settings(then, {"task": task, **settings}, self.root, self.spell)

    @property
    def prepared(self) -> bool:
        """Whether :meth:`prepare` ran (the folder exists and may be written)."""
        return self._prepared is not None

    @property
    def fresh(self) -> bool:
        """Whether this run started the folder afresh (not a resume)."""
        return self._fresh

    def attach(self, *, fresh: bool | None = None) -> OutputFolder:
        """This folder as a worker process sees it (a Ray actor): it writes files (recorded in
        its own manifest file) into an already opened folder, nothing else."""
        folder = OutputFolder(self.root, spell=self.spell)
        folder._fresh = self._fresh if fresh is None else fresh
        folder._prepared = not folder._fresh
        return folder

    # --- writing files ---------------------------------------------------------------------

    def path(self, relative: str) -> Path:
        """Record ``relative`` (and any folder it needs) in the manifest; return its path.

        Write the file right after, with the atomic writers of ``camlens.writers``. Safe to
        call from several threads.

        Raises:
            ConfigError: in a fresh run, a file is already there that camlens did not write in
                this run (your file, or an older camlens' output): it is never replaced.
        """
        with _MANIFEST_LOCK:  # tasks write their files from several threads
            return self._reserve(relative)

    def _reserve(self, relative: str) -> Path:
        target = self.root / relative
        if self._fresh and target.exists() and relative != RUN_FILE:
            raise ConfigError(
                f"{str(target)!r} already exists and camlens has no record of writing it; "
                f"camlens never replaces a file it did not write: move it away, or choose "
                f"another {self.spell('out_dir', '')}"
            )
        parts = Path(relative).parts
        for depth in range(1, len(parts)):
            folder = self.root.joinpath(*parts[:depth])
            if not folder.exists():
                self._record("/".join(parts[:depth]) + "/")
                folder.mkdir(exist_ok=True)
        self._record(relative)
        return target

    def _record(self, relative: str) -> None:
        if self._shard is None:
            written = self.root / WRITTEN_DIR
            written.mkdir(parents=True, exist_ok=True)
            self._shard = open(written / self._shard_name, "a", encoding="utf-8")  # noqa: SIM115
        self._shard.write(json.dumps(relative) + "\n")
        self._shard.flush()

    def written(self) -> Iterator[str]:
        """Every path camlens recorded in this folder (folders end with ``/``), one at a time."""
        written = self.root / WRITTEN_DIR
        if not written.is_dir():
            return
        for shard in sorted(written.glob("*.txt")):
            with open(shard, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue  # a torn last entry: its file was never written

    def _remove_stale_temporaries(self) -> int:
        """Remove what a killed run's unfinished writes left: ``writers.atomic_path`` writes
        ``.<name>.<random>.tmp`` beside a file that camlens recorded before creating it, so
        such a file next to a recorded name is camlens' own; nothing else is touched. Returns
        the number removed."""
        recorded: dict[Path, set[str]] = {}
        for relative in self.written():
            if not relative.endswith("/"):
                target = self.root / relative
                recorded.setdefault(target.parent, set()).add(target.name)
        removed = 0
        for folder, names in recorded.items():
            for temporary in folder.glob(".*.tmp") if folder.is_dir() else ():
                match = _TEMPORARY.fullmatch(temporary.name)
                if match and match.group(1) in names and temporary.is_file():
                    temporary.unlink()
                    removed += 1
        return removed

    def remove_previous(self) -> int:
        """Delete what camlens recorded here (files, then the folders it created if they are
        empty), and its bookkeeping; never anything else. Returns the number of files removed.
        """
        self.close()
        removed, folders = 0, set()
        for relative in self.written():
            target = self.root / relative
            if relative.endswith("/"):
                folders.add(relative.rstrip("/"))
            elif target.is_file() or target.is_symlink():
                target.unlink()
                removed += 1
        for relative in sorted(folders, key=lambda p: p.count("/"), reverse=True):
            _remove_if_empty(self.root / relative)
        shutil.rmtree(self.root / WRITTEN_DIR, ignore_errors=True)
        (self.root / RUN_FILE).unlink(missing_ok=True)
        _remove_if_empty(self.root / STATE_DIR)
        return removed

    def discard(self) -> None:
        """Undo a fresh run that failed before its first record: remove what it wrote, and the
        folder itself if this run created it and it is now empty."""
        if not self._fresh:
            return
        self.remove_previous()
        if self._created_root:
            _remove_if_empty(self.root)

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None

    def log(self, name: str, parts_dir: str = "parts") -> RecordLog:
        """The record file ``name`` of this folder (arrays in ``parts_dir``)."""
        return RecordLog(self, name, parts_dir)

    def _has_entries(self) -> bool:
        return self.root.is_dir() and any(self.root.iterdir())


def as_output_folder(out: OutputFolder | str | os.PathLike) -> OutputFolder:
    """``out`` as an ``OutputFolder``: a plain path becomes one whose writes are recorded in
    its manifest but never refused (for writing a report into a folder of your choice).

    Example:
        >>> as_output_folder("report_out").path("index.html")
        PosixPath('report_out/index.html')
    """
    if isinstance(out, OutputFolder):
        return out
    return OutputFolder(out).attach(fresh=False)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (the user's files), or already gone
        folder.rmdir()


# --- settings ----------------------------------------------------------------------------------


def check_same_settings(
    previous: dict[str, Any],
    current: dict[str, Any],
    out_dir: Path,
    spell: Spell = PYTHON_SPELLING,
) -> None:
    """Refuse to resume when the settings differ from the interrupted run's.

    Example:
        >>> check_same_settings({"seed": 0}, {"seed": 1}, Path("out"))
        Traceback (most recent call last):
        camlens.errors.ConfigError: cannot resume in 'out': ... (seed) - seed: 0 then, 1 now. ...
    """
    keys = [k for k in dict.fromkeys([*previous, *current]) if previous.get(k) != current.get(k)]
    if keys:
        changes = "; ".join(
            f"{k}: {_short(previous.get(k))} then, {_short(current.get(k))} now" for k in keys
        )
        raise ConfigError(
            f"cannot resume in {str(out_dir)!r}: the settings differ from the interrupted run's "
            f"({', '.join(keys)}) - {changes}. Resume with the same settings and inputs, or "
            f"start again with {spell('overwrite')}"
        )


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# --- records -----------------------------------------------------------------------------------


class RecordLog:
    """A run's records in ``OUT/<name>``: JSON lines in input order, arrays in part files.

    A record is a JSON-ready dict; its optional ``"arrays"`` entry (a dict of numpy arrays)
    is stored in ``OUT/<parts_dir>/part-<first index>.npz`` with the other records of its
    batch, and replaced on disk by that file's path. :meth:`records` gives the records back
    in input order with their arrays, one part in memory at a time.
    """

    def __init__(self, folder: OutputFolder, name: str, parts_dir: str = "parts") -> None:
        self.folder = folder
        self.name = name
        self.path = folder.root / name
        self.parts_dir = parts_dir
        self._claimed = False

    def claim(self) -> None:
        """Record the record file in the manifest (once); in a fresh run, refuse a file of that
        name that camlens did not write."""
        if not self._claimed:
            self.folder.path(self.name)
            self._claimed = True

    def resume_point(self, batch_starts: Sequence[int], n_inputs: int) -> int:
        """Keep the records of the complete batches (dropping a torn line, the partial batch,
        and records whose part is missing or damaged); return how many inputs are done.

        Parameters:
            batch_starts: the first input index of every batch, in order.
            n_inputs: the number of inputs.
        """
        drop_torn_tail(self.path)
        parts = self.folder.root / self.parts_dir
        if parts.is_dir():  # temporary files of part writes that a kill interrupted
            for leftover in parts.glob(".part-*.tmp"):
                leftover.unlink(missing_ok=True)
        ends = [*batch_starts[1:], n_inputs]
        done, offset, kept = 0, 0, 0
        batch, count = 0, 0
        checked_parts: dict[str, bool] = {}
        if self.path.exists():
            with open(self.path, "rb") as handle:
                for line in handle:
                    record = json.loads(line)
                    reference = record.get("arrays")
                    if isinstance(reference, str):
                        part = reference.rsplit("#", 1)[0]
                        if part not in checked_parts:
                            checked_parts[part] = _part_readable(self.folder.root / part)
                        if not checked_parts[part]:
                            break
                    count += 1
                    offset += len(line)
                    if batch < len(ends) and count == ends[batch] - batch_starts[batch]:
                        done, kept = ends[batch], offset
                        batch, count = batch + 1, 0
            with open(self.path, "r+b") as handle:
                handle.truncate(kept)
        return done

    def append(self, records: Sequence[dict[str, Any]], first: int) -> None:
        """Append one batch's records (its first input is ``first``): arrays first, then the
        lines in one write."""
        lines = []
        arrays = {
            f"{row}.{key}": value
            for row, record in enumerate(records)
            for key, value in (record.get("arrays") or {}).items()
        }
        part = f"{self.parts_dir}/part-{first:09d}.npz"
        self.claim()
        if arrays:
            with atomic_path(self.folder.path(part)) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
        for row, record in enumerate(records):
            if record.get("arrays"):
                record = {**record, "arrays": f"{part}#{row}"}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(lines))

    def records(self, *, arrays: bool = True) -> Iterator[dict[str, Any]]:
        """The records in input order, with their arrays (one part file in memory at a time;
        ``arrays=False`` leaves the part references as they are)."""
        current: tuple[str, dict[str, np.ndarray]] | None = None
        for record in iter_jsonl(self.path):
            reference = record.get("arrays")
            if arrays and isinstance(reference, str):
                part, row = reference.rsplit("#", 1)
                if current is None or current[0] != part:
                    with np.load(self.folder.root / part, allow_pickle=False) as data:
                        current = (part, {key: data[key] for key in data.files})
                prefix = f"{row}."
                record["arrays"] = {
                    key[len(prefix) :]: value
                    for key, value in current[1].items()
                    if key.startswith(prefix)
                }
            yield record


class MemoryLog:
    """Records kept in memory (a job without an output folder); the interface of
    :class:`RecordLog`."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []

    def claim(self) -> None:
        pass

    def resume_point(self, batch_starts: Sequence[int], n_inputs: int) -> int:
        return 0

    def append(self, records: Sequence[dict[str, Any]], first: int) -> None:
        self._records.extend(records)

    def records(self, *, arrays: bool = True) -> Iterator[dict[str, Any]]:
        return iter(self._records)


def _part_readable(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                data[key]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return False
    return True


def drop_torn_tail(path: Path) -> None:
    """Cut a JSON-lines file after its last intact line: a line without its newline (the last
    write was torn) or that does not parse, and everything after it, are removed. Reads one
    line at a time, so memory does not grow with the file."""
    if not path.exists():
        return
    good_end = 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            good_end += len(line)
        size = handle.seek(0, os.SEEK_END)
    if good_end != size:
        with open(path, "r+b") as handle:
            handle.truncate(good_end)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file, one at a time (a missing file has none)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
