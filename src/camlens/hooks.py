"""Capture a layer's activations (and let gradients reach them) without side effects.

Everything here is a context manager that attaches what it needs on entry and always
detaches or restores it on exit, also when the forward pass raises (as zennit does).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from typing import Self

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.tokens import Layout, ReshapeLayout


def get_layer(module: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (a qualified name such as ``"layer4.1.conv2"``).

    Raises:
        ConfigError: no such layer; the message lists the closest names.
    """
    modules = dict(module.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise ConfigError(
        f"the model has no layer named {name!r}.{hint} "
        "List all names with `[n for n, _ in model.named_modules()]`."
    )


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the duration; restore every train/eval flag and
    every parameter's ``requires_grad`` afterwards, also after an exception."""
    training = {m: m.training for m in module.modules()}
    requires_grad = {p: p.requires_grad for p in module.parameters()}
    module.eval()
    try:
        yield module
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)


class ForwardHook:
    """Base of the context managers that attach one forward hook to ``layer``.

    Entering calls ``reset()`` and registers ``_hook`` (which subclasses implement, with the
    signature of ``nn.Module.register_forward_hook``); exiting always removes the hook, also
    when the forward pass raised.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: nn.Module, inputs: object, output: object) -> object:
        raise NotImplementedError

    def reset(self) -> None:
        """Clear per-use state before the hook is attached (nothing by default)."""

    def __enter__(self) -> Self:
        self.reset()
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class LayerCapture(ForwardHook):
    """Record the output of ``layer`` on one of its calls during a forward pass.

    A module may run more than once in one forward (a shared activation module, a reused
    ReLU). ``call=-1`` keeps the last call, which is the one nearest the classifier; any other
    index selects that call (0 = first).

    The captured tensor is protected from in-place operations after the layer (an in-place
    ReLU would otherwise overwrite it): the rest of the network receives a copy.

    With ``layout`` (a ``camlens.tokens.Layout``: tokens (N, T, C) or channels-last maps
    (N, h, w, C)) the captured tensor is the layer's (N, C, h, w) feature maps
    (``layout.to_maps(output)``), and the rest of the network receives the output rebuilt from
    them (``layout.from_maps``), so that gradients with respect to the maps are the gradients
    of the layer's output, rearranged.

    With ``track_gradients=True`` the captured tensor becomes a leaf that requires grad, and
    grad mode is switched on from this layer onwards, so ``torch.autograd.grad`` of the logits
    with respect to ``capture.activation`` reaches only as deep as this layer, even when the
    forward runs under ``torch.no_grad()``. Parameters' ``.grad`` are never touched.

    Example:
        >>> import torchvision
        >>> model, x = torchvision.models.resnet18().eval(), torch.rand(1, 3, 224, 224)
        >>> with LayerCapture(model.layer4) as capture, torch.no_grad():
        ...     logits = model(x)
        >>> capture.activation.shape
        torch.Size([1, 512, 7, 7])
        >>> len(model.layer4._forward_hooks)  # the hook is gone
        0
    """

    def __init__(
        self,
        layer: nn.Module,
        *,
        call: int = -1,
        track_gradients: bool = False,
        layout: Layout | ReshapeLayout | None = None,
    ):
        if call < -1:
            raise ConfigError(f"call must be -1 (the last call) or >= 0, got {call}")
        super().__init__(layer)
        self.call = call
        self.track_gradients = track_gradients
        self.layout = layout
        self.n_calls = 0
        self._outputs: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, inputs: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"layer {type(module).__name__} returns {type(output).__name__}, not a tensor; "
                "choose a layer whose output is a feature map (N, C, h, w) or tokens (N, T, C)"
            )
        index = self.n_calls
        self.n_calls += 1
        if self.call >= 0 and index != self.call:
            return output
        maps = output if self.layout is None else self.layout.to_maps(output)
        if self.track_gradients:
            torch.set_grad_enabled(True)
            captured = maps.detach().requires_grad_(True)
        else:
            captured = maps
        self._outputs = [captured]
        if self.layout is None:
            return captured.clone()
        return self.layout.from_maps(captured, output)

    @property
    def activation(self) -> torch.Tensor:
        """The captured output of the selected call."""
        if not self._outputs:
            raise ConfigError(
                f"call {self.call} of layer {type(self.layer).__name__} was requested, but it "
                f"ran {self.n_calls} time(s) in the forward pass; check the layer name and call"
            )
        return self._outputs[0]

    def reset(self) -> None:
        self.n_calls = 0
        self._outputs = []
