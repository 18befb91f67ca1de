"""Gradient-weighted methods: Grad-CAM, Grad-CAM++, HiResCAM, Grad-CAM element-wise,
XGrad-CAM, Layer-CAM.

All of them differentiate the target's logit ``y_c`` (pre-softmax score) with respect to the
feature layer's output ``A`` only (``CAMMethod.target_gradients``), and compute in float32
whatever the model's dtype. ``g = d y_c / d A`` below. Every one of them also explains Conv3d
models: "spatial" sums and means run over (h, w) or (d, h, w) alike (``volumes``), and on a
GAP + linear 3-D head Grad-CAM equals CAM divided by ``d * h * w``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camlens.errors import ConfigError
from camlens.methods.base import CAMMethod, LayerSpec, Step, spatial_dims


class GradCAM(CAMMethod):
    """Grad-CAM: channels weighted by the spatial mean of the score's gradient.

    ::

        alpha_k^c = mean_ij( d y_c / d A_k[i, j] )
        M_c[i, j] = sum_k alpha_k^c * A_k[i, j]       (raw map: no ReLU here)

    Works on any CNN layer. On a GAP + linear head ``d y_c / d A_k[i, j] = w_k^c / (h w)``,
    so Grad-CAM equals CAM divided by ``h * w``. The backward pass reaches only down to the
    target layer. ``y_c`` is the logit (pre-softmax score); for a similarity target
    (``camlens.targets.Similarity``) it is ``cos(e(x), e(r))``, as for every gradient method.

    Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: Visual Explanations from
    Deep Networks via Gradient-based Localization", ICCV 2017.
    """

    name = "gradcam"
    needs_gradients = True
    score_targets = True
    volumes = True

    def channel_weights(self, step: Step) -> torch.Tensor:
        grads = self.target_gradients(step.activation, step.logits, step.targets, step.scores)
        return grads.mean(dim=spatial_dims(grads, 3))


class _Float32GradientMethod(CAMMethod):
    """Base of the gradient methods computed in float32 from ``g`` and the detached ``A``."""

    needs_gradients = True
    score_targets = True

    def float_gradients(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, A)`` in float32: (N, K, C, h, w) gradients and the (N, C, h, w) detached maps."""
        grads = self.target_gradients(step.activation, step.logits, step.targets, step.scores)
        return grads.float(), step.activation.detach().float()

    def feature_maps(self, activation: torch.Tensor) -> torch.Tensor:
        return activation.detach().float()


