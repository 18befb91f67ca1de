"""Speed of camlens's map methods against a plain forward pass and against other libraries.

Times one batch (16 images at 224 px by default) on the built-in EfficientNet-Lite0 for:
plain forward, camlens CAM and Grad-CAM (raw maps), pytorch-grad-cam's GradCAM, torchcam's
GradCAM and CAM, and ``camlens.explain`` end to end (raw maps + upsampled ``maps``), both with a
method instance reused across calls and through the public call ``camlens.explain(model, x,
method="cam")``, which builds a new method per call (the head is found once per model:
``camlens.layers.cached_cam_head``).

Every contender is warmed up, then timed in R rounds; each round runs every contender once in
a freshly shuffled order (interleaved, so that drift of the machine hits all of them alike).
A call during which other processes used more than ``--max-foreign-load`` of the machine's
CPU capacity (from ``/proc/stat``) is repeated (``--tries``); a round that still has a
disturbed call is discarded and run again, up to ``--max-attempts`` rounds in all; before
each round it waits (``--max-wait`` seconds in all) for the machine to be quiet. The table
reports the median seconds per batch and ratios of medians, checked against the targets of
the issue::

    CAM      <= 1.05 x forward            (also camlens.explain(method="cam"))
    Grad-CAM <= 1.3  x forward            (also camlens.explain(method="gradcam"))
    Grad-CAM <= 0.5  x pytorch-grad-cam

Usage::

    .venv/bin/python benchmarks/run.py --out benchmarks/results/methods.md   # as make bench
    .venv/bin/python benchmarks/run.py --quick          # 2 rounds, no waiting: smoke test
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.io.samples import SAMPLES, sample_image
from camlens.methods import CAM, GradCAM

FORWARD = "forward (inference_mode)"
CAMLENS_CAM = "camlens CAM"
CAMLENS_GRADCAM = "camlens Grad-CAM"
PGC = "pytorch-grad-cam GradCAM"
PGC_BN1 = "pytorch-grad-cam GradCAM (`_bn1`)"
TC_GRADCAM = "torchcam GradCAM"
TC_CAM = "torchcam CAM"
EXPLAIN_CAM = 'camlens.explain(method="cam")'
EXPLAIN_GRADCAM = 'camlens.explain(method="gradcam")'
REFERENCE_MAPS = CAMLENS_GRADCAM


@dataclass(frozen=True)
class Target:
    """``contender`` must take at most ``limit`` times the time of ``reference``."""

    contender: str
    reference: str
    limit: float
    short: str


TARGETS = (
    Target(CAMLENS_CAM, FORWARD, 1.05, "forward"),
    Target(CAMLENS_GRADCAM, FORWARD, 1.3, "forward"),
    Target(CAMLENS_GRADCAM, PGC, 0.5, "pytorch-grad-cam"),
    # The public call, as users write it: a new method object per call.
    Target(EXPLAIN_CAM, FORWARD, 1.05, "forward"),
    Target(EXPLAIN_GRADCAM, FORWARD, 1.3, "forward"),
)


@dataclass
class Contender:
    """One thing to time: ``run()`` processes the benchmark batch once."""

    name: str
    run: Callable[[], Any] | None
    to_maps: Callable[[Any], torch.Tensor] | None = None
    note: str = ""
    after: Callable[[], None] | None = None  # untimed clean-up after each run
    error: str | None = None
    times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.run is not None and self.error is None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Round:
    """One timed round: seconds per contender, and how busy the rest of the machine was."""

    seconds: dict[str, float]
    foreign_load: float | None

    @property
    def load_text(self) -> str:
        return "unknown" if self.foreign_load is None else f"{100 * self.foreign_load:.0f} %"


@dataclass
class Measurement:
    """The rounds kept for the statistics, and how many were run to get them."""

    rounds: list[Round]
    attempts: int
    max_load: float
    waited: float = 0.0  # seconds spent waiting for the machine to become quiet

    @property
    def disturbed(self) -> list[Round]:
        """Kept rounds that exceeded the load limit (only when too few quiet ones came)."""
        return [r for r in self.rounds if (r.foreign_load or 0.0) > self.max_load]

    @property
    def mean_load(self) -> float | None:
        loads = [r.foreign_load for r in self.rounds if r.foreign_load is not None]
        return statistics.fmean(loads) if loads else None


# ---------------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds (default 25)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (16)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (224)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the round orders")
    parser.add_argument(
        "--max-foreign-load",
        type=float,
        default=0.1,
        help="repeat a call, then discard a round, when other processes used more than this "
        "share of the CPU capacity during it, plus the share of cores left free by --threads "
        "(default 0.1)",
    )
    parser.add_argument(
        "--tries",
        type=int,
        default=4,
        help="runs of one contender within a round while the machine is busy (default 4)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help="most timed rounds to run in all, discarded ones included (default 3 x rounds)",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=900.0,
        help="seconds to wait in all for a quiet machine before rounds (default 900)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 rounds, 1 warm-up, no reruns"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.max_attempts, args.tries, args.max_wait = 2, 1, 2, 1, 0
    if args.max_attempts is None:
        args.max_attempts = 3 * args.rounds
    if args.rounds < 1 or args.batch_size < 1 or args.size < 32:
        parser.error("--rounds and --batch-size must be >= 1, --size >= 32")
    if args.max_attempts < args.rounds or args.tries < 1:
        parser.error("--max-attempts must be at least --rounds, --tries at least 1")
    return args


def make_batch(model: camlens.Classifier, batch_size: int) -> torch.Tensor:
    """The bundled sample photographs, repeated to fill the batch, preprocessed."""
    photos = [sample_image(name) for name in SAMPLES]
    return model.preprocess([photos[i % len(photos)] for i in range(batch_size)])


def top1(module: nn.Module, x: torch.Tensor) -> list[int]:
    with torch.inference_mode():
        return module(x).argmax(dim=1).tolist()


class TappedEfficientNet(nn.Module):
    """The EfficientNet's own forward with its feature map exposed as ``tap`` (an Identity).

    The head's feature map is the *last* call of the ReLU6 ``_swish``, a module shared with the
    stem. pytorch-grad-cam hooks a module and uses the first activation it records, which for
    ``_swish`` is the stem's (112 x 112); an Identity after ``extract_features`` gives it the
    head's (7 x 7) map instead, with the same computation.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.tap = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.tap(self.net.extract_features(x))
        pooled = self.net._avg_pooling(features).flatten(1)
        return self.net._fc(self.net._dropout(pooled))


