"""Class Activation Mapping (Zhou et al. 2016)."""

from __future__ import annotations

import torch

from camlens.errors import ConfigError
from camlens.hooks import get_layer
from camlens.layers import CamHead
from camlens.methods.base import CAMMethod, MethodResult, Step


class CAM(CAMMethod):
    """Class Activation Mapping: the class's linear weights applied before pooling.

    For a network ending in feature maps ``A_k`` -> global average pooling -> linear layer::

        y_c = sum_k w_k^c * mean_ij(A_k[i, j]) + b_c
        M_c[i, j] = sum_k w_k^c * A_k[i, j]          so that  y_c = mean_ij(M_c) + b_c

    No backward pass is needed. The identity is checked on every call and its largest
    violation over the batch, ``max |mean(M_c) + b_c - y_c|``, is reported as
    ``MethodResult.identity_error`` (float32 rounding only: ~1e-6 relative).

    Zhou, Khosla, Lapedriza, Oliva, Torralba, "Learning Deep Features for Discriminative
    Localization", CVPR 2016.

    Conv3d models (input (N, C, D, H, W), GAP over (d, h, w) + linear) work the same way: the
    maps are (N, K, d, h, w) and the identity holds with the mean over (d, h, w).

    Raises:
        ConfigError: the model's head is not GAP + one linear layer (e.g. VGG); use GradCAM.
    """

    name = "cam"
    volumes = True
    similarity_refusal = (
        "CAM weighs the feature maps with a class's weights in the final linear layer, and a "
        "similarity is not a class"
    )

    def resolve_head(self, x: torch.Tensor) -> CamHead:
        head = super().resolve_head(x)
        if not head.cam_exact:
            raise ConfigError(f"CAM cannot explain this model: {head.reason}")
        return head

    def feature_maps(self, activation: torch.Tensor) -> torch.Tensor:
        return activation.relu() if self.head.feature_transform == "relu" else activation

    def _linear(self) -> torch.nn.Linear:
        return get_layer(self.module, self.head.classifier)

    def channel_weights(self, step: Step) -> torch.Tensor:
        return self._linear().weight.detach()[step.targets]

    def check(self, result: MethodResult) -> None:
        bias = self._linear().bias
        bias = bias.detach()[result.targets].float() if bias is not None else 0.0
        scores = result.logits.gather(1, result.targets).float()
        error = result.raw.flatten(2).mean(dim=-1) + bias - scores
        result.identity_error = float(error.abs().max()) if error.numel() else 0.0
