"""Maps at input resolution from gradients with respect to the input: Guided Backprop,
Guided Grad-CAM and FullGrad.

Unlike the other gradient methods, which differentiate only down to the feature layer
(``CAMMethod.target_gradients``), these differentiate the target's logit ``y_c`` down to the
input image. Their raw maps are (N, K, H, W) float32 at the *input's* resolution (still
un-normalised, and signed for Guided Backprop and Guided Grad-CAM); ``Explanation.maps``
derives the [0, 1] maps from them as for every method. The model's forward pass, the
targets (``camlens.targets.resolve_targets``), ``preserved_state``, smoothing (``smooth``)
and ``aug_smooth`` are those of ``CAMMethod``; ``eigen_smooth`` is refused (no weighted
activations to project). ``MethodResult.layer`` is the feature layer found as for the other
methods (the one Guided Grad-CAM's Grad-CAM uses; Guided Backprop and FullGrad do not use it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from camlens.hooks import ForwardHook
from camlens.methods.base import CAMMethod, LayerSpec, Step
from camlens.models.outputs import select_logits
from camlens.targets import Target, resolve_targets

Explained = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _keep_positive(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


def _guide(output: object) -> object:
    """Make the gradient that reaches a rectifier's output non-negative (a tensor hook), so
    that the rectifier's own backward, which masks its input (``x > 0``, and ``x < 6`` for
    ReLU6), gives the guided gradient ``g * [x > 0] * [g > 0]``. No copy of the output and
    nothing saved: a second hook on the same output changes nothing (clamping is
    idempotent). Outputs outside autograd (no gradient wanted) are left alone."""
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(_keep_positive)
    return output


#: Functions whose result ``_GuidedFunctions`` guides (the functional ReLUs).
GUIDED_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.relu,
        F.relu_,
        F.relu6,
        torch.relu,
        torch.relu_,
        torch.Tensor.relu,
        torch.Tensor.relu_,
    }
)


class _GuidedFunctions(TorchFunctionMode):
    """While active, the result of every functional ReLU call (``GUIDED_FUNCTIONS``) gets the
    guided gradient (``_guide``). Other functions run unchanged."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        return _guide(result) if func in GUIDED_FUNCTIONS else result


class _GuidedModule(ForwardHook):
    """A forward hook on one ``nn.ReLU`` / ``nn.ReLU6`` that gives its output the guided
    gradient (``_guide``; works for in-place ReLUs: the module's own output is kept)."""

    def _hook(self, module: nn.Module, inputs: object, output: object) -> object:
        return _guide(output)


