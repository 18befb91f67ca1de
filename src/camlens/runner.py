"""Stream inputs through a model and a method, writing results as they are made.

decode (threads, one batch ahead) -> batch -> method -> Explanation -> per-input files ->
``results.jsonl`` (one line per input, in input order) -> ``index.html``.

* Bad inputs become error records; the rest of the batch goes on.
* Peak memory does not grow with the number of inputs: only the current and the next batch
  are held, and every file is written as soon as it is made.
* Every file is written atomically; a record is appended to ``results.jsonl`` only after its
  files exist, so a run killed at any moment can be resumed (``resume=True``): a torn last
  line is dropped, inputs with a record are skipped, the rest is redone.
* Engines: ``"local"`` (this process) and ``"ray"`` (Ray Data actors, see
  ``camlens.ray_engine``); both produce the same records in the same order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from tqdm import tqdm

from camlens.api import make_method
from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.io import ImageLoadError, collect_inputs, load_image
from camlens.models import Classifier, load_model
from camlens.render import save_figure, topk_figure
from camlens.report.gallery import write_gallery
from camlens.targets import Target
from camlens.writers import JsonlWriter, write_json, write_npz, write_png, write_text

RESULTS_FILE = "results.jsonl"
OUTPUT_ENTRIES = (RESULTS_FILE, "index.html", "overlays", "raw", "figures")
ENGINES = ("local", "ray")

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class Style:
    """How overlays look: matplotlib colormap, opacity, and the box threshold."""

    colormap: str = "jet"
    alpha: float = 0.5
    threshold: float = 0.2


@dataclass(frozen=True)
class ExplainJob:
    """What to compute for every input (everything but the inputs and the output folder)."""

    model: Classifier | str
    method: str = "cam"
    target: Target = "top1"
    layer: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16
    style: Style = field(default_factory=Style)
    figures: bool = False
    device: str | None = None


@dataclass(frozen=True)
class RunSummary:
    """Counts of a finished run (``n_skipped``: inputs already done before a resume)."""

    n_inputs: int
    n_ok: int
    n_error: int
    out_dir: Path
    n_skipped: int = 0


@dataclass
class Loaded:
    """One decoded input (or the reason it could not be decoded)."""

    index: int
    source: str
    image: Image.Image | None = None
    tensor: torch.Tensor | None = None
    error: str | None = None


def run_explain(
    classifier: Classifier | str,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str = "cam",
    target: Target = "top1",
    layer: str | None = None,
    method_options: dict[str, Any] | None = None,
    batch_size: int = 16,
    style: Style | None = None,
    figures: bool = False,
    progress: bool = True,
    title: str = "camlens explain",
    engine: str = "local",
    resume: bool = False,
    overwrite: bool = False,
    ray_address: str | None = None,
    workers: int | None = None,
) -> RunSummary:
    """Explain every input and write overlays, raw maps, ``results.jsonl`` and ``index.html``.

    Parameters:
        classifier: the model (a ``Classifier`` or a ``load_model`` spec).
        inputs: image files and folders (folders are searched recursively, sorted).
        out_dir: output folder (created). A non-empty folder is refused unless ``resume``
            (continue an interrupted run) or ``overwrite`` (remove camlens' previous outputs).
        method, target, layer, method_options: as in ``camlens.explain``.
        batch_size: images per forward pass.
        style: colormap, opacity and box threshold of the overlays.
        figures: also write one figure per input with all its maps side by side.
        progress: show a progress bar on stderr (only for more than 3 inputs).
        engine: ``"local"`` or ``"ray"``; ``ray_address`` and ``workers`` configure Ray.

    Returns:
        A ``RunSummary``; ``n_error`` counts inputs that could not be read.

    Raises:
        ConfigError: bad configuration, or a non-empty output folder without resume/overwrite.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    out_dir = Path(out_dir)
    done = prepare_output(out_dir, resume=resume, overwrite=overwrite)
    paths = collect_inputs(inputs)
    job = ExplainJob(
        model=classifier,
        method=method,
        target=target,
        layer=layer,
        method_options=dict(method_options or {}),
        batch_size=batch_size,
        style=style or Style(),
        figures=figures,
    )
    pending = [(i, str(p)) for i, p in enumerate(paths) if str(p) not in done]
    n_ok = n_error = 0
    bar = tqdm(
        total=len(pending), unit="img", file=sys.stderr, disable=not progress or len(pending) <= 3
    )
    with JsonlWriter(out_dir / RESULTS_FILE, append=resume) as writer, bar:
        for record in _engine_records(job, pending, out_dir, engine, ray_address, workers):
            writer.write(record)
            n_ok += record["status"] == "ok"
            n_error += record["status"] == "error"
            bar.update(1)
    records = _finalize_results(out_dir, [str(p) for p in paths])
    model_name = classifier if isinstance(classifier, str) else classifier.name
    write_gallery(
        out_dir,
        records,
        title=title,
        subtitle=f"model {model_name} · method {method} · target {target}",
        figures={r["input"]: r["figure"] for r in records if r.get("figure")},
    )
    skipped = len(paths) - len(pending)
    n_ok += sum(1 for r in records if r["input"] in done and r["status"] == "ok")
    n_error += sum(1 for r in records if r["input"] in done and r["status"] == "error")
    return RunSummary(len(paths), n_ok, n_error, out_dir, skipped)


def prepare_output(
    out_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    entries: Sequence[str] = OUTPUT_ENTRIES,
    results: str | None = RESULTS_FILE,
    key: str = "input",
) -> set[Any]:
    """Make ``out_dir`` ready; return the inputs already done (for a resume).

    A non-empty folder is refused unless ``resume`` or ``overwrite``. ``overwrite`` removes
    only what camlens writes, the files and folders named in ``entries`` (for ``camlens
    explain``: ``results.jsonl``, ``index.html``, ``overlays/``, ``raw/``, ``figures/``), never
    other files. ``resume`` drops a torn last line of the record file ``results`` and returns
    the value of ``key`` of every record in it (an empty set when ``results`` is None: the
    command keeps its progress elsewhere).

    Example:
        >>> prepare_output(Path("out"), resume=True, overwrite=False)  # after 2 of 3 inputs
        {'a.png', 'b.png'}
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other; choose one")
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        if results is None:
            return set()
        path = out_dir / results
        drop_torn_tail(path)
        return {record[key] for record in iter_jsonl(path)}
    if overwrite:
        for name in entries:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    elif any(out_dir.iterdir()):
        count = sum(1 for _ in out_dir.iterdir())
        raise ConfigError(
            f"the output folder {str(out_dir)!r} is not empty ({count} entries); use --resume "
            "to continue an interrupted run there, --overwrite to replace camlens' previous "
            "outputs, or choose another --out"
        )
    return set()


def record_run_settings(
    out_dir: Path, name: str, settings: dict[str, Any], *, resume: bool, has_results: bool
) -> None:
    """Keep a run's ``settings`` in ``out_dir/name``; on a resume, check them against the
    interrupted run's instead.

    Parameters:
        out_dir: the output folder (after ``prepare_output``).
        name: the settings file, e.g. ``"evaluation.json"``.
        settings: JSON-ready values that must not change between a run and its resume
            (compared as they read back from JSON: a tuple equals the list it is stored as).
        resume: whether this run continues an interrupted one.
        has_results: whether the folder already holds files a resume would build on (without
            a settings file to vouch for them, a resume is refused).

    Raises:
        ConfigError: on a resume, the settings differ from the file's (the message names the
            keys), or ``has_results`` but no settings file to check them against.
    """
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    path = out_dir / name
    if resume and path.exists():
        check_same_settings(json.loads(path.read_text(encoding="utf-8")), settings, out_dir)
        return
    if resume and has_results:
        raise ConfigError(
            f"cannot resume in {str(out_dir)!r}: it has no {name}, so what it holds cannot be "
            "checked against this run's settings; use --overwrite to start again there (it "
            "keeps files that camlens did not write), or choose another --out"
        )
    write_json(path, settings)


def check_same_settings(previous: dict[str, Any], current: dict[str, Any], out_dir: Path) -> None:
    """Refuse to resume when the settings differ from the interrupted run's.

    Example:
        >>> check_same_settings({"seed": 0}, {"seed": 1}, Path("out"))
        Traceback (most recent call last):
        ConfigError: cannot resume in 'out': the settings differ ... (seed) - seed: 0 then, 1 now...
    """
    keys = [k for k in dict.fromkeys([*previous, *current]) if previous.get(k) != current.get(k)]
    if keys:
        changes = "; ".join(
            f"{k}: {_short(previous.get(k))} then, {_short(current.get(k))} now" for k in keys
        )
        raise ConfigError(
            f"cannot resume in {str(out_dir)!r}: the settings differ from the interrupted run's "
            f"({', '.join(keys)}) - {changes}. Resume with the same settings, or start again "
            "with --overwrite"
        )


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def repair_results(path: Path) -> list[dict[str, Any]]:
    """Read ``results.jsonl``, cutting off a torn (incomplete or unparsable) last line."""
    drop_torn_tail(path)
    return list(iter_jsonl(path))


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
    """The records of a JSON-lines file, one at a time (unparsable lines are skipped; a
    missing file has none)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/results.jsonl`` (a torn last line is skipped)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {str(out_dir)!r}")
    return list(iter_jsonl(path))