def guarded(name: str, build: Callable[[], Contender]) -> Contender:
    """Build a contender; a library that fails to set up is reported, not dropped."""
    try:
        return build()
    except Exception as exc:
        return Contender(name, None, error=f"{type(exc).__name__}: {exc}")


def first_target(maps: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) camlens maps -> (N, h, w) maps of the first target."""
    return maps[:, 0]


def camlens_contenders(model: camlens.Classifier, x: torch.Tensor) -> list[Contender]:
    module = model.module
    cam, gradcam = CAM(module), GradCAM(module)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    def explain(method: Any) -> torch.Tensor:
        return camlens.explain(model, x, method=method).maps

    return [
        Contender(FORWARD, forward, note="`module(x)` under `torch.inference_mode()`"),
        Contender(CAMLENS_CAM, lambda: cam(x, "top1"), first_target, "raw maps (N, 1, 7, 7)"),
        Contender(
            CAMLENS_GRADCAM, lambda: gradcam(x, "top1"), first_target, "raw maps (N, 1, 7, 7)"
        ),
        Contender(
            "camlens.explain CAM",
            lambda: explain(cam),
            first_target,
            "method instance reused; `.maps` (224 x 224, normalised)",
        ),
        Contender(
            "camlens.explain Grad-CAM",
            lambda: explain(gradcam),
            first_target,
            "method instance reused; `.maps` (224 x 224, normalised)",
        ),
        Contender(
            EXPLAIN_CAM,
            lambda: explain("cam"),
            first_target,
            "the public call: new method per call, head found once per model (cached); `.maps`",
        ),
        Contender(
            EXPLAIN_GRADCAM,
            lambda: explain("gradcam"),
            first_target,
            "the public call: new method per call, head found once per model (cached); `.maps`",
        ),
    ]


def pgc_contender(
    name: str,
    module: nn.Module,
    layer: Callable[[nn.Module], nn.Module],
    x: torch.Tensor,
    classes: list[int],
    note: str,
) -> Contender:
    """pytorch-grad-cam's GradCAM on a private copy of the network.

    It keeps its hooks attached while the object lives, so it gets its own copy: its hooks
    must not fire (and hoard activations) during the other contenders' forward passes.
    """
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    own = copy.deepcopy(module)
    method = PGCGradCAM(model=own, target_layers=[layer(own)])
    targets = [ClassifierOutputTarget(c) for c in classes]

    def release() -> None:
        # It keeps the last output and its autograd graph (retain_graph=True) until the next
        # call; dropping them between runs keeps that memory from burdening the others.
        method.outputs = None
        method.activations_and_grads.clear()
        own.zero_grad(set_to_none=True)

    return Contender(
        name,
        lambda: method(input_tensor=x, targets=targets),
        lambda maps: torch.from_numpy(maps),
        note,
        after=release,
    )


def torchcam_gradcam(module: nn.Module, x: torch.Tensor, layer: str) -> Contender:
    from torchcam.methods import GradCAM as TCGradCAM

    def run() -> torch.Tensor:
        with TCGradCAM(module, target_layer=layer) as extractor:
            scores = module(x)
            return extractor(class_idx=scores.argmax(dim=1).tolist(), scores=scores)[0]

    note = f"target `{layer}` (keeps its last call); hooks set up per call"
    return Contender(TC_GRADCAM, run, lambda maps: maps, note)


def torchcam_cam(module: nn.Module, x: torch.Tensor, layer: str) -> Contender:
    from torchcam.methods import CAM as TCCAM

    def run() -> torch.Tensor:
        with TCCAM(module, target_layer=layer, fc_layer="_fc") as extractor:
            with torch.inference_mode():
                scores = module(x)
            return extractor(class_idx=scores.argmax(dim=1).tolist())[0]

    note = f"target `{layer}`, fc `_fc`; forward under `inference_mode`"
    return Contender(TC_CAM, run, lambda maps: maps, note)


def build_contenders(model: camlens.Classifier, x: torch.Tensor) -> list[Contender]:
    module = model.module
    classes = top1(module, x)
    check_tapped(module, x)
    return [
        *camlens_contenders(model, x),
        guarded(
            PGC,
            lambda: pgc_contender(
                PGC,
                TappedEfficientNet(module),
                lambda net: net.tap,
                x,
                classes,
                "feature map = last `_swish` call (Identity tap); maps resized to 224",
            ),
        ),
        guarded(
            PGC_BN1,
            lambda: pgc_contender(
                PGC_BN1,
                module,
                lambda net: net._bn1,
                x,
                classes,
                "the head's BatchNorm before ReLU6: not the CAM feature map",
            ),
        ),
        guarded(TC_GRADCAM, lambda: torchcam_gradcam(module, x, "_swish")),
        guarded(TC_CAM, lambda: torchcam_cam(module, x, "_swish")),
    ]


def check_tapped(module: nn.Module, x: torch.Tensor) -> None:
    """The tapped wrapper must compute exactly what the model computes."""
    with torch.inference_mode():
        same = torch.allclose(TappedEfficientNet(module)(x[:2]), module(x[:2]))
    if not same:
        raise RuntimeError("TappedEfficientNet does not reproduce the model's logits")


# --------------------------------------------------------------------------------- timing


def call(contender: Contender) -> tuple[float, float | None]:
    """(seconds, foreign load) of one run; a failing contender is marked and skipped later."""
    gc.collect()
    before = cpu_snapshot()
    start = time.perf_counter()
    try:
        contender.run()
    except Exception as exc:
        contender.error = f"{type(exc).__name__}: {exc}"
        return float("nan"), None
    seconds = time.perf_counter() - start
    load = foreign_load(before, cpu_snapshot())
    if contender.after is not None:
        contender.after()
    return seconds, load


def quiet_call(contender: Contender, max_load: float, tries: int) -> tuple[float, float | None]:
    """One run, repeated (up to ``tries`` runs) while other processes disturb it.

    Returns the least disturbed run's seconds and foreign load.
    """
    best: tuple[float, float | None] = (float("nan"), None)
    for _ in range(tries):
        seconds, load = call(contender)
        if not contender.ok:
            return seconds, load
        if best[1] is None or (load is not None and load < best[1]):
            best = (seconds, load)
        if load is None or load <= max_load:
            break
    return best


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(machine busy seconds, machine total seconds, this process's CPU seconds), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    ticks = [int(f) for f in fields]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz, own.user + own.system


def foreign_load(before: tuple | None, after: tuple | None) -> float | None:
    """Share of the machine's CPU capacity that other processes used in between."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, busy - own) / total


