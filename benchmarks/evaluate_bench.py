"""Benchmark ``camlens evaluate``: how many deletion/insertion steps, and its time per image.

(a) Steps. A deletion (insertion) curve with ``steps`` steps scores the image after removing
(putting back) the ``round(k * H * W / steps)`` most salient pixels, ``k = 0 .. steps``; its
area (AUC) approximates the area of the curve at full resolution, and every step costs one
forward pass per image and curve. For every steps count of the grid (10 ... 128) the script
measures |AUC(steps) - AUC(224)| per curve (224 steps: RISE's setting, 224 pixels per step on
a 224 x 224 input) with evaluate's settings (deletion to zero, insertion from the blurred
image, class probability), and reports its mean and its maximum over the curves, on

* the bundled sample photos (``camlens.io.samples``): the built-in EfficientNet-Lite0, CAM maps
  of the top-1 and the top-2 class, each photo as it is and mirrored (5 x 2 x 2 curves);
* generated shapes (``camlens make-dataset shapes``, 64 px): a ``simple`` CAM network trained
  for a short time on 600 of them (seed 0), CAM maps of its top-1 class on held-out shapes
  (seed 1).

The default (``MetricSettings.steps``, ``--steps``) must be the smallest count of the grid
whose *maximum* difference stays below 0.01 for deletion and insertion on both sets, and on
every larger count of the grid. The scores at each distinct pixel count are computed once and
shared by the curves that need them; the script checks that its curves equal
``deletion_curve`` / ``insertion_curve`` on the first image of each set.

(b) Time per image. ``camlens.evaluate`` (default methods ``cam,gradcam``, default metrics:
localisation and faithfulness, default steps, batch 16, an output folder with
``metrics.json`` and ``report.html``: as users run it) on N held-out shapes, against its
floor: plain forward passes of the model (``torch.inference_mode``) over as many inputs in
the same batch sizes as evaluate fed the model, counted by a forward hook, measured in the
same process after a warm-up. Runs alternate (evaluate, floor) ``--repeats`` times; the
fastest of each is reported. Target: evaluate <= 1.15 x the floor. A cProfile run then shows
where the rest goes (the phases' cumulative times).

Usage::

    .venv/bin/python benchmarks/evaluate_bench.py --out benchmarks/results/evaluate.md
    .venv/bin/python benchmarks/evaluate_bench.py --quick                # smoke run
    .venv/bin/python benchmarks/evaluate_bench.py --part steps           # the steps table only
    .venv/bin/python benchmarks/evaluate_bench.py --shapes-model DIR     # reuse a trained model

The AUC differences do not depend on the machine's load; the times do (run part (b) on a
quiet machine).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps

import camlens
from camlens.data.shapes import ShapesConfig, make_shapes_dataset
from camlens.io.annotations import load_annotations
from camlens.io.samples import SAMPLES, sample_image
from camlens.localize import normalize_maps
from camlens.metrics import faithfulness as faith
from camlens.metrics.registry import MetricSettings
from camlens.pipeline import RunOptions
from camlens.training import TrainConfig, train_classifier
from section import generated_by, write_section

STEPS_GRID = (10, 16, 20, 25, 32, 50, 64, 100, 128)
REFERENCE_STEPS = 224
TOLERANCE = 0.01
TARGET_RATIO = 1.15
KINDS = ("deletion", "insertion")


# --- (a) the steps table -----------------------------------------------------------------------


def pixel_counts(steps: int, n_pixels: int) -> np.ndarray:
    """The pixels removed at each point of a ``steps``-step curve (as ``deletion_curve``)."""
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * n_pixels / steps)
    return counts.long().numpy()


def scores_at_counts(
    classifier: camlens.Classifier,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    counts: np.ndarray,
    kind: str,
    batch_size: int,
) -> np.ndarray:
    """(N, len(counts)) class probabilities after removing (deletion) or putting back
    (insertion) the ``counts`` most salient pixels, with evaluate's baselines."""
    settings = MetricSettings(metrics=[])
    insert = kind == "insertion"
    baseline = settings.insertion_baseline if insert else settings.deletion_baseline
    score = faith.scorer(classifier, score=settings.score)
    ranks = faith._ranks(faith._fit_saliency(maps, x))
    base = faith.perturbation_baseline(x, baseline)
    start, end = (base, x) if insert else (x, base)
    n, points = x.shape[0], len(counts)
    flat_counts = torch.as_tensor(counts)
    out = np.zeros(n * points)
    for first in range(0, n * points, batch_size):
        flat = torch.arange(first, min(first + batch_size, n * points))
        images, step = flat // points, flat % points
        removed = (ranks[images] < flat_counts[step].unsqueeze(1)).view(-1, 1, *x.shape[-2:])
        perturbed = torch.where(removed, end[images], start[images])
        out[first : first + len(flat)] = score(perturbed, targets[images]).double().numpy()
    return out.reshape(n, points)


