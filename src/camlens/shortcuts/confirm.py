"""Confirm: does the model really depend on a hotspot? Two counterfactual tests.

Both tests work on images resized to the model's input size (what the model sees) and compare
with a baseline that changes a region of the same size *elsewhere*, so that "any change of
that many pixels" does not pass for a shortcut.

* **Paste** (is the region sufficient?). The hotspot's region of class-A images (donors) is
  pasted at the same place onto images of the other classes (recipients) that the model does
  not already call A. ``flip_rate`` = share of recipients now predicted A. Baseline: for the
  same pairs, a random region of the same size from the same donor (not overlapping the
  hotspot), pasted at the same place. Significance: exact one-sided McNemar test on the paired
  outcomes (``scipy.stats.binomtest`` on the pairs where only one of the two pastes flipped).
* **Erase** (is the region necessary?). On class-A images the region is blurred away (or
  filled with the image's mean colour). ``confidence_drop`` = mean decrease of the
  probability of A. Baseline: the same on a random region of the same size (not overlapping
  the hotspot) of the same image. Significance: one-sided sign test on the paired differences.

The rule (``ConfirmRule``): a hotspot is ``confirmed`` when at least one test is significant
at ``alpha`` divided by the number of tests run in the audit (Bonferroni) *and* its effect
over the baseline is large: ``flip_rate - baseline_flip_rate >= min_flip_gain`` or
``confidence_drop - baseline_drop >= min_drop_gain``. A test with fewer than ``min_pairs``
usable pairs cannot confirm anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from camlens.errors import ConfigError
from camlens.hooks import preserved_state
from camlens.metrics.faithfulness import gaussian_blur
from camlens.models import Classifier
from camlens.models.outputs import select_logits

__all__ = [
    "ConfirmRule",
    "Confirmation",
    "EraseTest",
    "PasteTest",
    "confirm_hotspot",
    "decide",
    "erase_regions",
    "erase_test",
    "flip_outcomes",
    "mcnemar_greater",
    "paste_regions",
    "paste_test",
    "pixel_box",
    "predict_probs",
    "random_boxes",
    "sign_test_greater",
]

BoxF = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]
ERASE_MODES = ("blur", "mean")


@dataclass(frozen=True)
class ConfirmRule:
    """When a hotspot counts as confirmed (see the module docstring).

    Attributes:
        alpha: family-wise significance level, split over all tests of the audit.
        min_flip_gain: smallest ``flip_rate - baseline_flip_rate``.
        min_drop_gain: smallest ``confidence_drop - baseline_drop``.
        min_pairs: fewest pairs (paste) or images (erase) a test needs.
    """

    alpha: float = 0.01
    min_flip_gain: float = 0.25
    min_drop_gain: float = 0.15
    min_pairs: int = 10


@dataclass
class PasteTest:
    """Outcome of pasting a region onto other classes' images (see ``paste_test``)."""

    n: int
    flips: int
    baseline_flips: int
    p_value: float
    examples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def flip_rate(self) -> float:
        return self.flips / self.n if self.n else 0.0

    @property
    def baseline_flip_rate(self) -> float:
        return self.baseline_flips / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "flips": self.flips,
            "baseline_flips": self.baseline_flips,
            "flip_rate": round(self.flip_rate, 4),
            "baseline_flip_rate": round(self.baseline_flip_rate, 4),
            "p_value": float(f"{self.p_value:.3g}"),
        }


@dataclass
class EraseTest:
    """Outcome of erasing a region on the class's own images (see ``erase_test``)."""

    n: int
    prob: float
    prob_erased: float
    prob_baseline: float
    p_value: float
    examples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def confidence_drop(self) -> float:
        return self.prob - self.prob_erased

    @property
    def baseline_drop(self) -> float:
        return self.prob - self.prob_baseline

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "prob": round(self.prob, 4),
            "prob_erased": round(self.prob_erased, 4),
            "prob_baseline": round(self.prob_baseline, 4),
            "confidence_drop": round(self.confidence_drop, 4),
            "baseline_drop": round(self.baseline_drop, 4),
            "p_value": float(f"{self.p_value:.3g}"),
        }


@dataclass
class Confirmation:
    """Both tests of one hotspot and the verdict."""

    paste: PasteTest
    erase: EraseTest
    paste_confirms: bool
    erase_confirms: bool
    alpha: float

    @property
    def confirmed(self) -> bool:
        return self.paste_confirms or self.erase_confirms

    def to_dict(self) -> dict[str, Any]:
        return {
            "paste": self.paste.to_dict(),
            "erase": self.erase.to_dict(),
            "paste_confirms": self.paste_confirms,
            "erase_confirms": self.erase_confirms,
            "alpha": float(f"{self.alpha:.3g}"),
        }