def wait_for_quiet(limit: float, budget: float) -> float:
    """Sleep (in 1 s steps, at most ``budget`` seconds) until other processes use at most
    ``limit`` of the CPU capacity; return the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        before = cpu_snapshot()
        time.sleep(1.0)
        load = foreign_load(before, cpu_snapshot())
        if load is None or load <= limit:
            break
    return time.perf_counter() - start


def run_round(
    contenders: list[Contender], rng: random.Random, max_load: float, tries: int
) -> Round:
    """Every working contender once, in a random order; the round's load is the worst call's."""
    order = [c for c in contenders if c.ok]
    rng.shuffle(order)
    seconds, loads = {}, []
    for contender in order:
        t, load = quiet_call(contender, max_load, tries)
        if contender.ok:
            seconds[contender.name] = t
            loads.append(load)
    known = [load for load in loads if load is not None]
    return Round(seconds, max(known) if known else None)


def measure(contenders: list[Contender], args: argparse.Namespace) -> Measurement:
    """Warm-up rounds, then timed rounds until ``args.rounds`` quiet ones (or the attempt cap).

    When the cap is reached first, the least disturbed rounds fill the gap and the report says
    so. The kept rounds' times are stored on the contenders.
    """
    rng = random.Random(args.seed)
    for index in range(args.warmup):
        print(f"warm-up {index + 1}/{args.warmup}", flush=True)
        run_round(contenders, rng, args.load_limit, tries=1)
    quiet: list[Round] = []
    busy: list[Round] = []
    attempts, waited = 0, 0.0
    while len(quiet) < args.rounds and attempts < args.max_attempts:
        attempts += 1
        waited += wait_for_quiet(args.load_limit, args.max_wait - waited)
        result = run_round(contenders, rng, args.load_limit, args.tries)
        is_quiet = result.foreign_load is None or result.foreign_load <= args.load_limit
        (quiet if is_quiet else busy).append(result)
        verdict = "kept" if is_quiet else "discarded (machine busy)"
        print(f"round {attempts}: foreign load {result.load_text}, {verdict}", flush=True)
    busy.sort(key=lambda r: r.foreign_load or 0.0)
    kept = quiet + busy[: args.rounds - len(quiet)]
    for contender in contenders:
        contender.times = [r.seconds[contender.name] for r in kept if contender.name in r.seconds]
    return Measurement(kept, attempts, args.load_limit, waited)


# -------------------------------------------------------------------------------- results


def agreement(contenders: list[Contender], size: int) -> dict[str, float]:
    """Mean per-image Pearson correlation of each contender's maps with camlens Grad-CAM's.

    All maps are put through ReLU and bilinear resizing to ``size`` first, so that raw,
    normalised, 7 x 7 and 224 x 224 outputs are comparable.
    """

    def prepared(c: Contender) -> torch.Tensor:
        output = c.run()  # outside no_grad: the gradient methods need autograd
        with torch.no_grad():
            maps = torch.as_tensor(c.to_maps(output)).detach().float().relu()
            maps = F.interpolate(maps[:, None], size=(size, size), mode="bilinear")
            maps = maps.flatten(1)
        if c.after is not None:
            c.after()
        return maps - maps.mean(dim=1, keepdim=True)

    usable = [c for c in contenders if c.ok and c.to_maps is not None]
    reference = next(c for c in usable if c.name == REFERENCE_MAPS)
    ref = prepared(reference)
    scores = {}
    for c in usable:
        maps = prepared(c)
        corr = (maps * ref).sum(1) / (maps.norm(dim=1) * ref.norm(dim=1)).clamp_min(1e-12)
        scores[c.name] = float(corr.mean())
    return scores


def ratio(contenders: dict[str, Contender], name: str, reference: str) -> float | None:
    a, b = contenders.get(name), contenders.get(reference)
    if a is None or b is None or not (a.ok and b.ok and a.times and b.times):
        return None
    return a.median / b.median


def paired_ratio(rounds: list[Round], name: str, reference: str) -> float | None:
    """Median over rounds of the per-round ratio (the two ran in the same round)."""
    pairs = [
        r.seconds[name] / r.seconds[reference]
        for r in rounds
        if {name, reference} <= set(r.seconds)
    ]
    return statistics.median(pairs) if pairs else None


def target_cells(contenders: dict[str, Contender], name: str) -> tuple[str, str]:
    targets = [t for t in TARGETS if t.contender == name]
    if not targets:
        return "", ""
    wanted, verdicts = [], []
    for t in targets:
        wanted.append(f"≤ {t.limit:g} x {t.short}")
        value = ratio(contenders, t.contender, t.reference)
        verdicts.append("n/a" if value is None else ("PASS" if value <= t.limit else "MISS"))
    return "; ".join(wanted), "; ".join(f"**{v}**" for v in verdicts)


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def results_table(contenders: list[Contender]) -> str:
    by_name = {c.name: c for c in contenders}
    lines = [
        "| contender | median s/batch | x forward | x pytorch-grad-cam | target | status |",
        "|---|---:|---:|---:|---|---|",
    ]
    for c in contenders:
        if not c.ok or not c.times:
            lines.append(f"| {c.name} | failed | – | – | | `{c.error}` |")
            continue
        wanted, status = target_cells(by_name, c.name)
        lines.append(
            f"| {c.name} | {c.median:.3f} | {fmt(ratio(by_name, c.name, FORWARD))} "
            f"| {fmt(ratio(by_name, c.name, PGC))} | {wanted} | {status} |"
        )
    return "\n".join(lines)


def details_table(contenders: list[Contender], corr: dict[str, float]) -> str:
    lines = [
        "| contender | min–max s/batch | map corr. vs camlens Grad-CAM | notes |",
        "|---|---|---:|---|",
    ]
    for c in contenders:
        if not c.ok or not c.times:
            lines.append(f"| {c.name} | – | – | failed: `{c.error}` |")
            continue
        spread = f"{min(c.times):.3f}–{max(c.times):.3f}"
        lines.append(f"| {c.name} | {spread} | {fmt(corr.get(c.name), 3)} | {c.note} |")
    return "\n".join(lines)


def paired_lines(measurement: Measurement) -> str:
    lines = []
    for t in TARGETS:
        value = paired_ratio(measurement.rounds, t.contender, t.reference)
        lines.append(
            f"- {t.contender} / {t.reference}: {fmt(value)} (target ≤ {t.limit:g}; median of "
            "per-round ratios)"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("camlens", "grad-cam", "torchcam"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measurement_text(args: argparse.Namespace, measurement: Measurement) -> str:
    """How many rounds were run and kept, and how busy the machine was."""
    kept = len(measurement.rounds)
    load = fmt(None if measurement.mean_load is None else 100 * measurement.mean_load, 0)
    text = (
        f"{measurement.attempts} timed rounds run, {kept} kept, after waiting "
        f"{measurement.waited:.0f} s in all for a quiet machine; other processes used {load} % "
        f"of the CPU capacity during the kept rounds' most disturbed calls on average (limit "
        f"{100 * args.load_limit:.0f} %)"
    )
    if measurement.disturbed:
        text += (
            f". **Warning: {len(measurement.disturbed)} kept round(s) were disturbed by other "
            "processes (too few quiet rounds within --max-attempts): the numbers are unreliable; "
            "rerun on an idle machine.**"
        )
    return text


def report(
    args: argparse.Namespace,
    contenders: list[Contender],
    measurement: Measurement,
    corr: dict[str, float],
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["benchmarks/run.py", *sys.argv[1:]])
    return f"""# camlens benchmark

