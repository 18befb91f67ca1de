"""Benchmark ``camlens audit``: does it find planted shortcuts, and what does it cost?

Part 1, detection. For every seed and every planted shortcut (corner tag in each corner,
stripe along the top and the bottom edge, and two markers at random places: the token, an
"L", and the coin, a ring) and a clean control, the
script generates a shapes data set (``make_shapes_dataset``), trains a ``simple`` CAM model
on it (``train_classifier``) and audits the model (with the data set's annotations). A
confirmed flag is a true positive when it names the shortcut's class and its box overlaps the
planted region; every other confirmed flag is a false positive. Independently of the audit,
an oracle pastes the *true* shortcut at its true place onto the other classes' images: when
that flips at least half of them, the model really uses the shortcut, and missing it counts
against recall. A moving marker is found when a confirmed ``moving-pattern`` flag names its
class; its listed locations are scored against the planted marker boxes (the share of them
that overlap the marker on their image).

Part 2, cost. The time and memory of auditing 2,000 images (64 x 64 px, a model trained on a
separate smaller set) against 500 and 4,000: the resident set size of a fresh process before
the audit and its peak during it. The peak must not grow with the number of images.

Usage::

    python benchmarks/audit_bench.py --out benchmarks/results/audit.md   # as make bench
    python benchmarks/audit_bench.py --rates 0.5/0.1 --skip-cost   # only the harder setting
    python benchmarks/audit_bench.py --seeds 0 --quick --skip-cost --rates 0.9/0   # smoke run
    python benchmarks/audit_bench.py --cases moving --rates 0.9/0 --skip-cost \
        --out benchmarks/results/audit_moving.md   # the moving markers and the clean controls
    python benchmarks/audit_bench.py --cases fixed --rates 0.9/0 --skip-cost \
        --out benchmarks/results/audit_fixed.md   # the fixed-place shortcuts only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PLACEMENTS = [
    ("corner-tag", "top-left"),
    ("corner-tag", "top-right"),
    ("corner-tag", "bottom-left"),
    ("corner-tag", "bottom-right"),
    ("stripe", "top-left"),
    ("stripe", "bottom-left"),
    ("token", "top-left"),
    ("coin", "top-left"),
    (None, "top-left"),
]
SHORTCUT_CLASS = "square"
MOVING = ("token", "coin")
CASES = {
    "all": lambda kind, position: True,
    "quick": lambda kind, position: kind in ("corner-tag", None),
    "moving": lambda kind, position: kind in (*MOVING, None),
    "fixed": lambda kind, position: kind in ("corner-tag", "stripe"),
}


@dataclass
class Run:
    kind: str | None
    position: str
    seed: int
    val_accuracy: float
    oracle_flip: float | None
    true_positive: int
    false_positive: int
    n_candidates: int
    best: dict | None
    planted: list[float] | None
    audit_seconds: float
    true_positive_plain: int = 0
    false_positive_plain: int = 0
    locations: int = 0
    locations_on_marker: int = 0


def planted_region(info: dict, size: int) -> tuple[list[float] | None, list[list[float]]]:
    """The shortcut's place as a fraction box (None for the token, which moves), and every
    planted box."""
    boxes = [[v / size for v in r["shortcut_box"]] for r in info["images"] if r["shortcut"]]
    if not boxes or info["shortcut"]["kind"] in MOVING:
        return None, boxes
    return boxes[0], boxes


def overlaps(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def oracle_flip_rate(classifier, root: Path, info: dict, kind: str, position: str) -> float:
    """Share of other-class images predicted as the shortcut class after pasting the true
    shortcut at its true place (the token and the coin: in the top-left corner)."""
    from camlens.data.shapes import corner_box, shortcut_patch, stripe_box, stripe_patch, tag_side
    from camlens.io.imagefolder import load_images
    from camlens.shortcuts.confirm import predict_probs

    size = info["parameters"]["size"]
    others = [r for r in info["images"] if r["label"] != SHORTCUT_CLASS][:150]
    loaded = load_images([root / r["image"] for r in others], [0] * len(others), (size, size))
    images = loaded.images.clone()
    if kind == "stripe":
        x0, y0, x1, y1 = stripe_box(size, position.split("-")[0])
        patch = stripe_patch(x1 - x0, y1 - y0)
    else:
        x0, y0, x1, y1 = corner_box(size, position if kind == "corner-tag" else "top-left")
        patch = shortcut_patch(kind, tag_side(size))
    images[:, :, y0:y1, x0:x1] = torch.from_numpy(patch).permute(2, 0, 1)
    cls = classifier.labels.index(SHORTCUT_CLASS)
    before = predict_probs(classifier, loaded.images).argmax(dim=1)
    after = predict_probs(classifier, images).argmax(dim=1)
    eligible = before != cls
    return float((after[eligible] == cls).float().mean()) if eligible.any() else 0.0


def detection_run(
    work: Path,
    kind: str | None,
    position: str,
    seed: int,
    n: int,
    size: int,
    epochs: int,
    rates: tuple[float, float] = (0.9, 0.0),
) -> Run:
    import camlens
    from camlens.data.shapes import ShapesConfig, make_shapes_dataset
    from camlens.training import TrainConfig, train_classifier

    root = work / f"{kind}-{position}-{seed}-{rates[0]}-{rates[1]}"
    config = ShapesConfig(
        n=n,
        size=size,
        seed=seed,
        shortcut=kind,
        shortcut_class=SHORTCUT_CLASS if kind else None,
        shortcut_position=position,
        shortcut_rate=rates[0],
        shortcut_other_rate=rates[1],
    )
    info = make_shapes_dataset(root / "data", config)
    trained = train_classifier(
        root / "data" / "images",
        root / "model",
        TrainConfig(epochs=epochs, image_size=size, seed=seed),
        progress=False,
    )
    started = time.perf_counter()
    quiet = camlens.RunOptions(progress=False)
    result = camlens.audit(
        root / "model",
        root / "data" / "images",
        root / "audit",
        annotations=root / "data" / "annotations.csv",
        seed=seed,
        options=quiet,
    )
    seconds = time.perf_counter() - started
    plain = camlens.audit(
        root / "model", root / "data" / "images", None, seed=seed, report=False, options=quiet
    )
    place, boxes = planted_region(info, size) if kind else (None, [])

    def score(flags: list[dict]) -> tuple[list[dict], int, int]:
        confirmed = [f for f in flags if f["confirmed"]]
        hits = [
            f
            for f in confirmed
            if f["class"] == SHORTCUT_CLASS
            and (overlaps(f["box"], place) if place else any(overlaps(f["box"], b) for b in boxes))
        ]
        return confirmed, min(len(hits), 1), len(confirmed) - min(len(hits), 1)

    confirmed, true_positive, false_positive = score(result["flags"])
    _, true_positive_plain, false_positive_plain = score(plain["flags"])
    n_locations, on_marker = location_hits(result["flags"], root / "data", info, size)
    classifier = camlens.load_model(root / "model")
    oracle = oracle_flip_rate(classifier, root / "data", info, kind, position) if kind else None
    best = confirmed[0] if confirmed else (result["flags"][0] if result["flags"] else None)
    return Run(
        kind,
        position,
        seed,
        trained.best_val_accuracy or 0.0,
        oracle,
        true_positive,
        false_positive,
        len(result["flags"]),
        best,
        place,
        seconds,
        true_positive_plain,
        false_positive_plain,
        n_locations,
        on_marker,
    )


def location_hits(flags: list[dict], root: Path, info: dict, size: int) -> tuple[int, int]:
    """Locations listed by the confirmed moving-pattern flags of the shortcut class, and how
    many of them overlap the marker planted on their image."""
    planted = {
        str((root / r["image"]).resolve()): [v / size for v in r["shortcut_box"]]
        for r in info["images"]
        if r["shortcut"]
    }
    listed = [
        location
        for f in flags
        if f["confirmed"] and f["kind"] == "moving-pattern" and f["class"] == SHORTCUT_CLASS
        for location in f["locations"]
    ]
    hits = 0
    for location in listed:
        marker = planted.get(str(Path(location["image"]).resolve()))
        hits += marker is not None and overlaps(location["box"], marker)
    return len(listed), hits


def detection_table(runs: list[Run]) -> list[str]:
    lines = [
        "| shortcut | place | seed | val acc | oracle flip | confirmed (TP/FP) | candidates | "
        "flagged box | planted box | flip / random | drop / random | locations on marker | "
        "audit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        best = run.best or {}

        def fmt(value, digits=2):
            return "-" if value is None else f"{value:.{digits}f}"

        box = ", ".join(f"{v:.2f}" for v in best["box"]) if best else "-"
        planted = ", ".join(f"{v:.2f}" for v in run.planted) if run.planted else "moves"
        lines.append(
            f"| {run.kind or 'none (clean)'} | {run.position if run.kind else '-'} | {run.seed} "
            f"| {run.val_accuracy:.2f} | {fmt(run.oracle_flip)} "
            f"| {run.true_positive}/{run.false_positive} | {run.n_candidates} | {box} "
            f"| {planted if run.kind else '-'} "
            f"| {fmt(best.get('flip_rate'))} / {fmt(best.get('baseline_flip_rate'))} "
            f"| {fmt(best.get('confidence_drop'))} / {fmt(best.get('baseline_confidence_drop'))} "
            f"| {f'{run.locations_on_marker}/{run.locations}' if run.locations else '-'} "
            f"| {run.audit_seconds:.1f} |"
        )
    return lines


def precision_recall(runs: list[Run]) -> list[str]:
    tp = sum(r.true_positive for r in runs)
    fp = sum(r.false_positive for r in runs)
    fixed = [r for r in runs if r.kind in ("corner-tag", "stripe")]
    used = [r for r in fixed if r.oracle_flip is not None and r.oracle_flip >= 0.5]
    tokens = [r for r in runs if r.kind in MOVING]
    clean = [r for r in runs if r.kind is None]
    listed = sum(r.locations for r in tokens)
    on_marker = sum(r.locations_on_marker for r in tokens)
    lines = [
        f"- precision of confirmed flags: {tp}/{tp + fp}"
        + (f" = {tp / (tp + fp):.2f}" if tp + fp else " (no confirmed flag)"),
        f"- recall, fixed-place shortcuts (corner tag, stripe): "
        f"{sum(r.true_positive for r in fixed)}/{len(fixed)}"
        + (f" = {sum(r.true_positive for r in fixed) / len(fixed):.2f}" if fixed else ""),
        f"- recall among those the model really uses (oracle flip >= 0.5): "
        f"{sum(r.true_positive for r in used)}/{len(used)}"
        + (f" = {sum(r.true_positive for r in used) / len(used):.2f}" if used else ""),
        f"- markers at random places (token, coin; found by the moving-pattern search): "
        f"{sum(r.true_positive for r in tokens)}/{len(tokens)} found, "
        f"{on_marker}/{listed} listed locations on the planted marker"
        + (f" ({on_marker / listed:.0%})" if listed else "")
        + ", oracle flip "
        + ", ".join(f"{r.oracle_flip:.2f}" for r in tokens),
        f"- clean controls: {sum(r.false_positive for r in clean)} confirmed flags in "
        f"{len(clean)} runs ({sum(r.n_candidates for r in clean)} unconfirmed candidates)",
        f"- the same audits without annotations: precision "
        f"{sum(r.true_positive_plain for r in runs)}/"
        f"{sum(r.true_positive_plain + r.false_positive_plain for r in runs)}, recall (fixed "
        f"places) {sum(r.true_positive_plain for r in fixed)}/{len(fixed)}, confirmed flags on "
        f"clean data {sum(r.false_positive_plain for r in clean)}",
    ]
    return lines


# --- cost ------------------------------------------------------------------------------------

_CHILD = """
import json, sys, time
import torch
import camlens

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