def _finalize_results(out_dir: Path, inputs: list[str]) -> list[dict[str, Any]]:
    """Put ``results.jsonl`` in input order with one record per input (after a resume the
    file holds the earlier run's records first)."""
    records = read_results(out_dir)
    order = {source: i for i, source in enumerate(inputs)}
    unique = {r["input"]: r for r in records}
    ordered = sorted(unique.values(), key=lambda r: order.get(r["input"], len(order)))
    if ordered != records:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
        write_text(out_dir / RESULTS_FILE, text)
    return ordered


def _engine_records(
    job: ExplainJob,
    pending: list[tuple[int, str]],
    out_dir: Path,
    engine: str,
    ray_address: str | None,
    workers: int | None,
) -> Iterator[dict[str, Any]]:
    if not pending:
        return iter(())
    if engine == "ray":
        from camlens.ray_engine import ray_records

        return ray_records(job, pending, out_dir, address=ray_address, workers=workers)
    return _local_records(job, pending, out_dir)


def _local_records(
    job: ExplainJob, pending: list[tuple[int, str]], out_dir: Path
) -> Iterator[dict[str, Any]]:
    explainer = BatchExplainer(job, out_dir)

    def load(item: tuple[int, str]) -> Loaded:
        return load_input(explainer.classifier, *item)

    for _, loaded in prefetched(chunks(pending, job.batch_size), load):
        yield from explainer.explain_loaded(loaded)


