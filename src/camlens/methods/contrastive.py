"""Grad-CAM with another score or a second-order term: Finer-CAM and Shapley-CAM.

Both weigh the channels of the feature layer's output ``A`` like Grad-CAM (the spatial mean
of a derivative) and differ in *what* they differentiate: Finer-CAM the target's logit minus
the logits of the classes that the model confuses it with, Shapley-CAM a utility of the
output plus its curvature (a Hessian-vector product). Derivatives are taken with respect to
the layer output only (``torch.autograd.grad``; parameters' ``.grad`` are never written), and
the weights are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.methods.base import LayerSpec, Step
from camlens.methods.gradient import _Float32GradientMethod


def similar_classes(logits: torch.Tensor, targets: torch.Tensor, n_similar: int) -> torch.Tensor:
    """The ``n_similar`` classes whose logits are closest to each target's logit.

    For target ``c`` of image ``n``: the classes ``j != c`` sorted by ``|y_j - y_c|``
    (ascending; ties by lower class index), the first ``min(n_similar, classes - 1)`` kept.
    The target itself is never among them, even when another class has the same logit.

    Parameters:
        logits: (N, classes) scores.
        targets: (N, K) long, the explained classes.
        n_similar: how many classes to compare with (>= 1).

    Returns:
        (N, K, S) long, ``S = min(n_similar, classes - 1)``, most similar first.

    Example:
        >>> similar_classes(torch.tensor([[4.0, 1.0, 9.0, 3.5]]), torch.tensor([[2, 1]]), 2)
        tensor([[[0, 3],
                 [3, 0]]])
    """
    scores = logits.detach().float()
    count = min(n_similar, scores.shape[1] - 1)
    chosen = scores.gather(1, targets)  # (N, K)
    distance = (scores[:, None, :] - chosen[..., None]).abs()  # (N, K, classes)
    distance.scatter_(2, targets[..., None], math.inf)  # never the target itself
    return distance.argsort(dim=2, stable=True)[..., :count]


def _tracked(activation: torch.Tensor) -> torch.Tensor:
    if not activation.requires_grad:
        raise ConfigError("gradients were requested but the layer output is not tracked")
    return activation


class FinerCAM(_Float32GradientMethod):
    """Finer-CAM: Grad-CAM of the target's logit minus those of its most similar classes.

    ::

        S         = the n_similar classes j != c with the smallest |y_j - y_c|
        s_c       = y_c - alpha * mean_{j in S} y_j
        w_k^c     = mean_ij( d s_c / d A_k[i, j] )
        M_c[i, j] = sum_k w_k^c * A_k[i, j]                          (raw map: no ReLU)

    Subtracting the scores of the classes the model finds closest (for the top-1 target: the
    runners-up) removes the evidence they share with the target and keeps what tells them
    apart. The score is linear in the logits, so the weights are those of Grad-CAM for ``c``
    minus ``alpha`` times the mean Grad-CAM weights of ``S`` (averaging the per-pair
    differences ``y_c - alpha y_j``, the paper's multi-class comparison, gives the same).
    ``alpha = 0`` is Grad-CAM. ``S`` is chosen per image and per target column (top-k targets
    each get their own neighbours), from the logits of the explained input (with smoothing:
    of each noisy copy); a model with fewer than ``n_similar + 1`` classes compares with all
    the others. ``comparisons`` holds the (N, K, S) classes of the last call.

    Options (keyword-only): ``alpha`` (1.0), the comparison strength; ``n_similar`` (3).

    Differences from pytorch-grad-cam 1.5.7's ``FinerCAM``: it weighs the differences by the
    classes' softmax probabilities, ``sum_j p_j (y_c - alpha y_j) / sum_j p_j``, and
    differentiates those probabilities too (``FinerWeightedTarget``); it explains one class
    per image (the top-1, or one index for the whole batch); it takes the comparison classes
    at positions 1, 2, 3 of ``argsort(|y - y_c|)`` (numpy's unstable sort) and explains the
    class at position 0, assuming it is the target: a tie with another class breaks that (the
    tied class is explained, or the target compared with itself). With one comparison class
    and the top-1 target both give the same map (up to its epsilon, 1e-9).

    Zhang, Gu, Chowdhury, Mai, Carlyn, Berger-Wolf, Su, Chao, "Finer-CAM: Spotting the
    Difference Reveals Finer Details for Visual Explanation", CVPR 2025 (arXiv:2501.11309).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        >>> method = FinerCAM(model, n_similar=2)
        >>> method(torch.rand(2, 3, 16, 16), "top2").shape
        torch.Size([2, 2, 16, 16])
        >>> method.comparisons.shape  # (N, K, S): two neighbours of each target
        torch.Size([2, 2, 2])
    """

    name = "finercam"
    score_targets = False
    compares_classes = True
    similarity_refusal = "it compares a class with the classes closest to it"

    def __init__(
        self,
        module: nn.Module,
        layer: LayerSpec = None,
        *,
        alpha: float = 1.0,
        n_similar: int = 3,
        **options: Any,
    ) -> None:
        super().__init__(module, layer, **options)
        if isinstance(n_similar, bool) or not isinstance(n_similar, int) or n_similar < 1:
            raise ConfigError(f"n_similar must be an integer >= 1, got {n_similar!r}")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
        ):
            raise ConfigError(f"alpha must be a finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self.n_similar = n_similar
        self.comparisons: torch.Tensor | None = None

    def channel_weights(self, step: Step) -> torch.Tensor:
        activation = _tracked(step.activation)
        similar = similar_classes(step.logits, step.targets, self.n_similar)
        self.comparisons = similar
        k = step.targets.shape[1]
        weights = []
        with torch.enable_grad():  # the caller may be inside torch.no_grad()
            scores = step.logits.float()
            for j in range(k):
                score = scores.gather(1, step.targets[:, j : j + 1])[:, 0]
                if similar.shape[2]:
                    score = score - self.alpha * scores.gather(1, similar[:, j]).mean(dim=1)
                (grad,) = torch.autograd.grad(score.sum(), activation, retain_graph=j < k - 1)
                weights.append(grad.float().mean(dim=(-2, -1)))
        return torch.stack(weights, dim=1)


class ShapleyCAM(_Float32GradientMethod):
    """Shapley-CAM: channels weighted by the gradient minus half the Hessian-vector product.

    ::

        U         = utility of the output for class c (see below)
        g         = d U / d A,      H A = (d^2 U / d A^2) A       (Hessian-vector product)
        w_k^c     = mean_ij( g_k[i, j] - 0.5 * (H A)_k[i, j] )
        M_c[i, j] = sum_k w_k^c * A_k[i, j]                          (raw map: no ReLU)

    The paper models the layer's elements as players of a cooperative game whose value is
    ``U`` with the absent players set to 0; the second-order Taylor expansion of ``U`` around
    ``A`` gives each element the Shapley value ``A * (g - 0.5 H A)`` in closed form, and
    Shapley-CAM averages the factor over positions as Grad-CAM averages ``g``. ``H A`` is one
    double backward pass (``create_graph=True``) that reaches only down to the layer.

    ``utility`` (keyword-only):
        ``"rest"`` (default): the paper's Residual Softmax Target-class utility
        ``U = y_c + log softmax(y)_c`` (pre-softmax score plus log-probability).
        ``"logit"``: ``U = y_c``, as the other gradient methods.
        ``"softmax"``: ``U = softmax(y)_c``.

    A network that is piecewise linear after the layer (ReLU, max/average pooling, linear
    layers) has a zero Hessian almost everywhere: with ``"logit"`` Shapley-CAM is then
    exactly Grad-CAM; the softmax in ``"rest"`` and ``"softmax"`` makes the term non-zero.

    pytorch-grad-cam 1.5.7's ``ShapleyCAM`` computes the same weights for the target it is
    given; its default target is the logit (``ClassifierOutputTarget``), the ReST utility
    being ``ClassifierOutputReST``. It differentiates through the input (``create_graph``
    from the input image), camlens only from the layer on; the maps agree.

    Cai, "CAMs as Shapley Value-based Explainers", arXiv:2501.06261, 2025.

    Example:
        >>> from torch import nn
        >>> from camlens.methods import GradCAM
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        >>> x = torch.rand(2, 3, 16, 16)
        >>> ShapleyCAM(model)(x, "top1").shape
        torch.Size([2, 1, 16, 16])
        >>> linear = ShapleyCAM(model, utility="logit")(x, "top1")  # linear head: H = 0
        >>> torch.allclose(linear, GradCAM(model)(x, "top1"), atol=1e-6)
        True
    """

    name = "shapleycam"
    score_targets = False
    similarity_refusal = "its utilities are functions of the class probabilities"
    compares_classes = True
    UTILITIES: ClassVar[tuple[str, ...]] = ("rest", "logit", "softmax")

    def __init__(
        self,
        module: nn.Module,
        layer: LayerSpec = None,
        *,
        utility: str = "rest",
        **options: Any,
    ) -> None:
        super().__init__(module, layer, **options)
        if utility not in self.UTILITIES:
            raise ConfigError(
                f"utility must be one of {', '.join(self.UTILITIES)}, got {utility!r}"
            )
        self.utility = utility

    def utility_scores(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N,) float32 utility of class ``target`` (N,) for each row of ``logits``."""
        scores = logits.float()
        index = target[:, None]
        if self.utility == "softmax":
            return scores.softmax(dim=1).gather(1, index)[:, 0]
        value = scores.gather(1, index)[:, 0]
        if self.utility == "rest":
            value = value + scores.log_softmax(dim=1).gather(1, index)[:, 0]
        return value

    def channel_weights(self, step: Step) -> torch.Tensor:
        activation = _tracked(step.activation)
        k = step.targets.shape[1]
        weights = []
        with torch.enable_grad():  # the caller may be inside torch.no_grad()
            for j in range(k):
                score = self.utility_scores(step.logits, step.targets[:, j]).sum()
                (grad,) = torch.autograd.grad(score, activation, create_graph=True)
                hvp = self.hessian_vector(grad, activation, retain_graph=j < k - 1)
                weights.append((grad.detach().float() - 0.5 * hvp).mean(dim=(-2, -1)))
        return torch.stack(weights, dim=1)

    @staticmethod
    def hessian_vector(
        grad: torch.Tensor, activation: torch.Tensor, *, retain_graph: bool
    ) -> torch.Tensor:
        """``H A`` in float32: the derivative of ``<grad, A>`` (``A`` held fixed) w.r.t. ``A``;
        zero where ``grad`` does not depend on ``A`` (a head linear in ``A``)."""
        if grad.requires_grad:
            (hvp,) = torch.autograd.grad(
                grad,
                activation,
                grad_outputs=activation.detach(),
                retain_graph=retain_graph,
                allow_unused=True,
            )
            if hvp is not None:
                return hvp.detach().float()
        return torch.zeros_like(activation, dtype=torch.float32)