def pixel_box(box: BoxF, height: int, width: int) -> PixelBox:
    """A box in fractions of the image -> pixels (outward rounding, at least 1 x 1).

    Example:
        >>> pixel_box((0.0, 0.0, 0.25, 0.1), 32, 32)
        (0, 0, 8, 4)
    """
    x0, y0 = math.floor(box[0] * width + 1e-9), math.floor(box[1] * height + 1e-9)
    x1, y1 = math.ceil(box[2] * width - 1e-9), math.ceil(box[3] * height - 1e-9)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return (x0, y0, min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height))


def random_boxes(
    rng: np.random.Generator,
    n: int,
    like: PixelBox,
    height: int,
    width: int,
    *,
    tries: int = 100,
) -> list[PixelBox]:
    """``n`` boxes of the size of ``like`` at uniform random places that do not overlap it
    (when the image leaves room; otherwise anywhere).

    Example:
        >>> boxes = random_boxes(np.random.default_rng(0), 2, (0, 0, 4, 4), 16, 16)
        >>> all(b[2] - b[0] == 4 and (b[0] >= 4 or b[1] >= 4) for b in boxes)
        True
    """
    box_w, box_h = like[2] - like[0], like[3] - like[1]
    boxes = []
    for _ in range(n):
        for _ in range(tries):
            x0 = int(rng.integers(0, width - box_w + 1))
            y0 = int(rng.integers(0, height - box_h + 1))
            candidate = (x0, y0, x0 + box_w, y0 + box_h)
            if not _overlap(candidate, like):
                break
        boxes.append(candidate)
    return boxes


def paste_regions(
    recipients: torch.Tensor,
    donors: torch.Tensor,
    destination: PixelBox,
    sources: list[PixelBox] | None = None,
) -> torch.Tensor:
    """Copy a region of ``donors[i]`` into ``recipients[i]`` at ``destination``.

    Parameters:
        recipients, donors: (N, C, H, W) images of the same size.
        destination: where the region goes.
        sources: where it is taken from in each donor (default: ``destination``); each box
            has the size of ``destination``.

    Returns:
        A new (N, C, H, W) tensor.

    Example:
        >>> r, d = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
        >>> paste_regions(r, d, (1, 0, 2, 1))[0, 0].tolist()
        [[0.0, 1.0], [0.0, 0.0]]
    """
    out = recipients.clone()
    x0, y0, x1, y1 = destination
    for i in range(len(out)):
        sx0, sy0, sx1, sy1 = sources[i] if sources is not None else destination
        out[i, :, y0:y1, x0:x1] = donors[i, :, sy0:sy1, sx0:sx1]
    return out


def erase_regions(images: torch.Tensor, boxes: list[PixelBox], mode: str = "blur") -> torch.Tensor:
    """Erase ``boxes[i]`` in ``images[i]``: ``"blur"`` replaces it by a strongly blurred copy
    of the image (Gaussian, sigma = 1/8 of the image side: the region takes the colours of its
    surroundings), ``"mean"`` fills it with the image's mean colour.

    Example:
        >>> img = torch.tensor([[[[0.0, 4.0], [0.0, 0.0]]]])
        >>> erase_regions(img, [(1, 0, 2, 1)], "mean")[0, 0].tolist()
        [[0.0, 1.0], [0.0, 0.0]]
    """
    if mode not in ERASE_MODES:
        raise ConfigError(f"unknown erase mode {mode!r}; choose one of {', '.join(ERASE_MODES)}")
    dtype = images.dtype
    values = images.float()
    if mode == "mean":
        fill = values.mean(dim=(2, 3), keepdim=True).expand_as(values)
    else:
        sigma = max(images.shape[-2:]) / 8
        fill = gaussian_blur(values, kernel_size=2 * max(1, round(3 * sigma)) + 1, sigma=sigma)
    out = values.clone()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, :, y0:y1, x0:x1] = fill[i, :, y0:y1, x0:x1]
    return out.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else out.to(dtype)