class BatchExplainer:
    """Loads the model and method once; turns batches of inputs into records and files.

    Used in-process by the local engine and as the actor class of the Ray engine.
    """

    def __init__(self, job: ExplainJob, out_dir: str | Path) -> None:
        self.job = job
        self.out_dir = Path(out_dir)
        model = job.model
        self.classifier = load_model(model, device=job.device) if isinstance(model, str) else model
        self.method = make_method(self.classifier, job.method, job.layer, **job.method_options)

    def explain_sources(self, items: Sequence[tuple[int, str]]) -> list[dict[str, Any]]:
        """Decode and explain ``(index, path)`` items; one record per item, in order."""
        return self.explain_loaded([load_input(self.classifier, i, s) for i, s in items])

    def explain_loaded(self, batch: list[Loaded]) -> list[dict[str, Any]]:
        """Explain decoded inputs; one record per item, in order."""
        good = [item for item in batch if item.error is None]
        records = {
            item.index: error_record(item.source, item.error) for item in batch if item.error
        }
        if good:
            explanation = self._explain([item.tensor for item in good], [i.image for i in good])
            for i, item in enumerate(good):
                records[item.index] = write_outputs(
                    explanation,
                    i,
                    item.source,
                    output_stem(item.index, item.source),
                    self.out_dir,
                    self.job.style,
                    self.job.figures,
                )
        return [records[item.index] for item in batch]

    def _explain(self, tensors: list[torch.Tensor], images: list[Image.Image]) -> Explanation:
        x = torch.cat(tensors)
        result = self.method.run(x, self.job.target)
        return Explanation(
            raw=result.raw.cpu(),
            targets=result.targets.cpu(),
            logits=result.logits.float().cpu(),
            method=self.method.name,
            layer=result.layer,
            input_size=(x.shape[-2], x.shape[-1]),
            labels=self.classifier.labels,
            images=images,
            identity_error=result.identity_error,
        )


