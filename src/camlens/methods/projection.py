"""Eigen-CAM: the first principal component of the feature maps (no gradients, no class)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from camlens.methods.base import CAMMethod, LayerSpec, Step


class EigenCAM(CAMMethod):
    """Eigen-CAM: the activations projected on their first principal direction.

    For each image, the feature maps form a matrix ``O`` of shape (h w, C), one row per
    position. With the singular value decomposition ``O = U S V^T``::

        M[i, j] = s * (O V_1)[i, j] = s * sigma_1 * U_1[i, j]          (raw map: no ReLU)

    The sign of a singular vector is arbitrary (``(-U_1, -V_1)`` is as valid), so
    ``s = +1 or -1`` is chosen so that the map correlates positively (Pearson, over positions)
    with the activation energy ``sum_k A_k``; without that choice the map may come out
    negated, and after the ReLU of the normalisation it shows the complement of the object
    (pytorch-grad-cam's ``EigenCAM`` has this sign flip). The map is class-agnostic: every
    target of an image gets the same map.

    ``center=False`` (default) decomposes ``O`` itself, as the paper's formula does;
    ``center=True`` first subtracts each channel's mean over positions (PCA proper), as
    pytorch-grad-cam does: the map then has zero mean over positions.

    Muhammad, Yeasin, "Eigen-CAM: Class Activation Map using Principal Components",
    IJCNN 2020.
    """

    name = "eigencam"

    def __init__(
        self, module: nn.Module, layer: LayerSpec = None, *, center: bool = False, **options: Any
    ) -> None:
        super().__init__(module, layer, **options)
        self.center = center

    def compute_raw(self, step: Step) -> torch.Tensor:
        n, _, h, w = step.activation.shape
        projection = first_component_projection(step.activation.float(), center=self.center)
        return projection.view(n, 1, h, w).expand(n, step.targets.shape[1], h, w).contiguous()


def _first_left_singular_times_value(matrix: torch.Tensor) -> torch.Tensor:
    """``u_1 * sigma_1`` of each (m, n) matrix, from the eigendecomposition of the smaller
    Gram matrix in float64 (much faster than a full SVD on CPU; the sign is set by the caller).
    """
    m64 = matrix.double()
    if m64.shape[-2] <= m64.shape[-1]:  # (hw x hw) Gram: u_1 sigma_1 = v sqrt(lambda)
        values, vectors = torch.linalg.eigh(m64 @ m64.mT)
        result = vectors[..., -1] * values[..., -1:].clamp_min(0).sqrt()
    else:  # (C x C) Gram: u_1 sigma_1 = M v_1
        _, vectors = torch.linalg.eigh(m64.mT @ m64)
        result = (m64 @ vectors[..., -1:])[..., 0]
    return result.to(matrix.dtype)


def first_component_projection(activation: torch.Tensor, *, center: bool = False) -> torch.Tensor:
    """Projection of each image's (h w, C) activation matrix on its first principal direction.

    Parameters:
        activation: (N, C, h, w) feature maps.
        center: subtract each channel's spatial mean first.

    Returns:
        (N, h w) projections, signed so that each correlates positively with ``sum_k A_k``
        (positive when that correlation is 0).

    Example:
        >>> a = torch.rand(1, 8, 3, 3)
        >>> first_component_projection(a).shape
        torch.Size([1, 9])
    """
    matrix = activation.flatten(2).transpose(1, 2)  # (N, hw, C)
    if center:
        matrix = matrix - matrix.mean(dim=1, keepdim=True)
    projection = _first_left_singular_times_value(matrix)
    energy = activation.sum(dim=1).flatten(1)
    covariance = (
        (projection - projection.mean(dim=1, keepdim=True))
        * (energy - energy.mean(dim=1, keepdim=True))
    ).sum(dim=1)
    sign = torch.where(covariance < 0, -1.0, 1.0).to(projection.dtype)
    return projection * sign[:, None]