def _divide_or_zero(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, and 0 where the denominator is exactly 0 (no epsilon)."""
    nonzero = denominator != 0
    safe = torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, numerator / safe, torch.zeros_like(numerator))


class GradCAMPlusPlus(_Float32GradientMethod):
    """Grad-CAM++: positive gradients weighted by closed-form pixel coefficients.

    ::

        alpha_k^c[i, j] = g^2 / (2 g^2 + sum_ab A_k[a, b] * g^3)     (0 where the denominator is 0)
        w_k^c           = sum_ij alpha_k^c[i, j] * relu(g[i, j])
        M_c[i, j]       = sum_k w_k^c * A_k[i, j]                     (raw map: no ReLU)

    with ``g = d y_c / d A_k[i, j]`` taken at each position. This is the paper's closed form
    (Eq. 19) for the exponential score ``S_c = exp(y_c)`` of a piecewise-linear network: its
    derivatives are ``S g``, ``S g^2`` and ``S g^3``, the factor ``S`` cancels in ``alpha``,
    and in the weights it is one positive constant per (image, class), which is dropped (it
    rescales the map only, and ``exp(y_c)`` overflows for large logits). This is the form of
    pytorch-grad-cam's ``GradCAMPlusPlus`` (which adds 1e-6 to the denominator); the
    authors' TensorFlow code additionally rescales the alphas of each channel to sum to 1,
    which the paper does not. torchcam 0.5's ``GradCAMpp`` divides its alphas in place
    through boolean-mask indexing, which divides a copy: it computes ``alpha = g^2``
    (checked numerically); camlens does not reproduce that.

    Chattopadhay, Sarkar, Howlader, Balasubramanian, "Grad-CAM++: Generalized Gradient-Based
    Visual Explanations for Deep Convolutional Networks", WACV 2018.
    """

    name = "gradcam++"
    volumes = True

    def channel_weights(self, step: Step) -> torch.Tensor:
        grads, maps = self.float_gradients(step)
        where = spatial_dims(grads, 3)
        totals = maps.sum(dim=spatial_dims(maps, 2)).view(*maps.shape[:2], *([1] * len(where)))
        squared = grads.square()
        alpha = _divide_or_zero(squared, 2 * squared + totals[:, None] * squared * grads)
        return (alpha * grads.relu()).sum(dim=where)


class HiResCAM(_Float32GradientMethod):
    """HiResCAM: gradient times activation, element by element, summed over channels.

    ::

        M_c[i, j] = sum_k g_k[i, j] * A_k[i, j]                      (raw map: no ReLU)

    On a GAP + linear head ``g_k = w_k^c / (h w)`` everywhere, so HiResCAM equals CAM divided
    by ``h * w`` exactly (the same normalised map), and its sum over positions is the logit
    minus the bias: ``sum_ij M_c[i, j] = y_c - b_c``.

    Draelos, Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv:2011.08891, 2020.
    """

    name = "hirescam"
    volumes = True

    def compute_raw(self, step: Step) -> torch.Tensor:
        grads, maps = self.float_gradients(step)
        return (grads * maps[:, None]).sum(dim=2)


class GradCAMElementWise(_Float32GradientMethod):
    """Grad-CAM element-wise: the positive part of gradient times activation, summed.

    ::

        M_c[i, j] = sum_k relu( g_k[i, j] * A_k[i, j] )              (no ReLU on M_c itself)

    The ReLU inside the sum is part of the method (each channel's positive contribution at
    each position), not the normalisation: the raw map is non-negative. It is HiResCAM with
    the negative terms dropped, position by position. On non-negative activations (post-ReLU
    layers) ``relu(g A) = relu(g) A``, so it equals Layer-CAM there; on signed activations
    it also keeps ``g < 0, A < 0`` terms, which Layer-CAM drops. On a GAP + linear head it is
    ``sum_k relu(w_k^c A_k) / (h w)``.

    No paper: this is pytorch-grad-cam's ``GradCAMElementWise`` (Gildenblat et al., the
    ``pytorch-grad-cam`` library, https://github.com/jacobgil/pytorch-grad-cam), whose map
    (after its own ReLU and min-max scaling) camlens reproduces.
    """

    name = "gradcamelementwise"
    volumes = True

    def compute_raw(self, step: Step) -> torch.Tensor:
        grads, maps = self.float_gradients(step)
        return (grads * maps[:, None]).relu().sum(dim=2)


class XGradCAM(_Float32GradientMethod):
    """XGrad-CAM (Axiom-based Grad-CAM): gradients averaged with the activations as weights.

    ::

        w_k^c     = sum_ij ( A_k[i, j] / sum_ab A_k[a, b] ) * g_k[i, j]
        M_c[i, j] = sum_k w_k^c * A_k[i, j]                          (raw map: no ReLU)

    A channel whose activations sum to exactly 0 gets weight 0 (its weight is undefined).
    The formula assumes non-negative activations (post-ReLU layers); on signed feature maps a
    channel sum near 0 makes its weight large. On a GAP + linear head (constant gradients)
    ``w_k^c = w_k / (h w)``: XGrad-CAM equals Grad-CAM there. pytorch-grad-cam and torchcam
    add an epsilon (1e-7, 1e-8) to the denominator instead.

    Fu, Hu, Dong, Guo, Gao, Li, "Axiom-based Grad-CAM: Towards Accurate Visualization and
    Explanation of CNNs", BMVC 2020.
    """

    name = "xgradcam"
    volumes = True

    def channel_weights(self, step: Step) -> torch.Tensor:
        grads, maps = self.float_gradients(step)
        totals = maps.sum(dim=spatial_dims(maps, 2))[:, None]
        products = grads * maps[:, None]
        return _divide_or_zero(products.sum(dim=spatial_dims(products, 3)), totals)


class LayerCAM(_Float32GradientMethod):
    """Layer-CAM: activations weighted by their positive gradients, position by position.

    ::

        M_c[i, j] = sum_k relu(g_k[i, j]) * A_k[i, j]                 (raw map: no ReLU)

    On a GAP + linear head it is ``sum_k relu(w_k^c) A_k / (h w)``: CAM with the negative
    class weights removed. Its use is shallow layers, where gradients vary by position.

    **Several layers** (``layer=["layer2", "layer3", "layer4"]``): one forward and one
    backward pass per target give every layer's map; each is normalised to its maximum
    (``relu(M) / max``), scaled by ``tanh(gamma * M)`` (the paper's Eq. 9, gamma = 2, which
    lifts the weak values of shallow layers), upsampled bilinearly to the finest layer's
    resolution and combined by element-wise maximum. The fused raw map is then in [0, 1],
    at the finest resolution, and ``MethodResult.layer`` lists the layers, comma-separated.
    This matches torchcam's ``LayerCAM.fuse_cams`` applied to maps normalised the same way
    (torchcam min-max normalises, which differs when a map has no zero). ``fusion_gamma=None``
    skips the tanh scaling.

    Jiang, Zhang, Hou, Cheng, Wei, "LayerCAM: Exploring Hierarchical Class Activation Maps
    for Localization", IEEE TIP 2021.
    """

    name = "layercam"
    volumes = True
    fuses_layers = True

    def __init__(
        self,
        module: nn.Module,
        layer: LayerSpec = None,
        *,
        fusion_gamma: float | None = 2.0,
        **options: Any,
    ) -> None:
        super().__init__(module, layer, **options)
        if fusion_gamma is not None and fusion_gamma <= 0:
            raise ConfigError(f"fusion_gamma must be > 0 or None, got {fusion_gamma}")
        self.fusion_gamma = fusion_gamma

    def compute_raw(self, step: Step) -> torch.Tensor:
        return self._layer_map(*self.float_gradients(step))

    def fuse_layers(self, step: Step) -> torch.Tensor:
        grads = self.target_gradients(step.activations, step.logits, step.targets, step.scores)
        maps = [
            self._layer_map(g.float(), a.detach().float())
            for g, a in zip(grads, step.activations, strict=True)
        ]
        return fuse_maps(maps, self.fusion_gamma)

    @staticmethod
    def _layer_map(grads: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``sum_k relu(g_k) * A_k`` of float32 ``grads`` (N, K, C, h, w), ``maps`` (N, C, h, w)."""
        return (grads.relu() * maps[:, None]).sum(dim=2)


def fuse_maps(maps: Sequence[torch.Tensor], gamma: float | None = 2.0) -> torch.Tensor:
    """Fuse (N, K, h_l, w_l) maps of several layers as Layer-CAM does.

    Each map is normalised to ``relu(M) / max(M)`` (zero where it has no positive value),
    scaled by ``tanh(gamma * M)`` unless ``gamma`` is None, upsampled bilinearly to the
    largest resolution among the maps, and the maps are combined by element-wise maximum.
    Maps of volumes (N, K, d, h, w) are upsampled trilinearly.

    Parameters:
        maps: one (N, K, h, w) (or (N, K, d, h, w)) tensor per layer.
        gamma: the scaling of Layer-CAM's Eq. 9 (2.0), or None for none.

    Returns:
        (N, K, H, W) float32 in [0, 1], H x W the finest resolution.

    Example:
        >>> fuse_maps([torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 4, 4)], gamma=None).shape
        torch.Size([1, 1, 4, 4])
    """
    size = tuple(max((m.shape[2:] for m in maps), key=lambda s: math.prod(s)))
    fused = None
    for layer_map in maps:
        positive = layer_map.float().relu()
        peak = positive.amax(dim=spatial_dims(positive, 2), keepdim=True)
        scaled = torch.where(peak > 0, positive / peak.clamp_min(1e-30), torch.zeros_like(positive))
        if gamma is not None:
            scaled = torch.tanh(gamma * scaled)
        if tuple(scaled.shape[2:]) != size:
            n, k = scaled.shape[:2]
            scaled = F.interpolate(
                scaled.reshape(n * k, 1, *scaled.shape[2:]),
                size=size,
                mode="bilinear" if len(size) == 2 else "trilinear",
                align_corners=False,
            ).reshape(n, k, *size)
        fused = scaled if fused is None else torch.maximum(fused, scaled)
    return fused
