"""``camlens explain`` end to end against plain batch classification of the same files.

The issue's target: explain's throughput (decode, model, map, overlay PNG, raw npz, record)
at least 0.8 x that of plain classification (decode + forward + top-5 records), with the same
batch size, the same engine and decoding threads, measured side by side in one process:
rounds alternate between the three jobs so that a change in the machine's speed touches
all of them alike, and each job's median round is reported.

Then a profile of one explain run (cProfile, the main thread: where the critical path's time
goes; decoding runs in threads one batch ahead) grouped by stage: the model and the map, the
overlays (resize, colour map, blend), PNG encoding, raw npz, records.

Usage::

    .venv/bin/python benchmarks/throughput_bench.py --out benchmarks/results/throughput.md
    .venv/bin/python benchmarks/throughput_bench.py --quick
    .venv/bin/python benchmarks/throughput_bench.py --device cuda   # on a GPU machine
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

import camlens
import camlens.tasks.explain as explain_task
from camlens.models import Classifier, load_model
from camlens.models.outputs import select_logits
from camlens.pipeline import Item, OutputFolder
from camlens.pipeline import run as run_task
from camlens.tasks.common import Loaded, load_input, model_settings
from runner_bench import make_photos
from section import generated_by, write_section


@dataclass(frozen=True)
class ClassifyTask:
    """Plain batch classification on the pipeline: decode, forward, top-5 records."""

    model: Classifier

    name: ClassVar[str] = "classify"
    records_file: ClassVar[str] = "results.jsonl"
    parts_dir: ClassVar[str] = "parts"

    def settings(self) -> dict[str, Any]:
        return model_settings(self.model)

    def describe(self, item: Any) -> Any:
        return str(item)

    def start(self, folder: OutputFolder | None) -> _ClassifyWorker:
        return _ClassifyWorker(self.model)

    def for_actors(self) -> ClassifyTask:
        return self

    def fold(self, records: Any) -> dict[str, int]:
        return {"n_ok": sum(record["status"] == "ok" for record in records)}


class _ClassifyWorker:
    def __init__(self, model: Classifier) -> None:
        self.model = model

    def load(self, item: Item) -> Loaded:
        return load_input(self.model, *item)

    def process(self, batch: Sequence[Item], loaded: Sequence[Loaded]) -> list[dict[str, Any]]:
        x = torch.cat([item.tensor for item in loaded]).to(self.model.device)
        with torch.inference_mode():
            logits = select_logits(self.model.module(x), self.model.output)
            top = logits.float().softmax(1).topk(5)
        return [
            {
                "input": item.source,
                "status": "ok",
                "predictions": [
                    {"class": int(c), "label": self.model.labels[int(c)], "prob": float(p)}
                    for p, c in zip(values, indices, strict=True)
                ],
            }
            for item, values, indices in zip(loaded, top.values, top.indices, strict=True)
        ]


#: The jobs measured side by side: plain classification, and explain as users run it.
JOBS = ("classify", "explain cam", "explain gradcam")


def time_job(model: Classifier, job: str, inputs: list[str], out: Path, batch_size: int) -> float:
    """Seconds of one run of ``job`` over ``inputs`` (into a fresh ``out``)."""
    options = camlens.RunOptions(batch_size=batch_size, progress=False, overwrite=True)
    start = time.perf_counter()
    if job == "classify":
        result = run_task(ClassifyTask(model), inputs, out, options)
    else:
        method = job.split()[-1]
        result = camlens.run_explain(model, inputs, out, method=method, options=options)
    elapsed = time.perf_counter() - start
    if result.n_ok != len(inputs):
        raise RuntimeError(f"{job}: {result.n_ok} of {len(inputs)} inputs done")
    return elapsed


def measure(
    model: Classifier, inputs: list[str], tmp: Path, rounds: int, batch_size: int
) -> dict[str, list[float]]:
    for job in JOBS:  # warm-up: first calls, caches, allocator
        time_job(model, job, inputs[: 2 * batch_size], tmp / "warm", batch_size)
    times: dict[str, list[float]] = {job: [] for job in JOBS}
    for round_ in range(rounds):
        for job in JOBS:
            out = tmp / job.replace(" ", "-")
            times[job].append(time_job(model, job, inputs, out, batch_size))
        print(f"round {round_ + 1}/{rounds}:", {k: f"{v[-1]:.2f}s" for k, v in times.items()})
    return times


#: Stages of the profile: the cumulative time of the functions (file suffix, name) named.
#: Stages may nest: the overlays' time includes the boxes they draw.
STAGES = (
    ("model and map (method.run)", ("camlens/methods/base.py", "run")),
    ("maps at overlay size (display_maps)", ("camlens/explanation.py", "display_maps")),
    ("overlays (colour map, blend, box)", ("camlens/explanation.py", "image_overlays")),
    ("boxes", ("camlens/explanation.py", "image_boxes")),
    ("PNG encoding and writing", ("camlens/writers.py", "write_png")),
    ("raw maps (.npz)", ("camlens/writers.py", "write_npz")),
    ("records (results.jsonl, parts)", ("camlens/pipeline/folder.py", "append")),
    ("gallery (index.html)", ("camlens/report/gallery.py", "write_gallery")),
    ("waiting for decoding threads", ("concurrent/futures/_base.py", "result")),
)


def profile_explain(
    model: Classifier, inputs: list[str], tmp: Path, batch_size: int, method: str
) -> tuple[float, list[tuple[str, float]]]:
    threads = explain_task.output_threads
    explain_task.output_threads = lambda n_images: 1  # every stage in the profiled thread
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        total = time_job(model, f"explain {method}", inputs, tmp / f"profile-{method}", batch_size)
    finally:
        profiler.disable()
        explain_task.output_threads = threads
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for label, (suffix, function) in STAGES:
        seconds = sum(
            entry[3]
            for (filename, _, name), entry in stats.items()
            if filename.endswith(suffix) and name == function
        )
        rows.append((label, seconds))
    return total, rows


def throughput_table(times: dict[str, list[float]], n: int) -> list[str]:
    base = n / statistics.median(times["classify"])
    lines = [
        "| job | median s | images/s | x classification |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        rate = n / statistics.median(values)
        lines.append(
            f"| {name} | {statistics.median(values):.2f} | {rate:.1f} | {rate / base:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--n", type=int, default=200, help="photos per job")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three jobs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    n, rounds = (48, 2) if args.quick else (args.n, args.rounds)
    model = load_model("efficientnet_lite0", device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_photos(tmp / "photos", n)
        inputs = sorted(str(path) for path in folder.iterdir())
        times = measure(model, inputs, tmp, rounds, args.batch_size)
        profiles = {
            method: profile_explain(model, inputs, tmp, args.batch_size, method)
            for method in ("cam", "gradcam")
        }
    lines = [
        "## Throughput: `camlens explain` against plain classification",
        "",
        generated_by("throughput_bench.py")
        + f" Built-in EfficientNet-Lite0 on {args.device}, batch {args.batch_size}, {n} JPEG "
        f"photos of 320 x 240, the local engine (next batch decoded in threads), {rounds} "
        "alternating rounds in one process, medians. Plain classification: decode, forward, "
        "top-5 records on the same pipeline. Explain: decode, model and map, overlay PNG "
        "per map, raw `.npz`, record.",
        "",
        *throughput_table(times, n),
        "",
        "Where an explain run's time goes: cProfile of one run with the outputs written one "
        "image at a time (in the runs above a thread pool writes a batch's images in "
        "parallel); decoding runs in threads one batch ahead, its row is the wait for it:",
        "",
        "| stage | cam s | gradcam s |",
        "|---|---:|---:|",
    ]
    cam_total, cam_rows = profiles["cam"]
    grad_total, grad_rows = profiles["gradcam"]
    for (label, cam_s), (_, grad_s) in zip(cam_rows, grad_rows, strict=True):
        lines.append(f"| {label} | {cam_s:.2f} | {grad_s:.2f} |")
    lines.append(f"| whole run (profiled) | {cam_total:.2f} | {grad_total:.2f} |")
    write_section(lines, args.out)


if __name__ == "__main__":
    main()
