"""Gradient-weighted methods."""

from __future__ import annotations

import torch

from camlens.methods.base import CAMMethod


class GradCAM(CAMMethod):
    """Grad-CAM: channels weighted by the spatial mean of the score's gradient.

    ::

        alpha_k^c = mean_ij( d y_c / d A_k[i, j] )
        M_c[i, j] = sum_k alpha_k^c * A_k[i, j]       (raw map: no ReLU here)

    Works on any CNN layer. On a GAP + linear head ``d y_c / d A_k[i, j] = w_k^c / (h w)``,
    so Grad-CAM equals CAM divided by ``h * w``. The backward pass reaches only down to the
    target layer. ``y_c`` is the logit (pre-softmax score).

    Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: Visual Explanations from
    Deep Networks via Gradient-based Localization", ICCV 2017.
    """

    name = "gradcam"
    needs_gradients = True

    def channel_weights(
        self, activation: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return self.target_gradients(activation, logits, targets).mean(dim=(-2, -1))