def save_explanation(
    explanation: Explanation,
    out_dir: Path,
    *,
    names: list[str] | None = None,
    colormap: str = "jet",
    alpha: float = 0.5,
    threshold: float = 0.2,
) -> list[dict[str, Any]]:
    """Write the files of an in-memory ``Explanation`` (see ``Explanation.save``)."""
    style = Style(colormap, alpha, threshold)
    names = names or [f"image{i}" for i in range(len(explanation))]
    records = [
        write_outputs(explanation, i, names[i], output_stem(i, names[i]), out_dir, style, False)
        for i in range(len(explanation))
    ]
    with JsonlWriter(out_dir / RESULTS_FILE) as writer:
        for record in records:
            writer.write(record)
    write_gallery(out_dir, records, title=f"camlens {explanation.method}")
    return records


def load_input(classifier: Classifier, index: int, source: str | os.PathLike) -> Loaded:
    """Decode and preprocess one input; a bad file becomes a ``Loaded`` with ``error``."""
    try:
        image = load_image(source)
    except ImageLoadError as error:
        return Loaded(index, str(source), error=str(error))
    return Loaded(index, str(source), image=image, tensor=classifier.preprocess(image))


def prefetched(
    batches: Iterable[Sequence[T]], load: Callable[[T], U], *, threads: int = 2
) -> Iterator[tuple[Sequence[T], list[U]]]:
    """``(batch, [load(item) for item in batch])`` for every batch, in order, with the next
    batch already loading in ``threads`` worker threads while the caller works on the current
    one: decoding overlaps inference, and at most two batches are in memory.

    Every batch command's local engine reads its inputs through this (``camlens explain``,
    ``evaluate`` and ``audit``). ``load`` should turn a failure into a value (an error
    record), since an exception it raises surfaces here.

    Example:
        >>> for batch, images in prefetched(chunks(paths, 16), load_image):
        ...     model(preprocess(images))
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


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def write_outputs(
    explanation: Explanation,
    i: int,
    source: str,
    stem: str,
    out_dir: Path,
    style: Style,
    figures: bool,
) -> dict[str, Any]:
    """Write image ``i``'s overlays, raw maps (and figure); return its record."""
    probs = explanation.probs[i]
    top = probs.topk(min(5, probs.numel()))
    predictions = [
        {"class": int(c), "label": explanation.label(int(c)), "prob": round(float(p), 6)}
        for p, c in zip(top.values, top.indices, strict=True)
    ]
    boxes = explanation.image_boxes(i, style.threshold, original=True)
    overlays = explanation.image_overlays(
        i, colormap=style.colormap, alpha=style.alpha, threshold=style.threshold
    )
    maps = []
    classes = explanation.targets[i].tolist()
    for k, (class_id, image) in enumerate(zip(classes, overlays, strict=True)):
        relative = f"overlays/{stem}_c{class_id}.png"
        write_png(out_dir / relative, image)
        maps.append(
            {
                "class": class_id,
                "label": explanation.label(class_id),
                "score": round(float(explanation.scores[i, k]), 6),
                "prob": round(float(probs[class_id]), 6),
                "overlay": relative,
                "box": list(boxes[k]) if boxes[k] is not None else None,
            }
        )
    raw_path = f"raw/{stem}.npz"
    width, height = explanation.original_size(i)
    write_npz(
        out_dir / raw_path,
        raw=explanation.raw[i].numpy(),
        targets=explanation.targets[i].numpy(),
        logits=explanation.logits[i].numpy(),
    )
    record = {
        "input": source,
        "status": "ok",
        "error": None,
        "predictions": predictions,
        "maps": maps,
        "raw": raw_path,
        "method": explanation.method,
        "layer": explanation.layer,
        "size": [width, height],
        "identity_error": explanation.identity_error,
    }
    if figures:
        record["figure"] = _write_figure(explanation, i, overlays, maps, stem, out_dir)
    return record


def _write_figure(
    explanation: Explanation,
    i: int,
    overlays: list[Image.Image],
    maps: list[dict[str, Any]],
    stem: str,
    out_dir: Path,
) -> str:
    titles = [f"{m['label']}\np={m['prob']:.2f}" for m in maps]
    figure = topk_figure(explanation.display_image(i), overlays, titles)
    relative = f"figures/{stem}.png"
    save_figure(figure, out_dir / relative)
    return relative


def error_record(source: str, message: str | None) -> dict[str, Any]:
    """The record of an input that could not be processed."""
    return {
        "input": source,
        "status": "error",
        "error": message,
        "predictions": [],
        "maps": [],
        "raw": None,
    }


def output_stem(index: int, source: str) -> str:
    """File-name stem of input ``index``: its position and a sanitised name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem)[:60] or "input"
    return f"{index:05d}_{name}"
