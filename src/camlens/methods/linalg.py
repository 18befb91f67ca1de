"""First principal component of feature maps: Eigen-CAM's map and the ``eigen_smooth`` option.

Shared by ``camlens.methods.base`` (``eigen_smooth``) and ``camlens.methods.projection``
(Eigen-CAM); it imports torch only, so both may import it without a cycle.
"""

from __future__ import annotations

import torch


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


def weighted_first_component(weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``eigen_smooth``: each (image, target) map replaced by the first principal component of
    its weighted activations.

    For image ``n`` and target ``k`` the matrix ``O[(i, j), c] = w[n, k, c] * A[n, c, i, j]``
    (h w rows, C columns) is centred (each column's mean over positions subtracted, as
    pytorch-grad-cam's ``get_2d_projection`` does) and projected on its first right singular
    vector: ``M = O_centred v_1 = sigma_1 u_1``. The sign of a singular pair is arbitrary; it
    is chosen so that ``M`` correlates positively over positions with ``sum_c O[:, c]``, the
    plain weighted-sum map it replaces (see ``first_component_projection``).

    Parameters:
        weights: (N, K, C) channel weights.
        maps: (N, C, h, w) the feature maps they multiply.

    Returns:
        (N, K, h, w) float32 projections.

    Example:
        >>> weights, maps = torch.rand(2, 3, 8), torch.rand(2, 8, 4, 5)
        >>> weighted_first_component(weights, maps).shape
        torch.Size([2, 3, 4, 5])
    """
    n, k, c = weights.shape
    h, w = maps.shape[-2:]
    weighted = weights.detach().float()[..., None, None] * maps.detach().float()[:, None]
    projection = first_component_projection(weighted.reshape(n * k, c, h, w), center=True)
    return projection.reshape(n, k, h, w)