Generated on {now} by `{command}` (`make bench` runs it with the defaults).

- Machine: {cpu_model()}, {os.cpu_count()} logical cores, CPU only,
  `torch.set_num_threads({args.threads})`. Peak RSS of the run: {peak_rss_mib():.0f} MiB.
- Software: Python {platform.python_version()}, torch {torch.__version__}, {library_versions()}.
- Workload: built-in `efficientnet_lite0`, one batch of {args.batch_size} images at
  {args.size} x {args.size} px (the bundled sample photos, repeated, through
  `model.preprocess`), explaining the top-1 class.
- Method: {args.warmup} untimed warm-up rounds, then timed rounds; every round runs each
  contender once, in a new random order (seed {args.seed}). A call during which other
  processes used more than {100 * args.load_limit:.0f} % of the machine's CPU capacity
  (from `/proc/stat`) is repeated (up to {args.tries} runs); a round left with a disturbed
  call is discarded and run again. `median s/batch` is the median over the kept
  rounds of `time.perf_counter()` around one call; ratios are ratios of medians.
  {measurement_text(args, measurement)}.
- Plain forward is `model.module(x)` under `torch.inference_mode()` (camlens CAM runs its
  forward under `inference_mode` too; camlens Grad-CAM under `no_grad`, switching grad on at
  the captured layer).