def auc_differences(
    classifier: camlens.Classifier,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    grid: tuple[int, ...],
    batch_size: int,
) -> dict[tuple[str, int], np.ndarray]:
    """``(kind, steps) -> |AUC(steps) - AUC(REFERENCE_STEPS)|`` per curve, and
    ``(kind, REFERENCE_STEPS)`` -> the reference AUCs."""
    n_pixels = x.shape[-2] * x.shape[-1]
    every = [*grid, REFERENCE_STEPS]
    counts = np.unique(np.concatenate([pixel_counts(s, n_pixels) for s in every]))
    column = {int(c): i for i, c in enumerate(counts)}
    result: dict[tuple[str, int], np.ndarray] = {}
    for kind in KINDS:
        scores = scores_at_counts(classifier, x, maps, targets, counts, kind, batch_size)
        curves = {s: scores[:, [column[int(c)] for c in pixel_counts(s, n_pixels)]] for s in every}
        check = faith.deletion_curve if kind == "deletion" else faith.insertion_curve
        settings = MetricSettings(metrics=[])
        insert = kind == "insertion"
        baseline = settings.insertion_baseline if insert else settings.deletion_baseline
        direct = check(
            classifier, x[:1], maps[:1], targets[:1], steps=grid[0], baseline=baseline,
            batch_size=batch_size, score=settings.score,
        )  # fmt: skip
        np.testing.assert_allclose(curves[grid[0]][:1], direct, atol=1e-6)
        reference = faith.auc(curves[REFERENCE_STEPS])
        result[kind, REFERENCE_STEPS] = reference
        for s in grid:
            result[kind, s] = np.abs(faith.auc(curves[s]) - reference)
    return result


