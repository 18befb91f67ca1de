"""Benchmark ``camlens train``: accuracy and time of ``simple``, images/s of every backbone.

Target of the issue: the ``simple`` backbone reaches >= 95 % validation accuracy on 600
generated 64 px images (``make_shapes_dataset``, three classes, no shortcut) in under two
minutes on 2 CPU cores. The script generates the data, trains ``simple`` with camlens'
defaults (40 epochs, batch 32, AdamW + cosine, augmentation on), checks the target, loads the
model back (``camlens.load_model``), checks that CAM is exact on it and scores its maps'
localisation on the validation images (``camlens.evaluate``: MaxBoxAcc, top-1 localisation at
Zhou's 20 % threshold, pointing game). Then it measures the training throughput of the
built-in EfficientNet-Lite0 at its 224 px input, with the backbone frozen (the default) and
fine-tuned.

Throughput is training images per second over the epochs after the first (each epoch's time
includes its validation pass); "train time" is the whole ``train_classifier`` call, image
decoding included. The process CPU time and the load average are printed too: the machine may
be shared, and CPU seconds / threads estimates the time on idle cores.

Usage::

    .venv/bin/python benchmarks/train_bench.py --out benchmarks/results/train.md
    .venv/bin/python benchmarks/train_bench.py --skip-effnet            # simple only (~1 min)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import camlens
from camlens.data.shapes import ShapesConfig, make_shapes_dataset
from camlens.io.annotations import load_annotations
from camlens.layers import find_cam_head
from camlens.training import TrainConfig, train_classifier

TARGET_ACCURACY = 0.95
TARGET_SECONDS = 120.0


class EpochClock:
    """Records when each epoch ends (``on_epoch_end``) to compute images per second."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def __call__(self, record: dict) -> None:
        self.ends.append(time.perf_counter())

    def images_per_second(self, n_train: int) -> float | None:
        if len(self.ends) < 2:
            return None
        return n_train * (len(self.ends) - 1) / (self.ends[-1] - self.ends[0])


def timed_training(data: Path, out: Path, config: TrainConfig) -> dict:
    clock = EpochClock()
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_classifier(data, out, config, overwrite=True, progress=False, on_epoch_end=clock)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    last = result.metrics["epochs"][-1]
    parameters = json.loads((out / "config.json").read_text())["training"]
    return {
        "epochs": parameters["epochs"],
        "image_size": parameters["image_size"],
        "config": config,
        "result": result,
        "seconds": wall,
        "cpu_seconds": cpu,
        "images_per_second": clock.images_per_second(result.n_train),
        "last_val_accuracy": last["val_accuracy"],
    }


def localisation(model_dir: Path, data_root: Path) -> dict:
    """CAM exactness and localisation scores of a trained model on its validation images."""
    model = camlens.load_model(model_dir)
    val = set(json.loads((model_dir / "split.json").read_text())["val"])
    annotations = [
        a
        for a in load_annotations(data_root / "annotations.csv")
        if "/".join(Path(a.image).parts[-2:]) in val
    ]
    batch = model.preprocess([a.image for a in annotations[:16]])
    exact = find_cam_head(model.module, batch).cam_exact
    identity = camlens.explain(model, batch).identity_error
    scores = camlens.evaluate(
        model, annotations, methods=["cam"], metrics="localization", image_root=data_root
    )["methods"]["cam"]
    return {"cam_exact": exact, "identity_error": identity, "n": len(annotations), **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 cores)")
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--effnet-epochs", type=int, default=2)
    parser.add_argument("--skip-effnet", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="keep data and models here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        started = time.perf_counter()
        make_shapes_dataset(
            work / "shapes",
            ShapesConfig(n=args.n, size=args.size, seed=args.seed),
            overwrite=True,
        )
        generation = time.perf_counter() - started
        data = work / "shapes" / "images"
        runs = {"simple": timed_training(data, work / "simple", TrainConfig(seed=args.seed))}
        scores = localisation(work / "simple", work / "shapes")
        if not args.skip_effnet:
            for mode, freeze in (("frozen", True), ("fine-tuned", False)):
                config = TrainConfig(
                    backbone="efficientnet_lite0",
                    epochs=args.effnet_epochs,
                    seed=args.seed,
                    freeze_backbone=freeze,
                )
                name = f"efficientnet_lite0 ({mode})"
                runs[name] = timed_training(data, work / f"efficientnet_{mode}", config)
    text = report(args, runs, scores, generation, load_before, os.getloadavg())
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


def report(args, runs: dict, scores: dict, generation: float, load_before, load_after) -> str:
    simple = runs["simple"]
    best = simple["result"].best_val_accuracy
    met = best >= TARGET_ACCURACY and simple["seconds"] < TARGET_SECONDS
    lines = [
        "## `camlens train`: accuracy, time and throughput",
        "",
        f"Measured with `benchmarks/train_bench.py` on {datetime.date.today()} "
        f"({os.cpu_count()} CPU cores visible, {args.threads} torch threads, torch "
        f"{torch.__version__}, {platform.machine()}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after). Data: {args.n} generated "
        f"{args.size} px shapes (circle, square, triangle; seed {args.seed}), 80/20 stratified "
        f"split; generated in {generation:.1f} s.",
        "",
        "| backbone | epochs | image size | train time | CPU time | train images/s | "
        "best val acc | last val acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        result = run["result"]
        speed = f"{run['images_per_second']:.0f}" if run["images_per_second"] else "n/a"
        lines.append(
            f"| {name} | {run['epochs']} | {run['image_size']} | "
            f"{run['seconds']:.1f} s | {run['cpu_seconds']:.1f} s | {speed} | "
            f"{100 * result.best_val_accuracy:.1f} % | {100 * run['last_val_accuracy']:.1f} % |"
        )
    verdict = "met" if met else "NOT met"
    lines += [
        "",
        f"Target (`simple` >= {100 * TARGET_ACCURACY:.0f} % validation accuracy in under "
        f"{TARGET_SECONDS:.0f} s): **{verdict}** ({100 * best:.1f} % in "
        f"{simple['seconds']:.1f} s; {simple['cpu_seconds'] / args.threads:.1f} s of CPU per "
        "thread).",
        "",
        f"The trained `simple` model, loaded back with `camlens.load_model`: CAM exact "
        f"{scores['cam_exact']}, identity error {scores['identity_error']:.1e}. Localisation of "
        f"its class maps on the {scores['n']} validation images (`camlens.evaluate`): MaxBoxAcc "
        f"{100 * scores['maxboxacc']:.1f} % (best threshold {scores['maxboxacc_threshold']:.2f}"
        f"), top-1 localisation at Zhou's 20 % threshold {100 * scores['top1_loc']:.1f} %, "
        f"pointing game {100 * scores['pointing_game']:.1f} %, energy-based pointing game "
        f"{100 * scores['energy_pointing_game']:.1f} %.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
