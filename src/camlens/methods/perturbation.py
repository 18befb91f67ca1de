"""Perturbation methods: Score-CAM and Ablation-CAM weigh channels by extra forward passes.

Both run one forward pass per (image, channel) pair, streamed in chunks of ``batch_size``
inputs through one reused input buffer, under ``torch.inference_mode``: peak memory is that
of one chunk, whatever the number of channels and images. ``max_channels=M`` keeps, per
image, the M channels with the highest mean activation (the others get weight 0), as in
"faster Score-CAM"; it divides the number of forward passes by C / M.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camlens.batching import chunks
from camlens.errors import ConfigError
from camlens.hooks import ForwardHook, get_layer
from camlens.methods.base import CAMMethod, LayerSpec, Step
from camlens.models.outputs import select_logits
from camlens.tokens import Layout, ReshapeLayout


class PerturbationMethod(CAMMethod):
    """Shared machinery of Score-CAM and Ablation-CAM (chunking, channel selection).

    Parameters:
        module, layer, call, output, labels: as for every ``CAMMethod``.
        batch_size: perturbed inputs per forward pass (bounds the peak memory).
        max_channels: per image, perturb only the channels with the highest spatial mean
            activation (None: all channels).
    """

    score_targets = True

    def __init__(
        self,
        module: nn.Module,
        layer: LayerSpec = None,
        *,
        batch_size: int = 32,
        max_channels: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(module, layer, **options)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_channels is not None and max_channels < 1:
            raise ConfigError(f"max_channels must be >= 1 or None, got {max_channels}")
        self.batch_size = batch_size
        self.max_channels = max_channels

    def selected_pairs(self, activation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, channel) index pairs to perturb, as two flat long tensors."""
        n, c = activation.shape[:2]
        if self.max_channels is None or self.max_channels >= c:
            channels = torch.arange(c, device=activation.device).expand(n, c)
        else:
            means = activation.float().mean(dim=(-2, -1))
            channels = means.topk(self.max_channels, dim=1).indices
        images = torch.arange(n, device=activation.device)[:, None].expand_as(channels)
        return images.reshape(-1), channels.reshape(-1)

    def input_buffer(self, x: torch.Tensor, pairs: int) -> torch.Tensor:
        """One reusable (min(batch_size, pairs), C, H, W) buffer for perturbed inputs."""
        return x.new_empty((max(1, min(self.batch_size, pairs)), *x.shape[1:]))

    def perturbed_batches(
        self, x: torch.Tensor, images: torch.Tensor, channels: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(image, channel, inputs)`` for each chunk of at most ``batch_size`` pairs.

        ``inputs`` holds the chunk's images ``x[image]``, copied into one buffer reused by every
        chunk (``input_buffer``): the caller may perturb it in place before ``scores``.
        """
        buffer = self.input_buffer(x, len(images))
        for part in chunks(range(len(images)), self.batch_size):
            image = images[part]
            yield image, channels[part], torch.index_select(x, 0, image, out=buffer[: len(image)])

    def scores(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's float32 logits for a chunk of perturbed inputs."""
        return select_logits(self.module(inputs), self.output).float()

    def target_scores(
        self, inputs: torch.Tensor, targets: torch.Tensor, step: Step
    ) -> torch.Tensor:
        """(B, K) float32 scores of a chunk of perturbed inputs: the targets' logits, or for
        a similarity target (``step.similarity``) ``cos(e(inputs), e(reference))``."""
        if step.similarity is None:
            return self.scores(inputs).gather(1, targets)
        return self.similarity_of(inputs, step.similarity)


class ScoreCAM(PerturbationMethod):
    """Score-CAM: each channel, used as a mask on the input, is weighted by the class's
    probability for that masked input.

    ::

        H_k       = (U(A_k) - min U(A_k)) / (max U(A_k) - min U(A_k))   U: bilinear upsampling
        w_k^c     = softmax( f(X * H_k) )_c                             (probability of class c)
        M_c[i, j] = sum_k w_k^c * A_k[i, j]                             (raw map: no ReLU)

    As in the authors' code (github.com/haofanwang/Score-CAM): upsampling first, then min-max
    normalisation of each channel; a constant channel is skipped (weight 0); the weight is
    the softmax probability of the target class. The paper's "increase of confidence"
    subtracts the score of a baseline image, ``f(X * H_k) - f(X_b)``; the authors' code does
    not, and neither does camlens. Since bilinear upsampling is linear, the raw map at
    feature resolution upsamples to the authors' input-size map before its final ReLU.
    pytorch-grad-cam and torchcam instead take a softmax over *channels* of the target's
    logits (torchcam also normalises before upsampling, pytorch-grad-cam upsamples with
    ``align_corners=True``); those weights are the authors' up to a per-class constant
    only for a model whose logits are log-probabilities.

    Cost: one forward pass per (image, channel), or per (image, kept channel) with
    ``max_channels``; all targets of an image share them.

    A similarity target (``camlens.targets.Similarity``) replaces the class probability by
    the similarity of the masked input: ``w_k = cos(e(X * H_k), e(r))``; a detector's or
    segmenter's target (``camlens.models.dense.TargetScores``) by its score on the masked
    input (the matched detection's score, the region's summed logits).

    Wang, Wang, Du, Yang, Zhang, Ding, Mardziel, Hu, "Score-CAM: Score-Weighted Visual
    Explanations for Convolutional Neural Networks", CVPR Workshops 2020.
    """

    name = "scorecam"

    def compute_raw(self, step: Step) -> torch.Tensor:
        x, targets = step.x, step.targets
        with torch.inference_mode():
            maps = step.activation.float()
            images, channels = self.selected_pairs(maps)
            varies = (maps.amax(dim=(-2, -1)) > maps.amin(dim=(-2, -1)))[images, channels]
            images, channels = images[varies], channels[varies]
            weights = maps.new_zeros((*targets.shape, maps.shape[1]))
            for image, channel, inputs in self.perturbed_batches(x, images, channels):
                masks = self._masks(maps[image, channel], x.shape[-2:]).to(x.dtype)
                if step.similarity is None:
                    scores = self.scores(inputs.mul_(masks))
                    if not getattr(self.module, "outputs_are_scores", False):
                        scores = scores.softmax(dim=1)
                    weights[image, :, channel] = scores.gather(1, targets[image])
                else:  # the similarity of the masked input is the weight
                    masked = inputs.mul_(masks)
                    weights[image, :, channel] = self.similarity_of(masked, step.similarity)
            return self.combine(weights, maps)

    @staticmethod
    def _masks(maps: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """(B, h, w) channel maps -> (B, 1, H, W) masks in [0, 1] (upsample, then min-max)."""
        masks = F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)
        low = masks.amin(dim=(-2, -1), keepdim=True)
        span = masks.amax(dim=(-2, -1), keepdim=True) - low
        return (masks - low) / span.clamp_min(torch.finfo(masks.dtype).tiny)


class AblationCAM(PerturbationMethod):
    """Ablation-CAM: a channel's weight is the relative drop of the class score when that
    channel is zeroed.

    ::

        w_k^c     = (y_c - y_c^(k)) / y_c        y_c^(k): the logit with A_k set to 0
        M_c[i, j] = sum_k w_k^c * A_k[i, j]      (raw map: no ReLU)

    The channel is zeroed by a temporary forward hook on the feature layer (the model is
    never edited; the hook is removed on exit, also after an error). Where ``y_c = 0`` the
    division is skipped (``w = -y_c^(k)``; a per-class factor that does not change the
    normalised map). pytorch-grad-cam instead replaces the channel by ``min(A) - 1e7`` when
    the layer's minimum is not 0 (signed activations such as Swish); camlens zeroes, as the
    paper does. y_c is the logit; for a similarity target (``camlens.targets.Similarity``) it
    is the similarity ``cos(e(X), e(r))``, and ``y_c^(k)`` that of the ablated forward pass.

    Desai, Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via
    Gradient-free Localization", WACV 2020.
    """

    name = "ablationcam"

    def compute_raw(self, step: Step) -> torch.Tensor:
        x, activation, targets = step.x, step.activation, step.targets
        call = self.head.call if self.head.call >= 0 else self.layer_calls - 1
        layer = get_layer(self.module, self.head.feature_layer)
        ablation = _ChannelAblation(layer, call, self.head.layout)
        with torch.inference_mode(), ablation:
            base = step.logits.float().gather(1, targets) if step.scores is None else step.scores
            images, channels = self.selected_pairs(activation)
            weights = base.new_zeros((*targets.shape, activation.shape[1]))
            keep = activation.new_ones(
                (min(self.batch_size, len(images)), activation.shape[1], 1, 1)
            )
            for image, channel, inputs in self.perturbed_batches(x, images, channels):
                mask = keep[: len(image)].fill_(1)
                mask[torch.arange(len(image), device=mask.device), channel] = 0
                ablation.arm(mask)
                dropped = self.target_scores(inputs, targets[image], step)
                weights[image, :, channel] = base[image] - dropped
            scale = torch.where(base != 0, base, torch.ones_like(base))
            return self.combine(weights / scale[..., None], activation.float())


class _ChannelAblation(ForwardHook):
    """Forward hook that multiplies one call's output of ``layer`` by a (B, C, 1, 1) mask.

    ``arm(mask)`` before each forward pass sets the mask and restarts the call count; the hook
    is attached on entry and removed on exit (``ForwardHook``). With a ``layout`` (tokens or
    channels-last maps, ``camlens.tokens``), the mask multiplies the layer's (N, C, h, w) maps.
    """

    def __init__(
        self, layer: nn.Module, call: int, layout: Layout | ReshapeLayout | None = None
    ) -> None:
        super().__init__(layer)
        self.call = call
        self.layout = layout
        self.mask: torch.Tensor | None = None
        self.calls = 0

    def arm(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.calls = 0

    def _hook(self, module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        index = self.calls
        self.calls += 1
        if index != self.call:
            return output
        if self.layout is None:
            return output * self.mask.to(output.dtype)
        maps = self.layout.to_maps(output)
        return self.layout.from_maps(maps * self.mask.to(maps.dtype), output)
