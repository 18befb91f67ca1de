"""Measure which input normalisation matches the built-in EfficientNet-Lite0 weights.

For each candidate (mean, std), classify the sample photographs whose class is known
(chelsea: Egyptian cat 285, coffee: espresso 967) and report the probability of the right
class and the top-1. The candidate with the highest mean log-probability is the one the
weights were trained with; camlens uses it (``camlens.models.efficientnet_lite``).

Run: ``.venv/bin/python benchmarks/normalization.py``
"""

from __future__ import annotations

import math

import torch

import camlens
from camlens.io.samples import sample_image

KNOWN = {"chelsea": 285, "coffee": 967}
CANDIDATES = {
    "ImageNet mean/std": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "(x - 0.5) / 0.5": ((0.5,) * 3, (0.5,) * 3),
    "TF-Lite (x - 127) / 128": ((127 / 255,) * 3, (128 / 255,) * 3),
}


def main() -> None:
    model = camlens.load_model("efficientnet_lite0")
    images = [sample_image(name) for name in KNOWN]
    print(f"{'normalisation':26s} " + " ".join(f"p({n}) top1" for n in KNOWN) + "  mean log p")
    for name, (mean, std) in CANDIDATES.items():
        model.mean, model.std = mean, std
        with torch.inference_mode():
            probs = model.module(model.preprocess(images)).softmax(dim=1)
        cells, logp = [], 0.0
        for row, cls in enumerate(KNOWN.values()):
            p = float(probs[row, cls])
            logp += math.log(p) / len(KNOWN)
            cells.append(f"{p:.3f} {int(probs[row].argmax()):4d}")
        print(f"{name:26s} " + "   ".join(cells) + f"  {logp:.4f}")


if __name__ == "__main__":
    main()
