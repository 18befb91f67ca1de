"""Baseline maps for evaluating the others."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from camlens.methods.base import CAMMethod, LayerSpec, Step


class RandomCAM(CAMMethod):
    """Uniform random maps in [0, 1) at the feature layer's resolution: the chance level.

    ::

        M_c[i, j] ~ U[0, 1)     independently for every image, target and position

    A localisation or faithfulness metric that does not beat this map measures nothing. The
    maps come from a ``torch.Generator`` seeded with ``seed`` when the method is created and
    advanced by each call: the same seed and the same sequence of batches give the same maps.
    The model still runs once per call (for the targets, logits and the feature shape).
    ``aug_smooth`` does not apply (the maps do not depend on the input: averaging six of them
    would only change the baseline's distribution); ``eigen_smooth`` neither (no weights).
    """

    name = "random"
    volumes = True
    score_targets = True
    aug_smooth_applies = False

    def __init__(
        self, module: nn.Module, layer: LayerSpec = None, *, seed: int = 0, **options: Any
    ) -> None:
        super().__init__(module, layer, **options)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def compute_raw(self, step: Step) -> torch.Tensor:
        shape = (*step.targets.shape, *step.activation.shape[2:])
        return torch.rand(shape, generator=self.generator).to(step.activation.device)
