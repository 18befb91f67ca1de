"""Statistical channel weights: FEM weighs each channel by how often it is exceptionally high."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.methods.base import CAMMethod, LayerSpec, Step


class FEM(CAMMethod):
    """FEM (Feature Explanation Method): channels weighted by their share of outlying positions.

    For each image and channel ``k``, with ``mu_k`` and ``sigma_k`` the mean and standard
    deviation of ``A_k`` over the h w positions (population standard deviation, ddof = 0,
    as numpy's ``np.std`` in pytorch-grad-cam)::

        t_k       = mu_k + k_sigma * sigma_k                    (k_sigma: the option ``k``)
        w_k       = #{(i, j) : A_k[i, j] > t_k} / (h w)
        M[i, j]   = sum_k w_k * A_k[i, j]                       (raw map: no ReLU)

    A constant channel has no position above its mean: weight 0. No gradients; the map is
    class-agnostic (every target of an image gets the same map). ``k = 2`` by default (the
    "k sigma rule"); with at most ``k^2 + 1`` positions no value can exceed ``mu + k sigma``
    (a z-score is at most ``sqrt(h w - 1)``), so tiny layers need a smaller ``k``. The weights
    and the map match pytorch-grad-cam's ``FEM``, computed here in float32 whatever the
    model's dtype. Like pytorch-grad-cam's, it has no ``eigen_smooth`` (its map is computed
    once per image, not per target).

    Fuad, Martin, Giot, Bourqui, Benois-Pineau, Zemmari, "Features understanding in 3D CNNs
    for actions recognition in video", IPTA 2020 (https://hal.science/hal-02963298).
    """

    name = "fem"
    score_targets = True

    def __init__(
        self, module: nn.Module, layer: LayerSpec = None, *, k: float = 2.0, **options: Any
    ) -> None:
        super().__init__(module, layer, **options)
        if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k):
            raise ConfigError(f"k must be a finite number, got {k!r}")
        self.k = float(k)

    def compute_raw(self, step: Step) -> torch.Tensor:
        maps = step.activation.detach().float()
        raw = self.combine(self.fem_weights(maps, self.k)[:, None], maps)  # (N, 1, h, w)
        n, _, h, w = raw.shape
        return raw.expand(n, step.targets.shape[1], h, w).contiguous()

    @staticmethod
    def fem_weights(maps: torch.Tensor, k: float = 2.0) -> torch.Tensor:
        """(N, C) weights of (N, C, h, w) ``maps``: the share of each channel's positions
        strictly above ``mean + k * std`` (population std).

        Example:
            >>> FEM.fem_weights(torch.tensor([[[[0.0, 0.0], [0.0, 100.0]]]]), k=1.0)
            tensor([[0.2500]])
        """
        mean = maps.mean(dim=(-2, -1), keepdim=True)
        std = maps.std(dim=(-2, -1), correction=0, keepdim=True)
        return (maps > mean + k * std).float().mean(dim=(-2, -1))