torch.set_num_threads(int(sys.argv[6]))
model = camlens.load_model(sys.argv[1])
audit = camlens.audit  # imported here, not in the timed audit
loaded = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset the peak (VmHWM) to the current size
start = time.perf_counter()
result = audit(model, sys.argv[2], sys.argv[3], max_images=int(sys.argv[4]),
               options=camlens.RunOptions(batch_size=32, engine=sys.argv[5], progress=False))
print(json.dumps({"seconds": time.perf_counter() - start, "n_images": result["n_images"],
                  "base_kb": loaded, "peak_kb": status("VmHWM"),
                  "confirmed": [(f["class"], f["box"]) for f in result["flags"] if f["confirmed"]],
                  "threads": torch.get_num_threads()}))
"""


def cost(work: Path, sizes: list[int], image_size: int, engine: str, threads: int) -> list[str]:
    from camlens.data.shapes import ShapesConfig, make_shapes_dataset
    from camlens.training import TrainConfig, train_classifier

    big = max(sizes)
    make_shapes_dataset(
        work / "big",
        ShapesConfig(n=big, size=image_size, seed=11, shortcut="corner-tag",
                     shortcut_class=SHORTCUT_CLASS, shortcut_position="bottom-left"),
    )  # fmt: skip
    make_shapes_dataset(
        work / "train",
        ShapesConfig(n=450, size=image_size, seed=12, shortcut="corner-tag",
                     shortcut_class=SHORTCUT_CLASS, shortcut_position="bottom-left"),
    )  # fmt: skip
    train_classifier(
        work / "train" / "images",
        work / "model",
        TrainConfig(epochs=6, image_size=image_size, seed=0),
        progress=False,
    )
    lines = [
        "| images | engine | seconds | images/s | RSS before the audit MB | peak RSS during it MB "
        "| confirmed |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        out = work / f"cost-{n}-{engine}"
        process = subprocess.run(
            [sys.executable, "-c", _CHILD, str(work / "model"), str(work / "big" / "images"),
             str(out), str(n), engine, str(threads)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        numbers = json.loads(process.stdout.strip().splitlines()[-1])
        lines.append(
            f"| {numbers['n_images']} | {engine} | {numbers['seconds']:.1f} "
            f"| {numbers['n_images'] / numbers['seconds']:.0f} | {numbers['base_kb'] / 1024:.0f} "
            f"| {numbers['peak_kb'] / 1024:.0f} | {numbers['confirmed']} |"
        )
    return lines


def detection_section(
    work: Path, args: argparse.Namespace, seeds: list[int], placements: list, rate: tuple
) -> list[str]:
    """Train, plant and audit every placement and seed at one shortcut ``rate`` setting."""
    runs = []
    for seed in seeds:
        for kind, position in placements:
            run = detection_run(work, kind, position, seed, args.n, args.size, args.epochs, rate)
            print(
                f"{kind} {position} seed {seed} rates {rate}: TP {run.true_positive} FP "
                f"{run.false_positive} oracle {run.oracle_flip}",
                file=sys.stderr,
                flush=True,
            )
            runs.append(run)
    return [
        f"### Shortcut on {rate[0]:.0%} of class {SHORTCUT_CLASS!r} and {rate[1]:.0%} of the "
        "others",
        "",
        f"Detection: {len(seeds)} seeds x {len(placements)} data sets of {args.n} images "
        f"({args.size} px, 3 classes), a `simple` model trained {args.epochs} epochs on each, "
        "audited with annotations and default settings.",
        "",
        *precision_recall(runs),
        "",
        *detection_table(runs),
        "",
    ]


def select_cases(cases: str) -> list[tuple[str | None, str]]:
    """The placements named by ``--cases``."""
    if cases in CASES:
        return [p for p in PLACEMENTS if CASES[cases](*p)]
    chosen = []
    for item in cases.split(","):
        kind, _, position = item.strip().partition("@")
        kind_or_none = None if kind == "none" else kind
        chosen += [
            p for p in PLACEMENTS if p[0] == kind_or_none and (not position or p[1] == position)
        ]
    if not chosen:
        raise SystemExit(f"--cases {cases!r} names no case; see --help")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
    parser.add_argument("--n", type=int, default=300, help="Images per detection data set.")
    parser.add_argument("--size", type=int, default=32, help="Image side for detection runs.")
    parser.add_argument("--epochs", type=int, default=12, help="Training epochs per run.")
    parser.add_argument(
        "--rates",
        default="0.9/0,0.5/0.1",
        help="Comma-separated settings RATE/OTHER: the shortcut's share in its class and in "
        "the other classes (default: 90 %% of one class; 50 %% of it and 10 %% of the others).",
    )
    parser.add_argument("--quick", action="store_true", help="Corner tags and clean only.")
    parser.add_argument(
        "--cases",
        default="all",
        help="Which planted shortcuts: all, quick (corner tags and clean), moving (token, coin "
        "and clean), fixed (corner tags, stripes), or comma-separated kinds (corner-tag, "
        "stripe, token, coin, none), optionally KIND@POSITION.",
    )
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-detection", action="store_true")
    parser.add_argument("--cost-images", default="500,2000,4000")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (detection).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the markdown here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    placements = select_cases("quick" if args.quick else args.cases)
    rates = [tuple(float(v) for v in item.split("/")) for item in args.rates.split(",")]
    lines = ["## camlens audit: planted shortcuts and cost", ""]
    with tempfile.TemporaryDirectory(prefix="camlens-audit-bench-") as tmp:
        work = Path(tmp)
        for rate in [] if args.skip_detection else rates:
            lines += detection_section(work, args, seeds, placements, rate)
        if not args.skip_cost:
            sizes = [int(s) for s in args.cost_images.split(",")]
            lines += [
                "Cost: auditing shapes images of 64 x 64 px (corner tag planted) in a fresh "
                f"process, {args.threads} torch thread(s), batch 32, report included. Memory: "
                "resident set size of the process after loading torch, camlens and the model, "
                "and its peak during the audit (Linux VmHWM, reset before the audit).",
                "",
                *cost(work, sizes, 64, "local", args.threads),
                "",
            ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
