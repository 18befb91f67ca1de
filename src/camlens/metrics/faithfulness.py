"""Does the model really depend on the highlighted pixels? Perturbation metrics.

Every function here perturbs the *model input* (the preprocessed tensor, N x C x H x W) guided
by saliency maps at the input's resolution (N x H x W, e.g. ``Explanation.maps[:, 0]``;
smaller maps are upsampled bilinearly), runs the perturbed inputs through the model in
batches of ``batch_size`` under ``torch.inference_mode``, and reads the score of the explained
class: its softmax probability (``score="prob"``, the papers' choice; its sigmoid for a
multi-label ``Classifier``) or its logit (``score="logit"``). "Zero" means zero in the model's input space, i.e. the data set's mean
colour for a normalised input, as in the RISE and pytorch-grad-cam code.

Pixels are ranked by saliency, most salient first; ties keep row-major order.

References:
    Petsiuk, Das, Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box
    Models", BMVC 2018 (deletion and insertion).
    Chattopadhay et al., "Grad-CAM++", WACV 2018 (average drop, increase in confidence).
    Zhang, Hare, Prügel-Bennett, Shah, "Opti-CAM", 2023 (average gain).
    Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent and Efficient Evaluation Strategy
    for Attribution Methods", ICML 2022 (ROAD, noisy linear imputation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from scipy.sparse.linalg import spsolve
from torch import nn

from camlens.batching import chunks
from camlens.errors import ConfigError
from camlens.hooks import preserved_state
from camlens.models import Classifier, class_probabilities
from camlens.models.outputs import OutputSpec, select_logits

__all__ = [
    "DEFAULT_STEPS",
    "ROAD_FRACTIONS",
    "auc",
    "average_drop",
    "average_gain",
    "deletion_curve",
    "gaussian_blur",
    "increase_in_confidence",
    "insertion_curve",
    "masked_scores",
    "noisy_linear_impute",
    "perturbation_baseline",
    "road_scores",
    "scorer",
]

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Baseline = str | float | torch.Tensor

#: Deletion/insertion steps by default (curves of ``DEFAULT_STEPS + 1`` points): the fewest
#: whose area stays within 0.01 of the area with 224 steps (RISE's setting) on every curve of
#: the bundled photos and of generated shapes (``benchmarks/evaluate_bench.py``).
DEFAULT_STEPS = 128

#: Fractions of pixels removed by ROAD (Rong et al.: 10 % ... 90 %).
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: Weights of the 8 neighbours in noisy linear imputation (Rong et al. 2022): direct
#: neighbours 1/6, diagonal ones 1/12; they sum to 1.
NEIGHBOUR_WEIGHTS = (
    ((0, 1), 1 / 6),
    ((0, -1), 1 / 6),
    ((1, 0), 1 / 6),
    ((-1, 0), 1 / 6),
    ((1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((-1, 1), 1 / 12),
    ((-1, -1), 1 / 12),
)


def scorer(
    model: Classifier | nn.Module | Callable, *, score: str = "prob", output: OutputSpec = None
) -> Scorer:
    """``f(x, targets) -> (N,)`` scores of ``targets`` (one class per image) for the batch ``x``.

    Parameters:
        model: a ``Classifier``, an ``nn.Module``, or any callable that maps a batch to
            logits.
        score: ``"prob"`` (softmax probability; the class's sigmoid for a multi-label
            ``Classifier``, see ``Classifier.multilabel``) or ``"logit"``.
        output: how to pick the logits from the model's output (see ``select_logits``).

    Example:
        >>> model = lambda x: torch.stack([x.sum((1, 2, 3)), torch.zeros(len(x))], 1)
        >>> scorer(model, score="logit")(torch.ones(1, 1, 2, 2), torch.tensor([0]))
        tensor([4.])
    """
    if score not in ("prob", "logit"):
        raise ConfigError(f"score must be 'prob' or 'logit', got {score!r}")
    multilabel = isinstance(model, Classifier) and model.multilabel
    if isinstance(model, Classifier):
        model, output = model.module, model.output if output is None else output
    module = model

    def run(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if isinstance(module, nn.Module):
                with preserved_state(module):
                    logits = select_logits(module(x), output)
            else:
                logits = select_logits(module(x), output)
            logits = logits.float()
            values = class_probabilities(logits, multilabel) if score == "prob" else logits
            return values.gather(1, targets.view(-1, 1).to(values.device)).squeeze(1).cpu()

    return run


def gaussian_blur(x: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Blur each channel of the (N, C, H, W) batch ``x`` with a Gaussian of ``kernel_size``
    taps (the defaults: RISE's insertion baseline, 11 x 11, sigma 5), one axis after the
    other. The borders are reflected, or replicated where the kernel's radius reaches the
    image's height or width (reflecting needs a margin smaller than the image).

    Example:
        >>> gaussian_blur(torch.ones(1, 1, 4, 4), kernel_size=3, sigma=1.0).shape
        torch.Size([1, 1, 4, 4])
    """
    radius = kernel_size // 2
    t = torch.arange(kernel_size, dtype=torch.float32, device=x.device) - radius
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = (g / g.sum()).to(x.dtype)
    channels = x.shape[1]
    mode = "reflect" if radius < min(x.shape[-2:]) else "replicate"
    rows = F.pad(x, (radius, radius, 0, 0), mode=mode)
    rows = F.conv2d(rows, g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    columns = F.pad(rows, (0, 0, radius, radius), mode=mode)
    return F.conv2d(columns, g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def perturbation_baseline(x: torch.Tensor, baseline: Baseline = "zero") -> torch.Tensor:
    """What removed pixels become: ``"zero"``, ``"blur"`` (a blurred copy), a number or a
    tensor broadcastable to ``x``."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x.device, x.dtype).expand_as(x)
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "blur":
        return gaussian_blur(x)
    raise ConfigError(f"baseline must be 'zero', 'blur', a number or a tensor, got {baseline!r}")


def deletion_curve(
    model: nn.Module | Callable,
    x: torch.Tensor,
    saliency: torch.Tensor | np.ndarray,
    targets: torch.Tensor | Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    baseline: Baseline = "zero",
    batch_size: int = 16,
    score: str = "prob",
) -> np.ndarray:
    """RISE deletion: the class score as the most salient pixels are removed, step by step.

    Step ``k`` (``k = 0 .. steps``) replaces the ``round(k * H * W / steps)`` most salient
    pixels (all channels) with the baseline. A faithful map makes the score fall fast, so a
    *lower* area under the curve (:func:`auc`) is better.

    Parameters:
        model: see :func:`scorer`.
        x: (N, C, H, W) model inputs.
        saliency: (N, H, W) or (N, h, w) maps, larger = more important.
        targets: (N,) class per image.
        steps: number of steps; the curve has ``steps + 1`` points.
        baseline: ``"zero"`` (RISE's deletion default), ``"blur"``, a number or a tensor.
        batch_size: perturbed inputs per forward pass: the ``N x (steps + 1)`` inputs, in
            the order image 0 step 0 .. steps, image 1 ..., are fed in chunks of
            ``batch_size`` that run across images (only the last chunk is smaller).
        score: ``"prob"`` or ``"logit"``.

    Returns:
        (N, steps + 1) float array of scores.

    Example:
        >>> model = lambda x: torch.stack([x.sum((1, 2, 3)), torch.zeros(len(x))], 1)
        >>> x = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])  # the map: the pixels themselves
        >>> deletion_curve(model, x, x[:, 0], [0], steps=4, score="logit")
        array([[10.,  6.,  3.,  1.,  0.]])
    """
    return _perturbation_curve(
        model, x, saliency, targets, steps, baseline, batch_size, score, insert=False
    )


def insertion_curve(
    model: nn.Module | Callable,
    x: torch.Tensor,
    saliency: torch.Tensor | np.ndarray,
    targets: torch.Tensor | Sequence[int],
    *,
    steps: int = DEFAULT_STEPS,
    baseline: Baseline = "blur",
    batch_size: int = 16,
    score: str = "prob",
) -> np.ndarray:
    """RISE insertion: start from the baseline (a blurred image by default) and put back the
    most salient pixels first. A faithful map makes the score rise fast: *higher* AUC is better.

    Parameters and return value as for :func:`deletion_curve`.
    """
    return _perturbation_curve(
        model, x, saliency, targets, steps, baseline, batch_size, score, insert=True
    )


def auc(curve: np.ndarray) -> np.ndarray:
    """Area under curves sampled at equal steps over [0, 1] (trapezoidal rule, as RISE).

    Example:
        >>> auc(np.array([[1.0, 0.5, 0.0]]))
        array([0.5])
    """
    curve = np.asarray(curve, dtype=np.float64)
    curve = curve[None] if curve.ndim == 1 else curve
    steps = curve.shape[1] - 1
    if steps < 1:
        raise ValueError("a curve needs at least two points")
    return (curve.sum(axis=1) - (curve[:, 0] + curve[:, -1]) / 2) / steps


def _perturbation_curve(
    model: nn.Module | Callable,
    x: torch.Tensor,
    saliency: torch.Tensor | np.ndarray,
    targets: torch.Tensor | Sequence[int],
    steps: int,
    baseline: Baseline,
    batch_size: int,
    score: str,
    *,
    insert: bool,
) -> np.ndarray:
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    score_fn = scorer(model, score=score)
    targets = _as_targets(targets, x.shape[0])
    ranks = _ranks(_fit_saliency(saliency, x))
    base = perturbation_baseline(x, baseline)
    n_images, n_pixels = ranks.shape
    points = steps + 1
    counts = torch.round(torch.arange(points, dtype=torch.float64) * n_pixels / steps).long()
    counts = counts.to(ranks.device).unsqueeze(1)
    start, end = (base, x) if insert else (x, base)
    # The (image, step) pairs in row-major order (flat position i * points + k), cut into
    # chunks of batch_size across images and steps. A chunk is built in one reused buffer,
    # one image's run of consecutive steps at a time, by broadcasting: no per-pair indices,
    # no gathered copies of the inputs.
    total = n_images * points
    pair_targets = targets.repeat_interleave(points)
    scores = torch.empty(total, dtype=torch.float64)
    buffer = torch.empty((min(batch_size, total), *x.shape[1:]), dtype=x.dtype, device=x.device)
    for first in range(0, total, batch_size):
        last = min(first + batch_size, total)
        with torch.no_grad():  # an input that requires grad cannot be written with out=
            for image in range(first // points, (last - 1) // points + 1):
                a, b = max(first, image * points), min(last, (image + 1) * points)
                steps_here = slice(a - image * points, b - image * points)
                removed = (ranks[image] < counts[steps_here]).view(b - a, 1, *x.shape[-2:])
                torch.where(removed, end[image], start[image], out=buffer[a - first : b - first])
        values = score_fn(buffer[: last - first], pair_targets[first:last])
        scores[first:last] = values.double()
    return scores.view(n_images, points).numpy()


def masked_scores(
    model: nn.Module | Callable,
    x: torch.Tensor,
    saliency: torch.Tensor | np.ndarray,
    targets: torch.Tensor | Sequence[int],
    *,
    batch_size: int = 16,
    score: str = "prob",
) -> tuple[np.ndarray, np.ndarray]:
    """Scores on the full inputs and on the inputs multiplied by their maps.

    The "explanation map" of Grad-CAM++: ``E = saliency * x`` (saliency in [0, 1]; zero is the
    baseline). Feed the two arrays to :func:`average_drop`, :func:`increase_in_confidence`
    and :func:`average_gain`.

    Returns:
        ``(full, masked)``, two (N,) float arrays.
    """
    score_fn = scorer(model, score=score)
    targets = _as_targets(targets, x.shape[0])
    weights = _fit_saliency(saliency, x).clamp(0, 1).unsqueeze(1).to(x.dtype)
    full, masked = [], []
    for chunk in chunks(range(x.shape[0]), batch_size):
        index = torch.tensor(chunk)
        full.append(score_fn(x[index], targets[index]))
        masked.append(score_fn(x[index] * weights[index], targets[index]))
    return torch.cat(full).double().numpy(), torch.cat(masked).double().numpy()


def average_drop(full: np.ndarray, masked: np.ndarray) -> float:
    """Average Drop (Chattopadhay et al. 2018): ``mean(max(0, Y - O) / Y)``, where ``Y`` is the
    score on the full image and ``O`` on the image times its map. Lower is better; a fraction
    (the paper reports it x 100).

    Example:
        >>> average_drop(np.array([0.8, 0.5]), np.array([0.4, 0.6]))
        0.25
    """
    full, masked = np.asarray(full, dtype=np.float64), np.asarray(masked, dtype=np.float64)
    drop = np.divide(np.clip(full - masked, 0, None), full, out=np.zeros_like(full), where=full > 0)
    return float(drop.mean()) if drop.size else float("nan")


def increase_in_confidence(full: np.ndarray, masked: np.ndarray) -> float:
    """Increase in Confidence (Chattopadhay et al. 2018): the share of images whose score
    rises when only the map's region is shown, ``mean(1[Y < O])``. Higher is better.

    Example:
        >>> increase_in_confidence(np.array([0.8, 0.5]), np.array([0.4, 0.6]))
        0.5
    """
    full, masked = np.asarray(full, dtype=np.float64), np.asarray(masked, dtype=np.float64)
    return float((masked > full).mean()) if full.size else float("nan")


def average_gain(full: np.ndarray, masked: np.ndarray) -> float:
    """Average Gain (Zhang et al. 2023, Opti-CAM): ``mean(max(0, O - Y) / (1 - Y))``, the
    counterpart of Average Drop for probabilities. Higher is better. An image whose full
    score is already 1 contributes 0 (nothing to gain).

    Example:
        >>> average_gain(np.array([0.5, 0.5]), np.array([0.75, 0.25]))
        0.25
    """
    full, masked = np.asarray(full, dtype=np.float64), np.asarray(masked, dtype=np.float64)
    room = 1.0 - full
    gain = np.divide(np.clip(masked - full, 0, None), room, out=np.zeros_like(full), where=room > 0)
    return float(gain.mean()) if gain.size else float("nan")


def noisy_linear_impute(
    image: torch.Tensor,
    missing: torch.Tensor | np.ndarray,
    *,
    noise: float = 0.01,
    generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """Fill ``missing`` pixels with the weighted mean of their neighbours, plus noise (ROAD).

    Rong et al. 2022: every missing pixel equals the weighted mean of its (up to 8) in-image
    neighbours, weights 1/6 (direct) and 1/12 (diagonal), renormalised at the border. Known
    pixels are fixed, so the missing ones solve one sparse linear system (the same matrix for
    all channels), solved with ``scipy.sparse.linalg.spsolve``. Gaussian noise of standard
    deviation ``noise`` is added to the filled values, so that a model cannot tell imputed
    pixels by their smoothness. A linear ramp is reproduced exactly (noise 0, holes inside).

    Parameters:
        image: (C, H, W) tensor.
        missing: (H, W) bool, True where pixels are removed; at least one pixel must be kept.
        noise: standard deviation of the added noise (0.01 in the reference code).
        generator: numpy random generator for the noise (default: seeded with 0).

    Returns:
        A new (C, H, W) tensor.
    """
    missing = torch.as_tensor(missing, dtype=torch.bool).cpu().numpy()
    channels, height, width = image.shape
    if missing.shape != (height, width):
        raise ValueError(f"mask {missing.shape} does not match the image {(height, width)}")
    flat_missing = missing.ravel()
    unknown = np.flatnonzero(flat_missing)
    if unknown.size == 0:
        return image.clone()
    if unknown.size == flat_missing.size:
        raise ValueError("cannot impute an image whose pixels are all missing")
    values = image.detach().double().cpu().numpy().reshape(channels, -1)
    variable = np.full(flat_missing.size, -1)
    variable[unknown] = np.arange(unknown.size)
    rows_u, cols_u = np.divmod(unknown, width)
    equation = np.arange(unknown.size)
    a_rows, a_cols, a_vals = [equation], [equation], [np.zeros(unknown.size)]
    rhs = np.zeros((unknown.size, channels))
    for (dr, dc), weight in NEIGHBOUR_WEIGHTS:
        r, c = rows_u + dr, cols_u + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        neighbour = r[inside] * width + c[inside]
        eq = equation[inside]
        a_vals[0][eq] -= weight  # diagonal: minus the sum of in-image neighbour weights
        is_unknown = flat_missing[neighbour]
        a_rows.append(eq[is_unknown])
        a_cols.append(variable[neighbour[is_unknown]])
        a_vals.append(np.full(int(is_unknown.sum()), weight))
        known = ~is_unknown
        np.subtract.at(rhs, eq[known], weight * values[:, neighbour[known]].T)
    system = sparse.coo_matrix(
        (np.concatenate(a_vals), (np.concatenate(a_rows), np.concatenate(a_cols))),
        shape=(unknown.size, unknown.size),
    ).tocsc()
    solution = spsolve(system, rhs).reshape(unknown.size, channels)
    if noise > 0:
        rng = generator if generator is not None else np.random.default_rng(0)
        solution = solution + noise * rng.standard_normal(solution.shape)
    filled = values.copy()
    filled[:, unknown] = solution.T
    return torch.from_numpy(filled.reshape(channels, height, width)).to(image.dtype)


def road_scores(
    model: nn.Module | Callable,
    x: torch.Tensor,
    saliency: torch.Tensor | np.ndarray,
    targets: torch.Tensor | Sequence[int],
    *,
    order: str = "morf",
    fractions: Sequence[float] = ROAD_FRACTIONS,
    noise: float = 0.01,
    seed: int = 0,
    batch_size: int = 16,
    score: str = "prob",
) -> np.ndarray:
    """ROAD (Remove And Debias, Rong et al. 2022): the class score after removing a fraction
    of the pixels and filling them by :func:`noisy_linear_impute`.

    ``order="morf"`` removes the most relevant pixels first (a faithful map makes the score
    drop: lower is better), ``"lerf"`` the least relevant first (the score should stay: higher
    is better). For each fraction ``p``, the ``round(p * H * W)`` pixels are removed.

    Returns:
        (N, len(fractions)) float array of scores.
    """
    if order not in ("morf", "lerf"):
        raise ConfigError(f"order must be 'morf' or 'lerf', got {order!r}")
    score_fn = scorer(model, score=score)
    targets = _as_targets(targets, x.shape[0])
    ranks = _ranks(_fit_saliency(saliency, x))
    n_pixels = ranks.shape[1]
    jobs = [(i, j) for i in range(x.shape[0]) for j in range(len(fractions))]
    result = np.zeros((x.shape[0], len(fractions)))
    for chunk in chunks(jobs, batch_size):
        imputed = []
        for i, j in chunk:
            count = round(fractions[j] * n_pixels)
            removed = ranks[i] < count if order == "morf" else ranks[i] >= n_pixels - count
            rng = np.random.default_rng([seed, i, j])
            imputed.append(
                noisy_linear_impute(
                    x[i].cpu(), removed.view(x.shape[-2:]).cpu(), noise=noise, generator=rng
                )
            )
        batch = torch.stack(imputed).to(x.device)
        values = score_fn(batch, targets[torch.tensor([i for i, _ in chunk])])
        for (i, j), value in zip(chunk, values.double().numpy(), strict=True):
            result[i, j] = value
    return result


def _fit_saliency(saliency: torch.Tensor | np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float maps at the input's resolution."""
    maps = torch.as_tensor(saliency).float()
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3 or maps.shape[0] != x.shape[0]:
        raise ConfigError(
            f"saliency must be (N, H, W) with N = {x.shape[0]} images, got {tuple(maps.shape)}"
        )
    if maps.shape[-2:] != x.shape[-2:]:
        maps = F.interpolate(
            maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
    return maps.to(x.device)


def _ranks(maps: torch.Tensor) -> torch.Tensor:
    """(N, H*W) position of each pixel in descending saliency order (0 = most salient)."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def _as_targets(targets: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    ids = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if ids.numel() != n:
        raise ConfigError(f"need one target class per image ({n}), got {ids.numel()}")
    return ids