def top_maps(classifier: camlens.Classifier, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """CAM maps of the top-``k`` classes at the input size in [0, 1], as evaluate makes them
    (one row per image and class: image-major, best class first), the inputs repeated to
    match, and the classes."""
    explanation = camlens.explain(classifier, x, method="cam", target=f"top{k}")
    size = tuple(x.shape[-2:])
    maps = torch.stack(
        [normalize_maps(explanation.raw[:, j : j + 1], size)[:, 0] for j in range(k)], dim=1
    )
    return x.repeat_interleave(k, 0), maps.flatten(0, 1), explanation.targets.reshape(-1)


def photo_set(quick: bool) -> tuple[camlens.Classifier, torch.Tensor, torch.Tensor, torch.Tensor]:
    classifier = camlens.load_model("efficientnet_lite0")
    names = list(SAMPLES)[:2] if quick else list(SAMPLES)
    images = []
    for name in names:
        image = sample_image(name)
        images += [image] if quick else [image, ImageOps.mirror(image)]
    x = classifier.preprocess(images)
    return (classifier, *top_maps(classifier, x, 1 if quick else 2))


def train_shapes(work: Path, quick: bool, epochs: int) -> Path:
    """A ``simple`` CAM network trained on generated shapes (600, 64 px, seed 0)."""
    n = 90 if quick else 600
    make_shapes_dataset(work / "train", ShapesConfig(n=n, size=64, seed=0), overwrite=True)
    started = time.perf_counter()
    result = train_classifier(
        work / "train" / "images", work / "model",
        TrainConfig(epochs=2 if quick else epochs, seed=0), overwrite=True, progress=False,
    )  # fmt: skip
    print(
        f"trained simple on {n} shapes in {time.perf_counter() - started:.0f} s, "
        f"best val accuracy {result.best_val_accuracy:.3f}",
        flush=True,
    )
    return work / "model"


def shapes_set(
    model_dir: Path, data: Path, n: int
) -> tuple[camlens.Classifier, torch.Tensor, torch.Tensor, torch.Tensor]:
    classifier = camlens.load_model(model_dir)
    annotations = load_annotations(data / "annotations.csv")[:n]
    x = classifier.preprocess([a.image for a in annotations])
    return (classifier, *top_maps(classifier, x, 1))


def steps_table(
    sets: dict[str, dict[tuple[str, int], np.ndarray]], grid: tuple[int, ...]
) -> tuple[list[str], int | None]:
    names = list(sets)
    head = "| steps | forward passes per image and curve |"
    rule = "|---:|---:|"
    for name in names:
        for kind in KINDS:
            head += f" {name}: {kind} mean | max |"
            rule += "---:|---:|"
    lines = [head, rule]
    passing = []
    for s in grid:
        row = f"| {s} | {s + 1} |"
        ok = True
        for name in names:
            for kind in KINDS:
                diff = sets[name][kind, s]
                row += f" {diff.mean():.4f} | {diff.max():.4f} |"
                ok = ok and float(diff.max()) < TOLERANCE
        passing.append(ok)
        lines.append(row)
    row = f"| {REFERENCE_STEPS} (reference) | {REFERENCE_STEPS + 1} |"
    for name in names:
        for kind in KINDS:
            row += f" AUC {sets[name][kind, REFERENCE_STEPS].mean():.3f} | |"
    lines.append(row)
    chosen = None
    for i, s in enumerate(grid):
        if all(passing[i:]):
            chosen = s
            break
    return lines, chosen


# --- (b) time per image ------------------------------------------------------------------------


class ForwardCounter:
    """Forward hooks on the model: the batch size of every call, and the time spent inside."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.sizes: list[int] = []
        self.seconds = 0.0
        self._started: list[float] = []
        self.handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, module, inputs) -> None:
        self._started.append(time.perf_counter())

    def _post(self, module, inputs, output) -> None:
        self.sizes.append(int(inputs[0].shape[0]))
        self.seconds += time.perf_counter() - self._started.pop()

    def reset(self) -> None:
        self.sizes, self.seconds = [], 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def floor_seconds(module: torch.nn.Module, x: torch.Tensor, sizes: list[int]) -> float:
    """Plain forward passes of ``module`` in the batch sizes ``sizes`` (inputs cycled from
    ``x``)."""
    pool = x.repeat(-(-max(sizes) // len(x)), 1, 1, 1)
    started = time.perf_counter()
    with torch.inference_mode():
        for size in sizes:
            module(pool[:size])
    return time.perf_counter() - started


def time_evaluate(model_dir: Path, data: Path, n: int, repeats: int, work: Path) -> dict:
    classifier = camlens.load_model(model_dir)
    annotations = load_annotations(data / "annotations.csv")[:n]
    options = RunOptions(batch_size=16, progress=False, overwrite=True)

    def run() -> dict:
        return camlens.evaluate(classifier, annotations, out_dir=work / "eval", options=options)

    camlens.evaluate(classifier, annotations[:4], options=RunOptions(progress=False))  # warm-up
    counter = ForwardCounter(classifier.module)
    x = classifier.preprocess([a.image for a in annotations[:16]])
    floor_seconds(classifier.module, x, [16] * 4)  # warm-up
    runs, floors, inside = [], [], []
    for _ in range(repeats):
        counter.reset()
        started = time.perf_counter()
        summary = run()
        runs.append(time.perf_counter() - started)
        inside.append(counter.seconds)
        sizes = list(counter.sizes)
        counter.remove()
        floors.append(floor_seconds(classifier.module, x, sizes))
        counter = ForwardCounter(classifier.module)
    counter.remove()
    profile = cProfile.Profile()
    profile.enable()
    camlens.evaluate(classifier, annotations[:16], out_dir=work / "eval", options=options)
    profile.disable()
    timing = {
        "n": summary["n_images"],
        "steps": summary["settings"]["steps"],
        "methods": list(summary["methods"]),
        "metrics": summary["metrics"],
        "inputs": sum(sizes),
        "calls": len(sizes),
        "evaluate_s": min(runs),
        "floor_s": min(floors),
        "inside_s": min(inside),
        "all_runs": runs,
        "all_floors": floors,
        "profile": pstats.Stats(profile),
    }
    return timing


#: The phases of a run, as functions whose cumulative time cProfile reports.
PHASES = (
    ("maps (methods: forward, backward, hooks)", "base.py", "run"),
    ("localisation measurements (per image)", "evaluate.py", "_measure_image"),
    ("deletion and insertion curves", "registry.py", "measure_curve"),
    ("Average Drop / Increase / Gain scores", "registry.py", "measure_confidence"),
    ("preprocessing", "classifier.py", "preprocess"),
    ("records (JSON lines and maps)", "folder.py", "append"),
    ("fold (metrics.json's content)", "evaluate.py", "fold"),
    ("report.html and its figures", "evaluate.py", "write_evaluation_report"),
)


def phase_seconds(stats: pstats.Stats) -> tuple[float, list[tuple[str, float]]]:
    table = stats.stats  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for label, file, function in PHASES:
        seconds = sum(
            ct
            for (path, _, name), (_, _, _, ct, _) in table.items()
            if name == function and path.endswith(file) and "camlens" in path
        )
        rows.append((label, seconds))
    return total, rows


def timing_lines(timing: dict) -> list[str]:
    n = timing["n"]
    ratio = timing["evaluate_s"] / timing["floor_s"]
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    lines = [
        "| | s | s / image | x floor |",
        "|---|---:|---:|---:|",
        f"| `camlens.evaluate` (whole call) | {timing['evaluate_s']:.2f} | "
        f"{timing['evaluate_s'] / n:.3f} | {ratio:.3f} |",
        f"| its model forward passes (hooked, inside the run) | {timing['inside_s']:.2f} | "
        f"{timing['inside_s'] / n:.3f} | {timing['inside_s'] / timing['floor_s']:.3f} |",
        f"| floor: plain forward passes, same inputs and batch sizes | {timing['floor_s']:.2f} | "
        f"{timing['floor_s'] / n:.3f} | 1.000 |",
        "",
        f"{n} images, methods {', '.join(timing['methods'])}, {len(timing['metrics'])} metrics "
        f"(the defaults), {timing['steps']} deletion/insertion steps; the model saw "
        f"{timing['inputs']} inputs ({timing['inputs'] / n:.0f} per image) in "
        f"{timing['calls']} calls. Runs: evaluate "
        f"{', '.join(f'{s:.2f}' for s in timing['all_runs'])} s, floor "
        f"{', '.join(f'{s:.2f}' for s in timing['all_floors'])} s. Target evaluate <= "
        f"{TARGET_RATIO} x floor: **{verdict}** ({ratio:.3f} x).",
        "",
    ]
    total, phases = phase_seconds(timing["profile"])
    lines += [
        f"Where the time goes (one more run on 16 of the images under cProfile, {total:.2f} s "
        "with the profiler's overhead; the curves and the maps include their forward passes):",
        "",
        "| phase | s | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {s:.2f} | {100 * s / total:.1f} % |" for label, s in phases]
    lines.append("")
    return lines


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--part", choices=("all", "steps", "time"), default="all")
    parser.add_argument("--shapes", type=int, default=40, help="shapes curves for the table")
    parser.add_argument("--n-time", type=int, default=64, help="shapes images for the timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the shapes model")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward (a)")
    parser.add_argument("--shapes-model", type=Path, help="a trained model folder to reuse")
    parser.add_argument("--work", type=Path, help="keep data and the model here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = (10, 25, 50) if args.quick else STEPS_GRID
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        make_shapes_dataset(work / "test", ShapesConfig(n=240, size=64, seed=1), overwrite=True)
        model_dir = args.shapes_model or train_shapes(work, args.quick, args.epochs)
        lines = [
            "## `camlens evaluate`: deletion/insertion steps and time per image",
            "",
            f"{generated_by('evaluate_bench.py')} torch {torch.__version__}, "
            f"{args.threads} threads; load average {load_before:.1f} at the start.",
            "",
        ]
        if args.part in ("all", "steps"):
            started = time.perf_counter()
            sets = {
                "photos": auc_differences(*photo_set(args.quick), grid, args.batch_size),
                "shapes": auc_differences(
                    *shapes_set(model_dir, work / "test", 6 if args.quick else args.shapes),
                    grid,
                    args.batch_size,
                ),
            }
            table, chosen = steps_table(sets, grid)
            default = MetricSettings(metrics=[]).steps
            views = "top-1 and top-2 class, photos as they are and mirrored"
            views = "top-1 class" if args.quick else views
            n_curves = {name: len(d["deletion", REFERENCE_STEPS]) for name, d in sets.items()}
            lines += [
                f"### Steps: |AUC(steps) - AUC({REFERENCE_STEPS})| per curve, mean and max",
                "",
                f"Curves: photos {n_curves['photos']} (EfficientNet-Lite0, CAM of the "
                f"{views}), shapes {n_curves['shapes']} "
                "(`simple` trained on generated shapes, CAM of the top-1 class, held-out "
                "images). Deletion to zero, insertion from the blurred image, class "
                "probability (evaluate's defaults). A curve of `steps` steps costs `steps + 1` "
                "forward passes per image; deletion and insertion together twice that. "
                f"Measured in {time.perf_counter() - started:.0f} s.",
                "",
                *table,
                "",
                f"Smallest steps count of the grid whose maximum difference is below "
                f"{TOLERANCE} for deletion and insertion on both sets, and stays below it on "
                f"every larger count: **{chosen}**. camlens' default "
                f"(`MetricSettings.steps`, `--steps`): **{default}** "
                f"({'equal' if chosen == default else 'DIFFERENT'}).",
                "",
            ]
            print("\n".join(lines), flush=True)
        if args.part in ("all", "time"):
            timing = time_evaluate(
                model_dir, work / "test", 16 if args.quick else args.n_time,
                1 if args.quick else args.repeats, work,
            )  # fmt: skip
            timing["profile"].sort_stats("tottime").print_stats(25)
            lines += ["### Time per image against the floor of its forward passes", ""]
            lines += timing_lines(timing)
    write_section(lines, args.out)


if __name__ == "__main__":
    main()
