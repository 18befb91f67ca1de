"""Find the feature layer that feeds global average pooling, and the final linear layer.

One dummy forward pass with temporary hooks on every module records, in the order the modules
finish, what each returns. The classifier is the last ``nn.Linear`` whose output is the
logits; the feature layer is the last module that returns a feature map (N, C, h, w) before
the last global pooling module that precedes the classifier (or before the classifier, when the
pooling is a function such as ``x.mean((2, 3))``). When a container and its last child return the same
tensor, the container finishes last and is chosen (``"layer4"`` rather than
``"layer4.1.relu"``). CAM is exact when the linear layer's input equals the spatial mean of
that feature map (or of its ReLU, as in DenseNet, whose ReLU is a function, not a module).

``cached_cam_head`` remembers what ``find_cam_head`` found, per module and per question, so
that methods built anew for every call (``camlens.explain(model, x, method="cam")``) do not
trace the model again each time; a change of the module's structure invalidates it (see
``module_structure``).
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.hooks import get_layer, preserved_state
from camlens.models.outputs import OutputSpec, select_logits

_SKIPPED = ("Pool", "Flatten", "Identity")


@dataclass(frozen=True)
class CamHead:
    """Where the maps come from in a classifier.

    Attributes:
        feature_layer: qualified name of the layer whose output feeds global average pooling.
        call: which call of that module to capture (-1 = last; shared modules run more than once).
        classifier: qualified name of the final linear layer, or None.
        feature_transform: ``"relu"`` when a functional ReLU sits between the feature layer and
            the pooling, else None.
        cam_exact: whether logits = linear(GAP(features)) holds, so that CAM is exact.
        reason: why CAM is not exact (None when it is).
    """

    feature_layer: str
    call: int
    classifier: str | None
    feature_transform: str | None
    cam_exact: bool
    reason: str | None


@dataclass
class _Call:
    name: str
    module: nn.Module
    index: int
    output: torch.Tensor | None


def find_cam_head(
    module: nn.Module,
    example: torch.Tensor,
    *,
    layer: str | None = None,
    call: int | None = None,
    output: OutputSpec = None,
) -> CamHead:
    """Locate the feature layer and the linear classifier of ``module`` with one forward pass.

    Parameters:
        module: the classifier.
        example: an input batch; only its first image is used.
        layer: force this feature layer (qualified name) instead of searching.
        call: with ``layer``, which call of it to use (default: the last).
        output: how to select the logits from the model's output (see ``select_logits``).

    Returns:
        A ``CamHead``; ``cam_exact`` tells whether CAM applies, ``reason`` why not.

    Raises:
        ConfigError: no layer returns a feature map, or the named layer does not exist.

    Example:
        >>> import torchvision
        >>> head = find_cam_head(torchvision.models.resnet18(), torch.zeros(1, 3, 64, 64))
        >>> head.feature_layer, head.classifier, head.cam_exact
        ('layer4', 'fc', True)
    """
    if layer is not None:
        get_layer(module, layer)
    calls, linear_inputs, logits = _trace(module, example[:1], output)
    classifier = _find_classifier(calls, logits)
    features = _find_features(calls, classifier, layer, call)
    n_calls = sum(1 for c in calls if c.name == features.name)
    call_index = -1 if features.index == n_calls - 1 else features.index
    if classifier is None:
        return CamHead(features.name, call_index, None, None, False, _no_linear_reason(logits))
    transform, reason = _check_gap(features, classifier, linear_inputs[classifier.name])
    return CamHead(features.name, call_index, classifier.name, transform, reason is None, reason)


def _trace(
    module: nn.Module, example: torch.Tensor, output: OutputSpec
) -> tuple[list[_Call], dict[str, torch.Tensor], torch.Tensor]:
    calls: list[_Call] = []
    linear_inputs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def forward_hook(name: str):
        def hook(mod: nn.Module, inputs: object, out: object) -> None:
            index = counts.get(name, 0)
            counts[name] = index + 1
            kept = out.detach().clone() if isinstance(out, torch.Tensor) else None
            calls.append(_Call(name, mod, index, kept))

        return hook

    def linear_hook(name: str):
        def hook(mod: nn.Module, inputs: tuple) -> None:
            linear_inputs[name] = inputs[0].detach().clone()

        return hook

    try:
        for name, sub in module.named_modules():
            if not name:
                continue
            handles.append(sub.register_forward_hook(forward_hook(name)))
            if isinstance(sub, nn.Linear):
                handles.append(sub.register_forward_pre_hook(linear_hook(name)))
        with preserved_state(module), torch.no_grad():
            logits = select_logits(module(example), output)
    finally:
        for handle in handles:
            handle.remove()
    return calls, linear_inputs, logits


def _find_classifier(calls: list[_Call], logits: torch.Tensor) -> _Call | None:
    linears = [c for c in calls if isinstance(c.module, nn.Linear) and c.output is not None]
    for c in reversed(linears):
        if c.output.shape == logits.shape and torch.equal(c.output, logits):
            return c
    return None


def _is_global_pooling(c: _Call) -> bool:
    pooled = c.output is not None and (c.output.ndim == 2 or c.output.shape[-2:] == (1, 1))
    return pooled and "Pool" in type(c.module).__name__


def _is_feature_map(c: _Call) -> bool:
    return (
        c.output is not None
        and c.output.ndim == 4
        and not any(word in type(c.module).__name__ for word in _SKIPPED)
    )


def _find_features(
    calls: list[_Call], classifier: _Call | None, layer: str | None, call: int | None
) -> _Call:
    if layer is not None:
        own = [c for c in calls if c.name == layer]
        if not own:
            raise ConfigError(f"layer {layer!r} did not run in the forward pass")
        chosen = own[-1] if call in (None, -1) else next((c for c in own if c.index == call), None)
        if chosen is None or chosen.output is None or chosen.output.ndim != 4:
            raise ConfigError(
                f"layer {layer!r} (call {call}) does not return a feature map (N, C, h, w); "
                "choose a convolutional layer"
            )
        return chosen
    end = calls.index(classifier) if classifier is not None else len(calls)
    pools = [i for i, c in enumerate(calls[:end]) if _is_global_pooling(c)]
    if pools:
        end = pools[-1]  # the feature map is what the last pooling before the classifier reads
    candidates = [c for c in calls[:end] if _is_feature_map(c)]
    if not candidates:
        raise ConfigError(
            "no layer of this model returns a spatial feature map (N, C, h, w); "
            "class activation maps need a convolutional network"
        )
    return candidates[-1]


def _check_gap(
    features: _Call, classifier: _Call, linear_input: torch.Tensor
) -> tuple[str | None, str | None]:
    activation = features.output
    fc_in = linear_input.reshape(linear_input.shape[0], -1)
    channels = activation.shape[1]
    if fc_in.shape[1] != channels:
        return None, (
            f"the final linear layer {classifier.name!r} takes {fc_in.shape[1]} inputs, but "
            f"{features.name!r} has {channels} channels: the head is not global average pooling "
            "followed by one linear layer, so CAM does not apply; use method='gradcam'"
        )
    scale = float(fc_in.abs().max()) + 1e-12
    for transform, mapped in ((None, activation), ("relu", activation.relu())):
        pooled = mapped.mean(dim=(-2, -1))
        if float((pooled - fc_in).abs().max()) <= 1e-4 * scale:
            return transform, None
    return None, (
        f"the input of the final linear layer {classifier.name!r} is not the global average of "
        f"{features.name!r} (something other than pooling sits between them, e.g. a "
        "normalisation or another layer), so CAM would not be exact; use method='gradcam'"
    )


def _no_linear_reason(logits: torch.Tensor) -> str:
    return (
        f"no nn.Linear layer produces the model's logits (shape {tuple(logits.shape)}), so CAM "
        "has no class weights to use; use method='gradcam'"
    )


# ------------------------------------------------------------------------------ head cache

#: The structure of one submodule: (qualified name, type, its own parameters as
#: (name, shape, dtype, device)).
_ModulePart = tuple[str, type, tuple[tuple[str, torch.Size, torch.dtype, torch.device], ...]]


@dataclass
class _HeadCacheEntry:
    """The heads found for one module while its structure stays ``structure``."""

    structure: tuple[_ModulePart, ...]
    submodules: tuple[weakref.ref, ...]  # identity of each submodule (not its id: ids recycle)
    heads: dict[Hashable, CamHead] = field(default_factory=dict)

    def matches(self, structure: tuple[_ModulePart, ...], submodules: list[nn.Module]) -> bool:
        return self.structure == structure and all(
            ref() is sub for ref, sub in zip(self.submodules, submodules, strict=True)
        )


_MAX_HEADS_PER_MODULE = 64
_HEAD_CACHE: weakref.WeakKeyDictionary[nn.Module, _HeadCacheEntry] = weakref.WeakKeyDictionary()


def module_structure(module: nn.Module) -> tuple[tuple[_ModulePart, ...], list[nn.Module]]:
    """What a cached ``CamHead`` of ``module`` depends on, and its submodules in order.

    The structure is, for every submodule (``named_modules()``, the module itself included):
    its qualified name, its type, and the name, shape, dtype and device of each of its own
    parameters; with the submodules' identities (kept as weak references by the cache) it
    is what "the module changed" means for the cache:

    - changes that invalidate: adding, removing or replacing a submodule (even by one of the
      same type and size, e.g. a new ``nn.Linear`` or ``nn.AdaptiveAvgPool2d``), a parameter
      that is added, removed or given another shape, dtype or device (``module.to(...)``,
      ``fc.weight = nn.Parameter(...)`` of another width);
    - changes that do not: new parameter *values* (training steps, ``load_state_dict``,
      in-place edits), buffers, train/eval flags (heads are always found in eval mode), hooks.
      The head's layers stay the same; CAM's exactness is still verified on every call
      (``CAM.check``, ``MethodResult.identity_error``).
    - changes it cannot see: in-place edits of a submodule's configuration that change its
      computation but no parameter (``pool.output_size = 2``, ``conv.stride = 2``), or a
      replaced ``forward``. Call ``clear_head_cache(module)`` after such an edit.

    Costs one walk over the modules (well under a millisecond for an EfficientNet).
    """
    parts = []
    submodules = []
    for name, sub in module.named_modules():
        submodules.append(sub)
        params = tuple(
            (key, p.shape, p.dtype, p.device) for key, p in sub._parameters.items() if p is not None
        )
        parts.append((name, type(sub), params))
    return tuple(parts), submodules


def cached_cam_head(
    module: nn.Module,
    example: torch.Tensor,
    *,
    layer: str | None = None,
    call: int | None = None,
    output: OutputSpec = None,
) -> CamHead:
    """``find_cam_head(module, example, layer=..., call=..., output=...)``, found once per module
    and reused while the module's structure (``module_structure``) does not change.

    The answer is kept per (module, ``layer``, ``call``, ``output``, the example's shape minus
    the batch, dtype and device); the module is held by a weak reference, so the cache never
    keeps a model alive. Like a method instance reused across calls, the answer comes from the
    first example seen for that key (``find_cam_head`` looks at its first image). Errors
    (``ConfigError``) are not cached. An ``output`` spec that cannot be hashed is never cached.

    Not thread-safe in the sense of "one discovery only": two threads asking at once may both
    trace the model (each gets a correct head; the last one stored wins). Nothing is shared
    between threads but the dictionary, whose single operations are atomic in CPython.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 2))
        >>> x = torch.zeros(1, 3, 8, 8)
        >>> cached_cam_head(net, x) is cached_cam_head(net, x)  # traced once
        True
        >>> net[3] = nn.Linear(4, 5)  # a replaced submodule: traced again
        >>> cached_cam_head(net, x).classifier
        '3'
    """
    key = (layer, call, output, tuple(example.shape[1:]), example.dtype, example.device)
    try:
        hash(key)
    except TypeError:
        return find_cam_head(module, example, layer=layer, call=call, output=output)
    structure, submodules = module_structure(module)
    entry = _HEAD_CACHE.get(module)
    if entry is None or not entry.matches(structure, submodules):
        entry = _HeadCacheEntry(structure, tuple(weakref.ref(sub) for sub in submodules))
        _HEAD_CACHE[module] = entry
    head = entry.heads.get(key)
    if head is None:
        head = find_cam_head(module, example, layer=layer, call=call, output=output)
        if len(entry.heads) >= _MAX_HEADS_PER_MODULE:  # e.g. a new output lambda every call
            entry.heads.clear()
        entry.heads[key] = head
    return head


def clear_head_cache(module: nn.Module | None = None) -> None:
    """Forget the heads ``cached_cam_head`` found for ``module`` (every module: None)."""
    if module is None:
        _HEAD_CACHE.clear()
    else:
        _HEAD_CACHE.pop(module, None)
