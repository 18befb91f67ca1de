"""The throughput ratios of issue 17 on a GPU, when this machine has one.

Measures on ``--device`` (default ``cuda``), each time synchronised with the device:

* the public call ``camlens.explain(model, x, method=...)`` against a plain forward pass
  (built-in EfficientNet-Lite0, a batch of the sample photos at 224 px): CAM / forward and
  Grad-CAM / forward;
* Score-CAM against its floor, the forward passes it cannot avoid (512 masked copies of each
  image through torchvision's ResNet-18, random weights, as ``methods_bench.py``);
* ``camlens explain`` end to end against plain classification of the same files
  (``throughput_bench.py``'s jobs: decode, model, map, PNG, npz, records).

Without a CUDA GPU it says so plainly, measures nothing and exits 0 (``make bench`` keeps
going); ``--device cpu`` runs the same measurements on the CPU (a check of this script).

Usage::

    .venv/bin/python benchmarks/gpu.py --out benchmarks/results/gpu.md
    .venv/bin/python benchmarks/gpu.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import camlens
import methods_bench
import throughput_bench
from runner_bench import make_photos
from section import generated_by, write_section


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    run: Callable[[], Any], device: torch.device, rounds: int, warmup: int = 2
) -> float:
    """Median wall time of ``run()`` over ``rounds``, the device's queue drained each time."""
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def method_ratios(device: torch.device, batch_size: int, rounds: int) -> list[tuple[str, float]]:
    """(name, seconds) of forward, CAM and Grad-CAM through the public call."""
    model = camlens.load_model("efficientnet_lite0", device=str(device))
    x = methods_bench.bench.make_batch(model, batch_size).to(device)

    def forward() -> None:
        with torch.inference_mode():
            model.module(x)

    return [
        ("forward", median_seconds(forward, device, rounds)),
        ("CAM", median_seconds(lambda: camlens.explain(model, x, method="cam"), device, rounds)),
        (
            "Grad-CAM",
            median_seconds(lambda: camlens.explain(model, x, method="gradcam"), device, rounds),
        ),
    ]


def score_cam_ratio(device: torch.device, args: argparse.Namespace) -> tuple[float, float]:
    """(floor seconds, Score-CAM seconds) on ResNet-18's ``layer4``."""
    module, x = methods_bench.score_setup(args)
    module, x = module.to(device), x.to(device)
    runs = methods_bench.score_runs(module, x, args.chunk)
    rounds = max(1, args.rounds // 2)
    floor = median_seconds(runs[methods_bench.FLOOR], device, rounds, warmup=1)
    ours = median_seconds(runs[methods_bench.CAMLENS], device, rounds, warmup=1)
    return floor, ours


def no_device_lines(device: str) -> list[str]:
    return [
        "## GPU",
        "",
        generated_by("gpu.py"),
        "",
        f"No CUDA GPU on this machine (`torch.cuda.is_available()` is False; asked for "
        f"`{device}`): nothing was measured. Run `python benchmarks/gpu.py` on a machine with "
        "a GPU for the ratios of CAM, Grad-CAM and Score-CAM and of `camlens explain` end to "
        "end there.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--n", type=int, default=400, help="photos for explain end to end")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        write_section(no_device_lines(args.device), args.out)
        return
    if args.quick:
        args.rounds, args.n = 2, 48
    # methods_bench's Score-CAM set-up: two photos at 112 px, forwards in chunks of 64.
    args.score_images, args.score_size, args.chunk = 2, 112, 64
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    methods = dict(method_ratios(device, args.batch_size, args.rounds))
    floor, score = score_cam_ratio(device, args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = sorted(str(p) for p in make_photos(tmp / "photos", args.n).iterdir())
        model = camlens.load_model("efficientnet_lite0", device=str(device))
        times = throughput_bench.measure(model, inputs, tmp, max(2, args.rounds // 5), 16)
    forward = methods["forward"]
    lines = [
        "## GPU",
        "",
        generated_by("gpu.py") + f" Device: {name} (`{device}`).",
        "",
        "| measured | s | ratio | to |",
        "|---|---:|---:|---|",
        f"| forward, EfficientNet-Lite0, batch {args.batch_size} | {forward:.4f} | 1.00 | |",
        f'| `camlens.explain(method="cam")` | {methods["CAM"]:.4f} | '
        f"{methods['CAM'] / forward:.2f} | forward |",
        f'| `camlens.explain(method="gradcam")` | {methods["Grad-CAM"]:.4f} | '
        f"{methods['Grad-CAM'] / forward:.2f} | forward |",
        f"| Score-CAM floor, ResNet-18 `layer4`, 2 images | {floor:.4f} | 1.00 | |",
        f"| camlens Score-CAM | {score:.4f} | {score / floor:.2f} | floor |",
        "",
        "`camlens explain` end to end against plain classification, "
        f"{len(inputs)} photos of 320 x 240:",
        "",
        *throughput_bench.throughput_table(times, len(inputs)),
    ]
    write_section(lines, args.out)


if __name__ == "__main__":
    main()