def predict_probs(
    classifier: Classifier, images: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Class probabilities (N, classes) for uint8 images (N, 3, H, W) at the input size,
    normalised as ``Classifier.preprocess`` normalises them (``Classifier.normalize``):
    softmax, or per-class sigmoids for a multi-label model (``Classifier.probabilities``).
    """
    results = []
    with preserved_state(classifier.module), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = classifier.normalize(images[start : start + batch_size])
            logits = select_logits(classifier.module(x), classifier.output)
            results.append(classifier.probabilities(logits).cpu())
    return torch.cat(results) if results else torch.zeros((0, len(classifier.labels)))


def flip_outcomes(
    before: torch.Tensor, after: torch.Tensor, cls: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which predictions flipped to ``cls``: ``(eligible, flipped)``, both (N,) bool.

    Only images not already predicted ``cls`` are eligible.

    Example:
        >>> flip_outcomes(torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 1, 2]), 1)
        (tensor([ True, False,  True,  True]), tensor([ True, False,  True, False]))
    """
    eligible = before != cls
    return eligible, eligible & (after == cls)


def mcnemar_greater(only_first: int, only_second: int) -> float:
    """Exact one-sided McNemar p-value that outcome 1 happens more often than outcome 2,
    from the discordant pairs (``only_first``: only the first treatment succeeded).

    Example:
        >>> round(mcnemar_greater(10, 0), 6)  # 0.5 ** 10
        0.000977
    """
    return sign_test_greater(only_first, only_second)


def sign_test_greater(wins: int, losses: int) -> float:
    """One-sided sign test: p-value of at least ``wins`` successes in ``wins + losses`` fair
    coin flips (1.0 without any).

    Example:
        >>> sign_test_greater(3, 0)
        0.125
    """
    if wins + losses == 0:
        return 1.0
    from scipy.stats import binomtest  # imported on use: scipy.stats takes ~0.4 s to import

    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def paste_test(
    classifier: Classifier,
    cls: int,
    box: BoxF,
    donors: torch.Tensor,
    recipients: torch.Tensor,
    rng: np.random.Generator,
    *,
    batch_size: int = 64,
    n_examples: int = 3,
    before: torch.Tensor | None = None,
) -> PasteTest:
    """Paste the ``box`` region of class-``cls`` images onto other images (see the module
    docstring).

    Parameters:
        classifier: the model.
        cls: the class the hotspot belongs to.
        box: the hotspot, fractions of the image.
        donors: (D, 3, H, W) uint8 images of class ``cls`` at the input size.
        recipients: (R, 3, H, W) uint8 images of the other classes.
        rng: chooses the donor of each recipient and the baseline regions.
        n_examples: before/after examples kept (flipped ones first).
        before: the recipients' probabilities when already known (``predict_probs``).

    Returns:
        A ``PasteTest`` over the recipients not already predicted ``cls``.
    """
    if len(donors) == 0 or len(recipients) == 0:
        return PasteTest(0, 0, 0, 1.0)
    height, width = recipients.shape[-2:]
    where = pixel_box(box, height, width)
    n = len(recipients)
    chosen = donors[torch.from_numpy(rng.integers(0, len(donors), n))]
    pasted = paste_regions(recipients, chosen, where)
    baseline = paste_regions(recipients, chosen, where, random_boxes(rng, n, where, height, width))
    if before is None:
        before = predict_probs(classifier, recipients, batch_size)
    after = predict_probs(classifier, pasted, batch_size)
    after_baseline = predict_probs(classifier, baseline, batch_size)
    eligible, flipped = flip_outcomes(before.argmax(dim=1), after.argmax(dim=1), cls)
    _, flipped_baseline = flip_outcomes(before.argmax(dim=1), after_baseline.argmax(dim=1), cls)
    p_value = mcnemar_greater(
        int((flipped & ~flipped_baseline).sum()), int((~flipped & flipped_baseline).sum())
    )
    candidates = [i for i in range(n) if eligible[i]]
    order = sorted(candidates, key=lambda i: (not bool(flipped[i]), i))[:n_examples]
    examples = [
        {
            "before": _hwc(recipients[i]),
            "after": _hwc(pasted[i]),
            "before_class": int(before[i].argmax()),
            "before_prob": float(before[i].max()),
            "after_class": int(after[i].argmax()),
            "after_prob": float(after[i].max()),
            "box": where,
        }
        for i in order
    ]
    return PasteTest(
        int(eligible.sum()), int(flipped.sum()), int(flipped_baseline.sum()), p_value, examples
    )


def erase_test(
    classifier: Classifier,
    cls: int,
    box: BoxF,
    images: torch.Tensor,
    rng: np.random.Generator,
    *,
    mode: str = "blur",
    batch_size: int = 64,
    n_examples: int = 3,
    before: torch.Tensor | None = None,
) -> EraseTest:
    """Erase the ``box`` region on class-``cls`` images (see the module docstring).

    Parameters:
        images: (N, 3, H, W) uint8 images of class ``cls`` at the input size.
        mode: ``"blur"`` or ``"mean"`` (see ``erase_regions``).
        n_examples: before/after examples kept (largest drops first).
        before: the images' probabilities when already known (``predict_probs``).

    Returns:
        An ``EraseTest`` with the mean probabilities of ``cls`` before and after.
    """
    n = len(images)
    if n == 0:
        return EraseTest(0, 0.0, 0.0, 0.0, 1.0)
    height, width = images.shape[-2:]
    where = pixel_box(box, height, width)
    erased = erase_regions(images, [where] * n, mode)
    baseline = erase_regions(images, random_boxes(rng, n, where, height, width), mode)
    if before is None:
        before = predict_probs(classifier, images, batch_size)
    after = predict_probs(classifier, erased, batch_size)
    after_baseline = predict_probs(classifier, baseline, batch_size)
    p, p_erased, p_base = before[:, cls], after[:, cls], after_baseline[:, cls]
    difference = (p_base - p_erased).numpy()
    tolerance = 1e-6
    p_value = sign_test_greater(
        int((difference > tolerance).sum()), int((difference < -tolerance).sum())
    )
    order = np.argsort(-(p - p_erased).numpy(), kind="stable")[:n_examples]
    examples = [
        {
            "before": _hwc(images[i]),
            "after": _hwc(erased[i]),
            "before_prob": float(p[i]),
            "after_prob": float(p_erased[i]),
            "box": where,
        }
        for i in order.tolist()
    ]
    return EraseTest(
        n,
        float(p.mean()),
        float(p_erased.mean()),
        float(p_base.mean()),
        p_value,
        examples,
    )


def confirm_hotspot(
    classifier: Classifier,
    cls: int,
    box: BoxF,
    donors: torch.Tensor,
    recipients: torch.Tensor,
    *,
    rule: ConfirmRule | None = None,
    n_tests: int = 1,
    seed: int = 0,
    erase: str = "blur",
    batch_size: int = 64,
    donor_probs: torch.Tensor | None = None,
    recipient_probs: torch.Tensor | None = None,
) -> Confirmation:
    """Run both tests on one hotspot and apply ``rule`` (see the module docstring).

    Parameters:
        classifier: the model.
        cls: the hotspot's class.
        box: the hotspot, fractions of the image.
        donors: (D, 3, H, W) uint8 class-``cls`` images (donors for pasting, erased images).
        recipients: (R, 3, H, W) uint8 images of the other classes.
        rule: the decision rule (default ``ConfirmRule()``).
        n_tests: how many tests the whole audit runs (Bonferroni: ``alpha / n_tests``).
        seed: seeds the donor choice and the baseline regions.
        donor_probs, recipient_probs: the images' probabilities when already known (an
            audit tests several hotspots on the same images).

    Example:
        >>> from torch import nn
        >>> from camlens.models import load_model
        >>> class CornerTag(nn.Module):  # a shortcut by construction: the upper right corner
        ...     def forward(self, x):
        ...         corner = x[:, :, :8, 24:].mean((1, 2, 3))
        ...         return torch.stack([-corner, corner], 1) * 10
        >>> model = load_model(CornerTag(), labels=["plain", "tagged"])
        >>> recipients = torch.randint(0, 100, (40, 3, 32, 32), dtype=torch.uint8)  # dark noise
        >>> donors = torch.randint(0, 100, (40, 3, 32, 32), dtype=torch.uint8)
        >>> donors[:, :, :8, 24:] = 255  # the tag
        >>> c = confirm_hotspot(model, 1, (0.75, 0.0, 1.0, 0.25), donors, recipients, erase="mean")
        >>> c.confirmed, c.paste.flip_rate, c.paste.baseline_flip_rate  # vs. random regions
        (True, 1.0, 0.0)
        >>> round(c.erase.confidence_drop, 2), round(c.erase.baseline_drop, 2)
        (1.0, 0.0)
    """
    rule = rule or ConfirmRule()
    rng = np.random.default_rng(seed)
    paste = paste_test(
        classifier, cls, box, donors, recipients, rng,
        batch_size=batch_size, before=recipient_probs,
    )  # fmt: skip
    erased = erase_test(
        classifier, cls, box, donors, rng, mode=erase, batch_size=batch_size, before=donor_probs
    )
    return decide(paste, erased, rule, n_tests)


def decide(paste: PasteTest, erased: EraseTest, rule: ConfirmRule, n_tests: int) -> Confirmation:
    """Apply ``rule`` to both tests of one candidate (Bonferroni over ``n_tests``).

    Example:
        >>> paste, erased = PasteTest(20, 18, 1, 1e-5), EraseTest(20, 0.9, 0.2, 0.85, 1e-6)
        >>> c = decide(paste, erased, ConfirmRule(), n_tests=4)
        >>> c.paste_confirms, c.erase_confirms, c.alpha
        (True, True, 0.0025)
    """
    alpha = rule.alpha / max(n_tests, 1)
    paste_confirms = (
        paste.n >= rule.min_pairs
        and paste.p_value < alpha
        and paste.flip_rate - paste.baseline_flip_rate >= rule.min_flip_gain
    )
    erase_confirms = (
        erased.n >= rule.min_pairs
        and erased.p_value < alpha
        and erased.confidence_drop - erased.baseline_drop >= rule.min_drop_gain
    )
    return Confirmation(paste, erased, bool(paste_confirms), bool(erase_confirms), alpha)


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).to(torch.uint8).numpy()


def _overlap(a: PixelBox, b: PixelBox) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
