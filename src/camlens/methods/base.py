"""The one place where maps are built: hooks, forward, weighted sum. Methods supply weights.

Contract of every method: ``raw = method(x, targets)`` returns float32 maps (N, K, h, w) at
the feature layer's resolution, *signed and un-normalised*: no ReLU, no upsampling, no
rescaling. ``Explanation.maps`` derives the [0, 1] input-size maps from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.hooks import LayerCapture, get_layer, preserved_state
from camlens.layers import CamHead, find_cam_head
from camlens.outputs import OutputSpec, select_logits
from camlens.targets import Target, resolve_targets


@dataclass
class MethodResult:
    """Everything one call of a method produced.

    Attributes:
        raw: (N, K, h, w) float32 signed maps at feature resolution.
        logits: (N, classes) the model's scores for the batch.
        targets: (N, K) long, the explained classes.
        layer: qualified name of the layer the maps come from.
        identity_error: for CAM, max |mean(M_c) + b_c - y_c| over the batch; else None.
    """

    raw: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    layer: str
    identity_error: float | None = None


class CAMMethod:
    """Base of every map method: subclasses implement ``channel_weights`` only.

    ``raw[n, k] = sum_c weights[n, k, c] * A[n, c]`` where ``A`` is the feature layer's
    output. Hooks are attached for the duration of each call and always removed; the model's
    train/eval flags and ``requires_grad`` are restored; the caller may be inside
    ``torch.no_grad()``.

    Parameters:
        module: the classifier (``nn.Module``).
        layer: qualified name of the feature layer; ``None`` finds the layer that feeds global
            average pooling (see ``camlens.layers.find_cam_head``).
        call: which call of the layer to use when the module runs several times per forward
            (-1, the default, is the last one).
        output: how to pick the logits from the model's output (tuple, dict...).
        labels: class names, for targets given by name.

    Example:
        >>> with GradCAM(model) as method:
        ...     raw = method(x, "top1")
    """

    name: ClassVar[str] = "base"
    needs_gradients: ClassVar[bool] = False

    def __init__(
        self,
        module: nn.Module,
        layer: str | None = None,
        *,
        call: int = -1,
        output: OutputSpec = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{type(self).__name__} needs an nn.Module, got {type(module)}")
        if layer is not None:
            get_layer(module, layer)
        self.module = module
        self.layer = layer
        self.call = call
        self.output = output
        self.labels = labels
        self.head: CamHead | None = None

    def __enter__(self) -> CAMMethod:
        return self

    def __exit__(self, *exc: object) -> None:
        # Hooks live only inside each call; nothing stays attached between calls.
        return None

    def __call__(self, x: torch.Tensor, targets: Target = "top1") -> torch.Tensor:
        return self.run(x, targets).raw

    def run(self, x: torch.Tensor, targets: Target = "top1") -> MethodResult:
        """Compute the raw maps of ``targets`` for the batch ``x`` (N, C, H, W)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ConfigError(
                f"expected an image batch (N, C, H, W), got {getattr(x, 'shape', type(x))}"
            )
        if x.is_inference():
            x = x.clone()
        with preserved_state(self.module):
            head = self.resolve_head(x)
            layer_module = get_layer(self.module, head.feature_layer)
            capture = LayerCapture(
                layer_module, call=head.call, track_gradients=self.needs_gradients
            )
            grad_context = torch.no_grad() if self.needs_gradients else torch.inference_mode()
            with capture, grad_context:
                logits = select_logits(self.module(x), self.output)
            ids = resolve_targets(targets, logits.detach(), self.labels)
            raw = self.compute_raw(x, capture.activation, logits, ids)
        result = MethodResult(
            raw=raw.detach().float(),
            logits=logits.detach(),
            targets=ids,
            layer=head.feature_layer,
        )
        self.check(result)
        return result

    def resolve_head(self, x: torch.Tensor) -> CamHead:
        """Find (once) the feature layer, and the classifier when the method needs it."""
        if self.head is None:
            self.head = find_cam_head(
                self.module, x, layer=self.layer, call=self.call, output=self.output
            )
        return self.head

    def compute_raw(
        self,
        x: torch.Tensor,
        activation: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """(N, K, h, w) raw maps. Default: ``combine(channel_weights, feature_maps)``.

        Methods that are not a channel-weighted sum (element-wise gradients, projections,
        perturbations that need the input ``x``) override this instead of ``channel_weights``.
        """
        weights = self.channel_weights(activation, logits, targets)
        return self.combine(weights, self.feature_maps(activation))

    def feature_maps(self, activation: torch.Tensor) -> torch.Tensor:
        """The maps that the channel weights multiply (the layer's output by default)."""
        return activation

    @staticmethod
    def combine(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
        """Weighted sum over channels: (N, K, C) x (N, C, h, w) -> (N, K, h, w)."""
        return torch.einsum("nkc,nchw->nkhw", weights.to(activation.dtype), activation)

    def channel_weights(
        self, activation: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Return (N, K, C) weights of the channels of ``activation`` for each target."""
        raise NotImplementedError

    def check(self, result: MethodResult) -> None:
        """Hook for methods that verify their result (CAM checks its exactness)."""

    @staticmethod
    def target_gradients(
        activation: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """d y_target / d A for each target: (N, K, C, h, w).

        One backward pass per target column, each reaching only down to ``activation``
        (``torch.autograd.grad`` with respect to the layer output; parameters' ``.grad`` are
        never written).
        """
        if not activation.requires_grad:
            raise ConfigError("gradients were requested but the layer output is not tracked")
        k = targets.shape[1]
        grads = []
        with torch.enable_grad():  # the caller may be inside torch.no_grad()
            for j in range(k):
                score = logits.gather(1, targets[:, j : j + 1]).sum()
                (grad,) = torch.autograd.grad(score, activation, retain_graph=j < k - 1)
                grads.append(grad)
        return torch.stack(grads, dim=1)