- pytorch-grad-cam: `GradCAM(...)(input_tensor=x, targets=[ClassifierOutputTarget(c) ...])`
  with the top-1 classes computed beforehand. It cannot target the shared ReLU6 `_swish` on
  its last call (it records every call of the module and uses the first, the stem's), so the
  reference row wraps the same network with an `nn.Identity` after `extract_features` and
  targets that: the same feature map as camlens (map correlation 1.000 below). The `_bn1` row
  is the head's BatchNorm just before the ReLU6, the closest real module. Each gets its own
  copy of the network because its hooks stay attached between calls; the graph it retains
  (`retain_graph=True`) is released after each call, outside the timing. Its output is the
  maps resized to the input (cv2) and normalised.
- torchcam keeps the *last* call of a hooked module, so it targets `_swish` directly.

{results_table(contenders)}

Targets (issue): CAM ≤ 1.05 x forward, Grad-CAM ≤ 1.3 x forward, Grad-CAM ≤ 0.5 x
pytorch-grad-cam; the public calls `camlens.explain(model, x, method="cam")` and
`(method="gradcam")` (a new method object per call, `.maps` included) are held to the same
limits against forward. Paired check (per-round ratios, same rounds):

{paired_lines(measurement)}

## Details

Map correlation: mean per-image Pearson correlation with camlens Grad-CAM's maps after ReLU
and bilinear resizing to {args.size} px (1.000 = same map; CAM equals Grad-CAM up to scale on
this GAP + linear head).

{details_table(contenders, corr)}
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    args.threads = args.threads or cores
    torch.set_num_threads(args.threads)
    # Other processes may use the cores that the benchmark's threads leave free.
    args.load_limit = args.max_foreign_load + max(0, cores - args.threads) / cores
    model = camlens.load_model("efficientnet_lite0")
    model = replace(model, input_size=(args.size, args.size))
    x = make_batch(model, args.batch_size)
    contenders = build_contenders(model, x)
    measurement = measure(contenders, args)
    corr = agreement(contenders, args.size)
    print()
    print(results_table(contenders))
    print()
    print(paired_lines(measurement))
    print(f"\n{measurement_text(args, measurement)}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB, {args.threads} threads")
    if args.out is not None:
        args.out.write_text(report(args, contenders, measurement, corr), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
