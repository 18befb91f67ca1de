"""Grad-CAM on a vision transformer: camlens against a plain forward pass and pytorch-grad-cam.

timm's ``vit_small_patch16_224`` (random weights, seeded), a batch of the sample photos at
224 px, the layer both libraries use for ViTs (the last block's ``norm1``), top-1 class:

* a plain forward pass under ``torch.inference_mode()``;
* ``camlens.explain(model, x, method="gradcam")``, the public call (token maps found
  automatically; the backward pass stops at the captured layer);
* pytorch-grad-cam's ``GradCAM`` with its documented ``reshape_transform`` (drop the class
  token, 14 x 14 grid), on a private copy of the network.

Interleaved rounds in a shuffled order (``benchmarks/run.py``'s machinery, which repeats a
call during which other processes used the CPU), medians. Targets of issue 14: camlens
<= 1.3 x the forward pass and <= 0.5 x pytorch-grad-cam; the maps' correlation is reported.

Usage::

    .venv/bin/python benchmarks/vit_bench.py --out benchmarks/results/vit.md
    .venv/bin/python benchmarks/vit_bench.py --quick
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import camlens
import run as bench
from methods_bench import measure, verdict
from section import generated_by, write_section

FORWARD = "forward (inference_mode)"
CAMLENS = "camlens.explain Grad-CAM"
PGC = "pytorch-grad-cam GradCAM"
FORWARD_LIMIT, PGC_LIMIT = 1.3, 0.5


def vit_batch(batch_size: int) -> tuple[camlens.Classifier, torch.Tensor]:
    torch.manual_seed(0)
    module = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    model = camlens.load_model(module)
    photos = bench.make_batch(camlens.load_model("efficientnet_lite0"), batch_size)
    return model, photos


def reshape_transform(tensor: torch.Tensor, height: int = 14, width: int = 14) -> torch.Tensor:
    """pytorch-grad-cam's ViT tutorial transform: drop the class token, tokens to a grid."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.permute(0, 3, 1, 2)


def contenders(model: camlens.Classifier, x: torch.Tensor) -> list[bench.Contender]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = model.module
    classes = bench.top1(module, x)
    own = copy.deepcopy(module)
    theirs = GradCAM(own, [own.blocks[-1].norm1], reshape_transform=reshape_transform)
    targets = [ClassifierOutputTarget(c) for c in classes]

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    def release() -> None:
        theirs.outputs = None
        theirs.activations_and_grads.clear()
        own.zero_grad(set_to_none=True)

    return [
        bench.Contender(FORWARD, forward),
        bench.Contender(CAMLENS, lambda: camlens.explain(model, x, method="gradcam").maps),
        bench.Contender(PGC, lambda: theirs(input_tensor=x, targets=targets), after=release),
    ]


def correlation(model: camlens.Classifier, x: torch.Tensor, pgc: bench.Contender) -> float:
    """Mean per-image Pearson correlation of the two libraries' maps at 224 px."""
    ours = camlens.explain(model, x, method="gradcam").maps[:, 0]
    theirs = torch.from_numpy(pgc.run())
    pgc.after()
    ours = F.interpolate(ours[:, None], size=theirs.shape[-2:], mode="bilinear")[:, 0]
    a = ours.flatten(1) - ours.flatten(1).mean(1, keepdim=True)
    b = theirs.flatten(1) - theirs.flatten(1).mean(1, keepdim=True)
    return float((F.cosine_similarity(a, b, dim=1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    parser.add_argument("--quick", action="store_true", help="batch 2, 1 round: a smoke run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.rounds = 2, 1
    torch.set_num_threads(args.threads)
    model, x = vit_batch(args.batch_size)
    runs = contenders(model, x)
    measure(runs, args.rounds, 1, 0)
    by_name = {c.name: c for c in runs}
    forward, ours, theirs = (by_name[n].median for n in (FORWARD, CAMLENS, PGC))
    corr = correlation(model, x, by_name[PGC])
    lines = [
        "## Grad-CAM on a vision transformer (issue 14)",
        "",
        generated_by("vit_bench.py")
        + f" timm `vit_small_patch16_224` (random weights), batch {args.batch_size} at 224 "
        f"px, layer `blocks.11.norm1`, top-1 class, {args.threads} torch threads; medians of "
        f"{args.rounds} interleaved rounds.",
        "",
        "| contender | median s | x forward |",
        "|---|---:|---:|",
        *(f"| {name} | {by_name[name].median:.3f} | {by_name[name].median / forward:.2f} |"
          for name in (FORWARD, CAMLENS, PGC)),
        "",
        "| ratio | value | target | verdict |",
        "|---|---:|---:|---|",
        f"| camlens / forward | {ours / forward:.2f} | <= {FORWARD_LIMIT} | "
        f"{verdict(ours / forward, FORWARD_LIMIT)} |",
        f"| camlens / pytorch-grad-cam | {ours / theirs:.2f} | <= {PGC_LIMIT} | "
        f"{verdict(ours / theirs, PGC_LIMIT)} |",
        "",
        f"Map correlation (mean per-image Pearson at 224 px): {corr:.4f}. camlens's backward "
        "pass stops at the captured layer (the last block), pytorch-grad-cam's runs through "
        "the whole network.",
    ]  # fmt: skip
    write_section(lines, args.out)


if __name__ == "__main__":
    main()
