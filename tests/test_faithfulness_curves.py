"""Deletion and insertion curves: the vectorised chunking equals the former per-pair loop,
hand-computed curves (ties, rounding of the pixel counts), and how the model inputs are
chunked across images and steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.metrics import faithfulness as faith


def reference_curve(model, x, saliency, targets, steps, baseline, batch_size, score, insert):
    """The implementation before the vectorised one: a Python list of (image, step) pairs,
    cut into chunks of ``batch_size``, each score written back one pair at a time."""
    score_fn = faith.scorer(model, score=score)
    targets = faith._as_targets(targets, x.shape[0])
    ranks = faith._ranks(faith._fit_saliency(saliency, x))
    base = faith.perturbation_baseline(x, baseline)
    n_pixels = ranks.shape[1]
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * n_pixels / steps).long()
    pairs = [(i, k) for i in range(x.shape[0]) for k in range(steps + 1)]
    scores = np.zeros((x.shape[0], steps + 1))
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first : first + batch_size]
        images = torch.tensor([i for i, _ in chunk])
        removed = ranks[images] < counts[[k for _, k in chunk]].view(-1, 1)
        removed = removed.view(len(chunk), 1, *x.shape[-2:])
        start, end = (base, x) if insert else (x, base)
        perturbed = torch.where(removed, end[images], start[images])
        values = score_fn(perturbed, targets[images]).double().numpy()
        for (i, k), value in zip(chunk, values, strict=True):
            scores[i, k] = value
    return scores


class TinyCNN(nn.Module):
    """A small conv net with a GAP + linear head (4 classes), seeded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


class Counting(nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("insert", [False, True])
@pytest.mark.parametrize(("steps", "batch_size"), [(1, 1), (3, 5), (10, 7), (16, 64)])
def test_vectorised_curves_equal_the_former_per_pair_loop(insert, steps, batch_size):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 9, 11, generator=generator)
    saliency = torch.rand(3, 4, 5, generator=generator)  # upsampled to 9 x 11
    targets = torch.tensor([0, 3, 1])
    model = TinyCNN().eval()
    curve = faith.insertion_curve if insert else faith.deletion_curve
    for baseline in ("zero", "blur", 0.5):
        for score in ("prob", "logit"):
            got = curve(
                model, x, saliency, targets, steps=steps, baseline=baseline,
                batch_size=batch_size, score=score,
            )  # fmt: skip
            want = reference_curve(
                model, x, saliency, targets, steps, baseline, batch_size, score, insert
            )
            np.testing.assert_array_equal(got, want)
            assert got.shape == (3, steps + 1) and got.dtype == np.float64


class PixelSum(nn.Module):
    """logits = [sum of channel 0 weighted by the pixel index + 1, 0]: each pixel's share of
    the logit is known, so deletion curves are partial sums in the ranking's order."""

    def forward(self, x):
        weights = torch.arange(1, x[0, 0].numel() + 1, dtype=x.dtype).view(x.shape[-2:])
        total = (x[:, 0] * weights).sum(dim=(-2, -1))
        return torch.stack([total, torch.zeros_like(total)], dim=1)


def test_hand_computed_deletion_curve_with_ties_and_rounded_counts():
    x = torch.ones(1, 1, 3, 3)  # the logit is the sum of the weights of the kept pixels: 45
    # Saliency: pixel 4 (the centre) first, then the tie 0, 2, 8 in row-major order, then 6,
    # then the tie of the rest (1, 3, 5, 7).
    saliency = torch.tensor([[[5.0, 1.0, 5.0], [1.0, 9.0, 1.0], [2.0, 1.0, 5.0]]])
    order = [4, 0, 2, 8, 6, 1, 3, 5, 7]
    kept = 45.0 - np.cumsum([0] + [p + 1 for p in order])  # after removing 0 .. 9 pixels
    # 4 steps of 9 pixels: round(k * 9 / 4) = 0, 2 (2.25), 4 (4.5, half to even), 7, 9.
    curve = faith.deletion_curve(PixelSum(), x, saliency, [0], steps=4, score="logit")
    np.testing.assert_array_equal(curve, [kept[[0, 2, 4, 7, 9]]])
    np.testing.assert_array_equal(curve, [[45, 39, 27, 14, 0]])
    inserted = faith.insertion_curve(
        PixelSum(), x, saliency, [0], steps=4, score="logit", baseline="zero"
    )
    np.testing.assert_array_equal(inserted, [[0, 6, 18, 31, 45]])
    assert faith.auc(curve)[0] == pytest.approx((45 / 2 + 39 + 27 + 14 + 0 / 2) / 4)


def test_model_inputs_are_chunked_across_images_and_steps():
    model = Counting(TinyCNN().eval())
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    saliency = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(1))
    faith.deletion_curve(model, x, saliency, [0, 1, 2], steps=10, batch_size=16)
    assert model.sizes == [16, 16, 1]  # 3 images x 11 points = 33 inputs, not 3 x [11]
    model.sizes.clear()
    faith.insertion_curve(model, x, saliency, [0, 1, 2], steps=4, batch_size=100)
    assert model.sizes == [15]


def test_bad_steps_and_batch_size_are_refused_with_their_value():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ConfigError, match="steps must be at least 1, got 0"):
        faith.deletion_curve(PixelSum(), x, x[:, 0], [0], steps=0)
    with pytest.raises(ConfigError, match="batch_size must be at least 1, got 0"):
        faith.insertion_curve(PixelSum(), x, x[:, 0], [0], steps=2, batch_size=0)


def test_inputs_that_require_grad_and_half_precision():
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    saliency = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(1))
    want = reference_curve(model, x, saliency, [1, 2], 5, "zero", 4, "prob", False)
    got = faith.deletion_curve(model, x.clone().requires_grad_(True), saliency, [1, 2], steps=5,
                               batch_size=4)  # fmt: skip
    np.testing.assert_array_equal(got, want)
    half = faith.insertion_curve(
        lambda v: model(v.float()), x.half(), saliency, [1, 2], steps=5, batch_size=4
    )
    reference = reference_curve(
        lambda v: model(v.float()), x.half(), saliency, [1, 2], 5, "blur", 4, "prob", True
    )
    np.testing.assert_array_equal(half, reference)
