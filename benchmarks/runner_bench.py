"""End-to-end throughput and memory of ``camlens explain`` (issue: batch jobs at scale).

Measured in one run, side by side, on a folder of photographs (the bundled samples, resized
to 320 x 240 and repeated):

* images/s of the local engine and of the Ray engine with 1 and 2 workers (same inputs,
  same outputs; each run in a fresh process so start-up is included and reported);
* peak RSS of a local run over 100 and over 1,000 inputs (flat memory: maps are written as
  they are made and never all kept).

Usage::

    .venv/bin/python benchmarks/runner_bench.py --out benchmarks/results/runner.md
    .venv/bin/python benchmarks/runner_bench.py --quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from camlens.io.samples import SAMPLES, sample_image
from section import generated_by, write_section

CHILD = r"""
import json, resource, sys, time
import camlens
args = json.loads(sys.argv[1])
start = time.perf_counter()
kwargs = {}
if args["engine"] == "ray":
    import ray
    ray.init(num_cpus=args["workers"], include_dashboard=False, log_to_driver=False)
    kwargs = {"engine": "ray", "workers": args["workers"]}
ready = time.perf_counter()
from camlens.tasks.explain import Style
options = camlens.RunOptions(batch_size=16, progress=False, overwrite=True, **kwargs)
style = Style(overlay_size=args.get("overlay_size", 2000))
summary = camlens.run_explain("efficientnet_lite0", [args["inputs"]], args["out"],
                              style=style, options=options)
done = time.perf_counter()
print(json.dumps({"n": summary.n_ok, "total_s": done - start, "run_s": done - ready,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photos = [sample_image(name).resize((320, 240)) for name in SAMPLES]
    for i in range(n):
        path = folder / f"photo{i:05d}.jpg"
        if not path.exists():
            photos[i % len(photos)].save(path, quality=90)
    return folder


def make_big_photos(folder: Path, n: int, size: tuple[int, int] = (4000, 3000)) -> Path:
    """``n`` 12-megapixel JPEG photos (the bundled samples enlarged), like a phone's."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [sample_image(name).resize(size, Image.BICUBIC) for name in SAMPLES]
    for i in range(n):
        path = folder / f"big{i:03d}.jpg"
        if not path.exists():
            photos[i % len(photos)].save(path, quality=90)
    return folder


def measure(
    inputs: Path, out: Path, engine: str, workers: int = 1, overlay_size: int = 2000
) -> dict:
    args = {
        "inputs": str(inputs), "out": str(out), "engine": engine, "workers": workers,
        "overlay_size": overlay_size,
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{engine} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--n-speed", type=int, default=200, help="inputs for the speed runs")
    args = parser.parse_args()
    n_speed, sizes = (40, (20, 60)) if args.quick else (args.n_speed, (100, 1000))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        speed_inputs = make_photos(tmp / f"in{n_speed}", n_speed)
        for engine, workers in (("local", 1), ("ray", 1), ("ray", 2)):
            result = measure(speed_inputs, tmp / f"out-{engine}{workers}", engine, workers)
            label = "local" if engine == "local" else f"ray, {workers} worker(s)"
            rows.append((label, result))
            print(label, result, flush=True)
        memory = []
        for n in sizes:
            result = measure(make_photos(tmp / f"in{n}", n), tmp / f"mem{n}", "local")
            memory.append((n, result))
            print(n, result, flush=True)
        big_inputs = make_big_photos(tmp / "big", 5 if args.quick else 20)
        big = []
        for overlay_size in (2000, 0):
            out = tmp / f"big-out{overlay_size}"
            result = measure(big_inputs, out, "local", overlay_size=overlay_size)
            overlay = max((out / "overlays").iterdir(), key=lambda p: p.stat().st_size)
            with Image.open(overlay) as image:
                result["overlay_size"], result["overlay_mb"] = (
                    image.size,
                    overlay.stat().st_size / 1e6,
                )
            big.append((overlay_size, result))
            print("12 MP", overlay_size, result, flush=True)
    base = rows[0][1]["n"] / rows[0][1]["run_s"]
    lines = [
        "## End-to-end `camlens explain` (runner, engines, memory)",
        "",
        f"{generated_by('runner_bench.py')} Built-in EfficientNet-Lite0, CAM, top-1, batch 16, "
        "inputs: JPEG photos 320 x 240. Each run is a fresh process; `run s` excludes Python "
        "and Ray start-up, `total s` includes them.",
        "",
        "| engine | inputs | run s | total s | images/s (run) | x local |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        rate = r["n"] / r["run_s"]
        lines.append(
            f"| {label} | {r['n']} | {r['run_s']:.1f} | {r['total_s']:.1f} | {rate:.1f} "
            f"| {rate / base:.2f} |"
        )
    lines += ["", "| inputs (local engine) | peak RSS MiB | images/s |", "|---:|---:|---:|"]
    for n, r in memory:
        lines.append(f"| {n} | {r['peak_rss_mib']:.0f} | {r['n'] / r['run_s']:.1f} |")
    ratio = memory[-1][1]["peak_rss_mib"] / memory[0][1]["peak_rss_mib"]
    lines += ["", f"Peak RSS ratio {memory[-1][0]} / {memory[0][0]} inputs: {ratio:.2f}.", ""]
    lines += [
        f"Large photos: {big[0][1]['n']} JPEGs of 4000 x 3000 (12 MP), the same settings:",
        "",
        "| --overlay-size | peak RSS MiB | s per image | overlay (px, MB) |",
        "|---:|---:|---:|---|",
    ]
    for overlay_size, r in big:
        width, height = r["overlay_size"]
        lines.append(
            f"| {overlay_size or '0 (original)'} | {r['peak_rss_mib']:.0f} | "
            f"{r['run_s'] / r['n']:.2f} | {width} x {height}, {r['overlay_mb']:.1f} |"
        )
    lines.append("")
    write_section(lines, args.out)


if __name__ == "__main__":
    main()