@contextlib.contextmanager
def guided_relus(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the backward pass of every ReLU of ``module`` follows the guided rule.

    Covered: ``nn.ReLU`` and ``nn.ReLU6`` modules (forward hooks), and the functional calls
    ``F.relu``, ``F.relu_``, ``F.relu6``, ``torch.relu``, ``torch.relu_``, ``Tensor.relu``
    and ``Tensor.relu_`` made while the block runs (a ``TorchFunctionMode``) whose result is
    used: an in-place call whose return value is dropped (``x.relu_()`` as a statement) keeps
    the plain gradient, as does a rectifier written otherwise (``clamp``, ``F.hardtanh``,
    ``torch.maximum``, other activations). No module is replaced and nothing is patched: the
    hooks and the mode are removed on exit, also after an exception. Forward values are
    unchanged.
    """
    hooks = [_GuidedModule(m) for m in module.modules() if isinstance(m, nn.ReLU | nn.ReLU6)]
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(hook)
        stack.enter_context(_GuidedFunctions())
        yield module


class _OutputTap(ForwardHook):
    """Keep every output of a layer (each call) in the graph, to differentiate with respect
    to it; the rest of the network receives a copy, so that an in-place operation after the
    layer (an in-place ReLU) cannot change the kept tensor."""

    def reset(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, inputs: object, output: object) -> object:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return output
        self.outputs.append(output)
        return output.clone()


def _gradients(
    logits: torch.Tensor, targets: torch.Tensor, inputs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``d y_target / d t`` for each tensor ``t`` of ``inputs``: one (N, K, ...) float32
    tensor each, one backward pass per target column (parameters' ``.grad`` untouched)."""
    k = targets.shape[1]
    grads: list[list[torch.Tensor]] = [[] for _ in inputs]
    with torch.enable_grad():
        for j in range(k):
            score = logits.gather(1, targets[:, j : j + 1]).sum()
            found = torch.autograd.grad(
                score, list(inputs), retain_graph=j < k - 1, allow_unused=True
            )
            for store, grad, tensor in zip(grads, found, inputs, strict=True):
                store.append(torch.zeros_like(tensor) if grad is None else grad)
    return [torch.stack(g, dim=1).float() for g in grads]


class _InputGradientMethod(CAMMethod):
    """Base of the methods that differentiate down to the input (override ``_explain_once``)."""

    needs_gradients = True
    eigen_smooth_applies = False  # set again by each subclass (``__init_subclass__``)

    def _forward(self, x: torch.Tensor, targets: Target, stack: contextlib.ExitStack) -> Explained:
        """Forward ``x`` as a leaf that requires grad, with whatever ``stack`` holds entered
        (exited before the targets are resolved): ``(leaf, logits, targets)``."""
        leaf = x.detach().requires_grad_(True)
        with stack:
            stack.enter_context(torch.enable_grad())  # the caller may be inside no_grad()
            logits = select_logits(self.module(leaf), self.output)
        return leaf, logits, resolve_targets(targets, logits.detach(), self.labels)

    def guided_gradients(self, x: torch.Tensor, targets: Target) -> Explained:
        """``(g, logits, targets)``: ``g`` the (N, K, C, H, W) float32 guided gradient of each
        target's logit with respect to ``x``, for every image of the batch."""
        stack = contextlib.ExitStack()
        stack.enter_context(guided_relus(self.module))
        leaf, logits, ids = self._forward(x, targets, stack)
        (grads,) = _gradients(logits, ids, [leaf])
        return grads, logits, ids


class GuidedBackprop(_InputGradientMethod):
    """Guided Backpropagation: the input gradient with every ReLU's backward pass guided.

    ::

        backward through a ReLU:  R_in = R_out * [x > 0] * [R_out > 0]     (guided rule)
        G_c     = d^guided y_c / d x                     (N, K, 3, H, W), every image
        M_c     = sum over the colour channels of G_c    (raw map, signed, input resolution)

    A plain gradient passes ``R_out * [x > 0]``; the guided rule also drops the negative
    gradients, so only what increases the score on the way down is kept. ReLUs are guided
    through ``guided_relus`` (``nn.ReLU`` / ``nn.ReLU6`` modules, in-place or not, and the
    functional ReLUs; see there what is covered); no module is replaced. The map is the sum
    over colour channels (the gradient of the score when all channels of a pixel change
    together; linear, so Guided Grad-CAM's map is the sum of its channels too). The full
    gradient of the last call is ``last_guided`` (N, K, C, H, W) float32, for a picture
    (with ``smooth`` / ``aug_smooth``: the last pass's).

    pytorch-grad-cam 1.5.7's ``GuidedBackpropReLUModel`` computes the same gradient for image
    0 of the batch only (H, W, C), replacing the model's ``nn.ReLU`` modules (put back as new
    ``nn.ReLU()``, not in place) and leaving functional ReLUs plain.

    Springenberg, Dosovitskiy, Brox, Riedmiller, "Striving for Simplicity: The All
    Convolutional Net", ICLR workshop 2015.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        >>> method = GuidedBackprop(model)
        >>> method(torch.rand(2, 3, 16, 16), "top2").shape  # input resolution
        torch.Size([2, 2, 16, 16])
        >>> method.last_guided.shape
        torch.Size([2, 2, 3, 16, 16])
    """

    name = "guidedbackprop"
    eigen_smooth_applies = False

    def __init__(self, module: nn.Module, layer: LayerSpec = None, **options: Any) -> None:
        super().__init__(module, layer, **options)
        self.last_guided: torch.Tensor | None = None

    def _explain_once(self, x: torch.Tensor, targets: Target) -> Explained:
        grads, logits, ids = self.guided_gradients(x, targets)
        self.last_guided = grads.detach()
        return grads.sum(dim=2), logits, ids

    def picture_gradients(self) -> torch.Tensor | None:
        """(N, K, C, H, W) what the picture of the last call shows (``explain`` writes it as
        ``guided/<image>_c<class>.png``): the guided gradient; None before any call."""
        return self.last_guided


class GuidedGradCAM(GuidedBackprop):
    """Guided Grad-CAM: Guided Backprop times the (positive) Grad-CAM map, pixel by pixel.

    ::

        L_c   = relu(Grad-CAM map of c), upsampled bilinearly to the input size
        M_c   = sum over the colour channels of (G_c * L_c)       (raw map, signed)

    with ``G_c`` the guided gradient (``GuidedBackprop``). Grad-CAM comes from the feature
    layer (``layer``, found as for Grad-CAM) in a plain forward and backward pass, the guided
    gradient from a second pass with guided ReLUs, for the same targets. After a call
    ``last_guided`` is the (N, K, C, H, W) guided gradient and ``last_cam`` the (N, K, H, W)
    upsampled ``relu`` Grad-CAM: the paper's colour picture is
    ``last_guided * last_cam[:, :, None]``.

    pytorch-grad-cam 1.5.7 has no Guided Grad-CAM class; its example multiplies its
    ``GuidedBackpropReLUModel`` gradient (image 0) by its Grad-CAM map after min-max scaling
    (``scale_cam_image``), which rescales each map by a positive constant and removes its
    minimum (0 whenever the map has a zero, as a ReLU map usually has).

    Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: Visual Explanations from
    Deep Networks via Gradient-based Localization", ICCV 2017.
    """

    name = "guidedgradcam"
    eigen_smooth_applies = False

    def __init__(self, module: nn.Module, layer: LayerSpec = None, **options: Any) -> None:
        super().__init__(module, layer, **options)
        self.last_cam: torch.Tensor | None = None

    def channel_weights(self, step: Step) -> torch.Tensor:
        """Grad-CAM's: the spatial mean of the gradient at the feature layer."""
        grads = self.target_gradients(step.activation, step.logits, step.targets)
        return grads.float().mean(dim=(-2, -1))

    def compute_raw(self, step: Step) -> torch.Tensor:
        return self.combine(self.channel_weights(step), step.activation.detach().float())

    def _explain_once(self, x: torch.Tensor, targets: Target) -> Explained:
        cam, logits, ids = CAMMethod._explain_once(self, x, targets)  # Grad-CAM, base hooks
        grads = self.guided_gradients(x, ids)[0]
        n, k, h, w = cam.shape
        upsampled = F.interpolate(
            cam.relu().reshape(n * k, 1, h, w),
            size=tuple(x.shape[-2:]),
            mode="bilinear",
            align_corners=False,
        ).reshape(n, k, *x.shape[-2:])
        self.last_guided, self.last_cam = grads.detach(), upsampled
        return (grads * upsampled[:, :, None]).sum(dim=2), logits, ids

    def picture_gradients(self) -> torch.Tensor | None:
        """(N, K, C, H, W) the paper's Guided Grad-CAM picture of the last call: the guided
        gradient times the upsampled Grad-CAM map; None before any call."""
        if self.last_guided is None or self.last_cam is None:
            return None
        return self.last_guided * self.last_cam[:, :, None]


#: Added to the range in FullGrad's min-max scaling, as pytorch-grad-cam (the authors' code:
#: 1e-6): a map whose values differ by float rounding only is not blown up to [0, 1].
MINMAX_EPS = 1e-7


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map of ``maps`` (..., h, w) scaled to ``(m - min) / (max - min + eps)``
    (``MINMAX_EPS``, pytorch-grad-cam's ``scale_cam_image``); a constant map becomes 0."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    shifted = maps - low
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + MINMAX_EPS)


def _resize(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, K, h, w) -> (N, K, *size), bilinear (align_corners=False, cv2.resize's grid)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    n, k, h, w = maps.shape
    return F.interpolate(
        maps.reshape(n * k, 1, h, w), size=tuple(size), mode="bilinear", align_corners=False
    ).reshape(n, k, *size)


def effective_bias(layer: nn.Module) -> torch.Tensor:
    """The per-channel bias that ``layer`` (``nn.Conv2d`` or ``nn.BatchNorm2d``) adds in eval
    mode: the conv's bias; for batch norm ``beta - running_mean * gamma / sqrt(var + eps)``
    (``beta`` alone without running statistics), as FullGrad's authors and pytorch-grad-cam."""
    bias = layer.bias.detach().float()
    if isinstance(layer, nn.BatchNorm2d) and layer.running_mean is not None:
        gamma = layer.weight.detach().float() if layer.weight is not None else 1.0
        scale = gamma / torch.sqrt(layer.running_var.float() + layer.eps)
        bias = bias - layer.running_mean.float() * scale
    return bias


class FullGrad(_InputGradientMethod):
    """FullGrad: the input-gradient map plus the bias-gradient map of every bias layer.

    ::

        S_c = psi( |x * d y_c / d x| )                                  (input term)
            + sum over bias layers l, and over l's channels k:
                  psi( |b_lk * d y_c / d z_lk| )                        (bias terms)

    where ``z_l`` is the output of layer ``l`` (every ``nn.Conv2d`` and ``nn.BatchNorm2d``
    that has a bias; batch norm's effective bias in eval mode, see ``effective_bias``; a layer
    that runs several times contributes one term per call), and ``psi`` min-max normalises
    each (image, channel) map to [0, 1] (``(m - min) / (max - min + 1e-7)``, a constant map
    gives 0; see ``MINMAX_EPS``) and upsamples it bilinearly
    to the input size. The input term is normalised per colour channel and summed over them.
    The raw map (N, K, H, W) is non-negative and at the input's resolution. The sum over
    channels is taken before upsampling, which is the same (bilinear upsampling is linear).

    This is pytorch-grad-cam 1.5.7's ``FullGrad`` (``fullgrad_cam.py``): same bias layers,
    same effective biases, same per-(image, channel) min-max with the same epsilon, bilinear
    resizing (cv2's grid, checked equal) and the same sum. It then min-max scales the final
    map (``scale_cam_image``), which ``Explanation.maps`` does not (it divides by the maximum;
    the minimum of the sum is usually above 0): compare after min-max. It explains one
    target per image, camlens any ``K``. The authors' code (idiap/fullgrad-saliency)
    normalises each layer's map over all its channels at once (epsilon 1e-6) instead of
    channel by channel.

    Srinivas, Fleuret, "Full-Gradient Representation for Neural-Network Visualization",
    NeurIPS 2019.
    """

    name = "fullgrad"
    eigen_smooth_applies = False

    def bias_layers(self) -> list[nn.Module]:
        """The layers whose biases FullGrad uses (pytorch-grad-cam's choice), in module order."""
        return [
            m
            for m in self.module.modules()
            if isinstance(m, nn.Conv2d | nn.BatchNorm2d) and m.bias is not None
        ]

    def _explain_once(self, x: torch.Tensor, targets: Target) -> Explained:
        taps = [_OutputTap(layer) for layer in self.bias_layers()]
        stack = contextlib.ExitStack()
        for tap in taps:
            stack.enter_context(tap)
        leaf, logits, ids = self._forward(x, targets, stack)
        outputs = [(tap.layer, out) for tap in taps for out in tap.outputs]
        grads = _gradients(logits, ids, [leaf, *(out for _, out in outputs)])
        size = x.shape[-2:]
        total = _minmax((grads[0] * leaf.detach().float()[:, None]).abs()).sum(dim=2)
        for (layer, _), grad in zip(outputs, grads[1:], strict=True):
            bias = effective_bias(layer).to(grad.device)[:, None, None]
            maps = _minmax((grad * bias).abs()).sum(dim=2)
            total = total + _resize(maps, size)
        return total, logits, ids
