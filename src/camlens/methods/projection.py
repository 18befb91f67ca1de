"""Projections on a first principal component: Eigen-CAM (feature maps, no gradients, no
class), Eigen-Grad-CAM (gradient x activation, per target), KPCA-CAM (kernel PCA, no class).

The sign of a principal component is arbitrary; camlens picks the one that correlates
positively with the channel sum of the decomposed matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.methods.base import CAMMethod, LayerSpec, Step
from camlens.methods.linalg import first_component_projection


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
    score_targets = True

    def __init__(
        self, module: nn.Module, layer: LayerSpec = None, *, center: bool = False, **options: Any
    ) -> None:
        super().__init__(module, layer, **options)
        self.center = center

    def compute_raw(self, step: Step) -> torch.Tensor:
        n, _, h, w = step.activation.shape
        projection = first_component_projection(step.activation.float(), center=self.center)
        return projection.view(n, 1, h, w).expand(n, step.targets.shape[1], h, w).contiguous()


def _positively_correlated(projection: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``projection`` (N, P), each row negated where it correlates negatively (Pearson, over
    the P positions) with the same row of ``reference`` (N, P); kept where the correlation is
    0 or positive (the rule of ``first_component_projection``)."""
    covariance = (
        (projection - projection.mean(dim=1, keepdim=True))
        * (reference - reference.mean(dim=1, keepdim=True)).to(projection.dtype)
    ).sum(dim=1)
    sign = torch.where(covariance < 0, -1.0, 1.0).to(projection.dtype)
    return projection * sign[:, None]


class EigenGradCAM(CAMMethod):
    """Eigen-Grad-CAM: the first principal component of gradient x activation, per target.

    For each image and target ``c``, the element-wise products ``P_k = g_k * A_k`` (with
    ``g = d y_c / d A``) form a matrix ``O`` of shape (h w, C), one row per position. Each
    channel's mean over positions is subtracted (``center=True``, the default, as
    pytorch-grad-cam does), and with ``O = U S V^T``::

        M_c[i, j] = s * (O V_1)[i, j] = s * sigma_1 * U_1[i, j]        (raw map: no ReLU)

    The sign ``s = +1 or -1`` is the one for which the map correlates positively (Pearson,
    over positions) with ``sum_k g_k A_k``, the HiResCAM map of the same target: the channel
    sum of the decomposed matrix, as Eigen-CAM's rule uses ``sum_k A_k``
    (``first_component_projection`` applied to the products). pytorch-grad-cam's
    ``EigenGradCAM`` keeps the sign LAPACK returns, so its map may be the negation of
    camlens' (after its ReLU: the complement of the region); otherwise the maps agree. Every
    target gets its own map (the gradients differ by class). ``center=False`` decomposes
    ``O`` without centring.

    No paper: this is pytorch-grad-cam's ``EigenGradCAM`` (Gildenblat et al., the
    pytorch-grad-cam library, https://github.com/jacobgil/pytorch-grad-cam): Eigen-CAM
    (Muhammad, Yeasin, IJCNN 2020) applied to gradient x activation.
    """

    name = "eigengradcam"
    score_targets = True
    needs_gradients = True

    def __init__(
        self, module: nn.Module, layer: LayerSpec = None, *, center: bool = True, **options: Any
    ) -> None:
        super().__init__(module, layer, **options)
        self.center = center

    def compute_raw(self, step: Step) -> torch.Tensor:
        grads = self.target_gradients(step.activation, step.logits, step.targets, step.scores)
        grads = grads.float()
        products = grads * step.activation.detach().float()[:, None]  # (N, K, C, h, w)
        n, k, c, h, w = products.shape
        flat = products.reshape(n * k, c, h, w)
        return first_component_projection(flat, center=self.center).view(n, k, h, w)


#: The kernels ``KPCACAM`` takes (scikit-learn's ``KernelPCA`` names).
KERNELS = ("linear", "poly", "rbf", "sigmoid", "cosine")


class KPCACAM(CAMMethod):
    """KPCA-CAM: the feature maps projected on their first kernel principal component.

    For each image, the feature maps form a matrix ``O`` of shape (h w, C), one row per
    position ``o_p``; each channel's mean over positions is subtracted first (as
    pytorch-grad-cam does). Kernel PCA (scikit-learn's ``KernelPCA(n_components=1,
    kernel=kernel, gamma=gamma)``) takes the kernel matrix ``K[p, q] = k(o_p, o_q)``, centres
    it in feature space (``K~``) and, with its top eigenpair ``(lambda_1, u_1)``::

        M[i, j] = s * sqrt(lambda_1) * u_1[i, j]                        (raw map: no ReLU)

    The default kernel is ``sigmoid``, ``k(x, y) = tanh(gamma <x, y> + 1)``, with
    ``gamma = 1 / C`` when ``gamma`` is None (scikit-learn's defaults); ``kernel="linear"``
    gives centred Eigen-CAM. The sign of an eigenvector is arbitrary: ``s = +1 or -1`` is
    chosen, as for Eigen-CAM, so that the map correlates positively (Pearson, over positions)
    with the activation energy ``sum_k A_k`` (positive when that correlation is 0).
    pytorch-grad-cam's ``KPCA_CAM`` keeps scikit-learn's sign instead (``svd_flip``: the
    entry of largest magnitude is positive, whatever the image), so its map may be the
    negation of camlens'. The map is class-agnostic: every target of an image gets the same
    map.

    The decomposition runs in float64 on the CPU, one image at a time (pytorch-grad-cam:
    float32). Above 200 positions scikit-learn uses ARPACK, here started from a fixed seed
    (``random_state=0``), so the result does not depend on numpy's global random state.

    Karmani, Sheth, Nauman, Ullah, Roy-Chowdhury, "KPCA-CAM: Visual Explainability of Deep
    Computer Vision Models using Kernel PCA", IEEE MMSP 2024 (arXiv:2410.00267).
    """

    name = "kpcacam"
    score_targets = True

    def __init__(
        self,
        module: nn.Module,
        layer: LayerSpec = None,
        *,
        kernel: str = "sigmoid",
        gamma: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(module, layer, **options)
        if kernel not in KERNELS:
            raise ConfigError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
        if gamma is not None and not (
            isinstance(gamma, int | float) and math.isfinite(gamma) and gamma > 0
        ):
            raise ConfigError(f"gamma must be a number > 0 or None, got {gamma!r}")
        self.kernel = kernel
        self.gamma = gamma

    def compute_raw(self, step: Step) -> torch.Tensor:
        activation = step.activation.detach()
        n, _, h, w = activation.shape
        matrices = activation.double().cpu().flatten(2).transpose(1, 2)  # (N, hw, C)
        centred = matrices - matrices.mean(dim=1, keepdim=True)
        projection = torch.stack([self._kernel_component(m) for m in centred])
        signed = _positively_correlated(projection, matrices.sum(dim=2)).float()
        raw = signed.view(n, 1, h, w).expand(n, step.targets.shape[1], h, w)
        return raw.contiguous().to(activation.device)

    def _kernel_component(self, matrix: torch.Tensor) -> torch.Tensor:
        """(hw,) scores of the (hw, C) float64 ``matrix`` on its first kernel component."""
        from sklearn.decomposition import KernelPCA  # imported on use (~0.5 s)

        if matrix.shape[0] < 2:  # a single position: nothing varies
            return torch.zeros(matrix.shape[0], dtype=torch.float64)
        kpca = KernelPCA(n_components=1, kernel=self.kernel, gamma=self.gamma, random_state=0)
        return torch.from_numpy(kpca.fit_transform(matrix.numpy())[:, 0].copy())
