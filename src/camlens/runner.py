"""Stream inputs through a model and a method, writing results as they are made.

decode (threads, one batch ahead) -> batch -> method -> Explanation -> per-input files ->
``results.jsonl`` (one line per input, in input order) -> ``index.html``. Bad inputs become
error records; the rest of the batch goes on. Peak memory does not grow with the number of
inputs: only the current and the next batch are held.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from camlens.api import make_method
from camlens.explanation import Explanation
from camlens.io import ImageLoadError, collect_inputs, load_image
from camlens.methods import CAMMethod
from camlens.models import Classifier
from camlens.render import save_figure, topk_figure
from camlens.report.gallery import write_gallery
from camlens.targets import Target
from camlens.writers import JsonlWriter, write_npz, write_png

RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class Style:
    """How overlays look: matplotlib colormap, opacity, and the box threshold."""

    colormap: str = "jet"
    alpha: float = 0.5
    threshold: float = 0.2


@dataclass(frozen=True)
class RunSummary:
    """Counts of a finished run."""

    n_inputs: int
    n_ok: int
    n_error: int
    out_dir: Path


@dataclass
class _Loaded:
    index: int
    source: str
    image: Image.Image | None = None
    tensor: torch.Tensor | None = None
    error: str | None = None


def run_explain(
    classifier: Classifier,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    method: str = "cam",
    target: Target = "top1",
    layer: str | None = None,
    batch_size: int = 16,
    style: Style | None = None,
    figures: bool = False,
    progress: bool = True,
    title: str = "camlens explain",
) -> RunSummary:
    """Explain every input and write overlays, raw maps, ``results.jsonl`` and ``index.html``.

    Parameters:
        classifier: the model (see ``load_model``).
        inputs: image files and folders (folders are searched recursively, sorted).
        out_dir: output folder (created).
        method, target, layer: as in ``camlens.explain``.
        batch_size: images per forward pass.
        style: colormap, opacity and box threshold of the overlays.
        figures: also write one figure per input with all its maps side by side.
        progress: show a progress bar on stderr (only for more than 3 inputs).

    Returns:
        A ``RunSummary``; ``n_error`` counts inputs that could not be read.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    style = style or Style()
    paths = collect_inputs(inputs)
    instance = make_method(classifier, method, layer)
    n_ok = n_error = 0
    bar = tqdm(
        total=len(paths), unit="img", file=sys.stderr, disable=not progress or len(paths) <= 3
    )
    with JsonlWriter(out_dir / RESULTS_FILE) as writer, bar:
        for batch in _prefetched_batches(classifier, paths, batch_size):
            for record in _explain_batch(
                classifier, instance, batch, target, out_dir, style, figures
            ):
                writer.write(record)
                n_ok += record["status"] == "ok"
                n_error += record["status"] == "error"
            bar.update(len(batch))
    records = read_results(out_dir)
    write_gallery(
        out_dir,
        records,
        title=title,
        subtitle=f"model {classifier.name} · method {instance.name} · target {target}",
        figures={r["input"]: r["figure"] for r in records if r.get("figure")},
    )
    return RunSummary(len(paths), n_ok, n_error, out_dir)


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/results.jsonl`` (a torn last line is skipped)."""
    records = []
    with open(Path(out_dir) / RESULTS_FILE, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


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
        _write_outputs(explanation, i, names[i], _stem(i, names[i]), out_dir, style, False)
        for i in range(len(explanation))
    ]
    with JsonlWriter(out_dir / RESULTS_FILE) as writer:
        for record in records:
            writer.write(record)
    write_gallery(out_dir, records, title=f"camlens {explanation.method}")
    return records


def _prefetched_batches(
    classifier: Classifier, paths: list[Path], batch_size: int
) -> Iterator[list[_Loaded]]:
    """Decode the next batch in worker threads while the current one is being explained."""
    chunks = _chunks(enumerate(paths), batch_size)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="camlens-decode") as pool:
        pending: list[Future[_Loaded]] | None = None
        for chunk in chunks:
            submitted = [pool.submit(_load, classifier, i, p) for i, p in chunk]
            if pending is not None:
                yield [f.result() for f in pending]
            pending = submitted
        if pending is not None:
            yield [f.result() for f in pending]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _load(classifier: Classifier, index: int, path: Path) -> _Loaded:
    try:
        image = load_image(path)
    except ImageLoadError as error:
        return _Loaded(index, str(path), error=str(error))
    return _Loaded(index, str(path), image=image, tensor=classifier.preprocess(image))


def _explain_batch(
    classifier: Classifier,
    method: CAMMethod,
    batch: list[_Loaded],
    target: Target,
    out_dir: Path,
    style: Style,
    figures: bool,
) -> list[dict[str, Any]]:
    good = [item for item in batch if item.error is None]
    records: dict[int, dict[str, Any]] = {
        item.index: _error_record(item.source, item.error) for item in batch if item.error
    }
    if good:
        x = torch.cat([item.tensor for item in good])
        result = method.run(x, target)
        explanation = Explanation(
            raw=result.raw.cpu(),
            targets=result.targets.cpu(),
            logits=result.logits.float().cpu(),
            method=method.name,
            layer=result.layer,
            input_size=(x.shape[-2], x.shape[-1]),
            labels=classifier.labels,
            images=[item.image for item in good],
            identity_error=result.identity_error,
        )
        for i, item in enumerate(good):
            stem = _stem(item.index, item.source)
            records[item.index] = _write_outputs(
                explanation, i, item.source, stem, out_dir, style, figures
            )
    return [records[item.index] for item in batch]


def _write_outputs(
    explanation: Explanation,
    i: int,
    source: str,
    stem: str,
    out_dir: Path,
    style: Style,
    figures: bool,
) -> dict[str, Any]:
    probs = explanation.probs[i]
    top = probs.topk(min(5, probs.numel()))
    predictions = [
        {"class": int(c), "label": explanation.label(int(c)), "prob": round(float(p), 6)}
        for p, c in zip(top.values, top.indices, strict=True)
    ]
    boxes = explanation.boxes(style.threshold, original=True)[i] if len(explanation) else []
    overlays = explanation.overlays(
        colormap=style.colormap, alpha=style.alpha, threshold=style.threshold
    )[i]
    maps = []
    for k, (class_id, image) in enumerate(
        zip(explanation.targets[i].tolist(), overlays, strict=True)
    ):
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


def _error_record(source: str, message: str | None) -> dict[str, Any]:
    return {
        "input": source,
        "status": "error",
        "error": message,
        "predictions": [],
        "maps": [],
        "raw": None,
    }


def _stem(index: int, source: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem)[:60] or "input"
    return f"{index:05d}_{name}"
