"""Find the feature layer that feeds global average pooling, and the final linear layer.

One dummy forward pass with temporary hooks on every module records, in the order the modules
finish, what each returns. The classifier is the last ``nn.Linear`` whose output is the
logits; the feature layer is the last module that returns feature maps before the last global
pooling module that precedes the classifier (or before the classifier, when the pooling is a
function such as ``x.mean((2, 3))`` or timm's ``x[:, 1:].mean(1)``). When a container and its
last child return the same tensor, the container finishes last and is chosen (``"layer4"``
rather than ``"layer4.1.relu"``). CAM is exact when the linear layer's input equals the spatial
mean of that feature map (or of its ReLU, as in DenseNet, whose ReLU is a function, not a
module).

Feature maps are (N, C, h, w), or tokens (N, T, C) and channels-last maps (N, h, w, C) from
vision transformers: ``camlens.tokens.infer_layout`` says which (or refuses), and the
``CamHead`` carries the answer (``layout``) so that every method captures (N, C, h, w) maps.
Transformers whose head reads the class token (ViT, DeiT) give no map at the last layer (the
patch tokens there do not reach the logit): their feature layer is the input of the last
block's attention, the last block's first norm (timm ``blocks[-1].norm1``, torchvision
``encoder.layers[-1].ln_1``), as pytorch-grad-cam's ViT tutorial recommends. Average-pooled
token heads (Swin; timm ViTs with ``global_pool="avg"`` and no ``fc_norm``) are GAP + linear
heads over the token grid: CAM is exact there.

``cached_cam_head`` remembers what ``find_cam_head`` found, per module and per question, so
that methods built anew for every call (``camlens.explain(model, x, method="cam")``) do not
trace the model again each time; a change of the module's structure invalidates it (see
``module_structure``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.hooks import get_layer, preserved_state
from camlens.models.outputs import OutputSpec, select_logits
from camlens.tokens import MAX_PREFIX_TOKENS, Layout, ReshapeLayout, infer_layout

#: Modules never chosen as the feature layer: pooling, flattening, identities and pure
#: permutations (torchvision Swin's ``permute``: the same maps as the layer before it).
_SKIPPED = ("Pool", "Flatten", "Identity", "Permute")

#: What works where CAM does not (the end of every "CAM does not apply" reason).
USE_INSTEAD = (
    "use method='gradcam' (or another gradient method: hirescam, gradcam++, xgradcam, "
    "layercam; or scorecam, ablationcam), and on a timm or torchvision vision transformer "
    "also 'rollout' or 'gradrollout'"
)

#: Transformers whose head reads the class token: (blocks container, the block's first norm):
#: timm, torchvision, Hugging Face ViT and DeiT (transformers 5, then 4).
_ATTENTION_BLOCKS = (
    ("blocks", "norm1"),
    ("encoder.layers", "ln_1"),
    ("vit.layers", "layernorm_before"),
    ("vit.encoder.layer", "layernorm_before"),
    ("deit.layers", "layernorm_before"),
    ("deit.encoder.layer", "layernorm_before"),
)

Reshape = Callable[[torch.Tensor], torch.Tensor]


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
        layout: how the feature layer's output holds its maps (``camlens.tokens.Layout``:
            NCHW, NHWC or tokens; ``ReshapeLayout`` for a user's ``reshape=``); None: the
            output is used as it is, (N, C, h, w).
        layer_calls: how often the feature layer ran in the traced forward pass.
    """

    feature_layer: str
    call: int
    classifier: str | None
    feature_transform: str | None
    cam_exact: bool
    reason: str | None
    layout: Layout | ReshapeLayout | None = None
    layer_calls: int = 1

    @property
    def call_index(self) -> int:
        """The captured call as an index (0 = first), ``call = -1`` resolved to the last: a
        capture of this index copies only that call's output, not every call's."""
        return self.call if self.call >= 0 else self.layer_calls - 1

    def feature_maps(self, output: torch.Tensor) -> torch.Tensor:
        """The (N, C, h, w) maps of the feature layer's ``output``."""
        return output if self.layout is None else self.layout.to_maps(output)


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
    reshape: Reshape | None = None,
) -> CamHead:
    """Locate the feature layer and the linear classifier of ``module`` with one forward pass.

    Parameters:
        module: the classifier.
        example: an input batch; only its first image is used. Token grids depend on its size.
        layer: force this feature layer (qualified name) instead of searching.
        call: with ``layer``, which call of it to use (default: the last).
        output: how to select the logits from the model's output (see ``select_logits``).
        reshape: a function mapping the feature layer's output to (N, C, h, w) maps, for
            layouts camlens does not recognise (``camlens.tokens.ReshapeLayout``).

    Returns:
        A ``CamHead``; ``cam_exact`` tells whether CAM applies, ``reason`` why not.

    Raises:
        ConfigError: no layer returns feature maps, the named layer does not exist, or the
            layer's layout cannot be determined (``camlens.tokens.infer_layout``).

    Example:
        >>> import torchvision
        >>> head = find_cam_head(torchvision.models.resnet18(), torch.zeros(1, 3, 64, 64))
        >>> head.feature_layer, head.classifier, head.cam_exact
        ('layer4', 'fc', True)
    """
    if layer is not None:
        get_layer(module, layer)
    calls, linear_inputs, logits = _trace(module, example[:1], output)
    size = (int(example.shape[-2]), int(example.shape[-1]))
    classifier = _find_classifier(calls, logits)
    features = _find_features(calls, classifier, layer, call)
    layout = _layout(module, calls, features, size, reshape)
    if classifier is None:
        transform, reason = None, _no_linear_reason(logits)
    else:
        transform, reason = _check_gap(
            features, layout, classifier, linear_inputs[classifier.name], calls
        )
    block_input = None if layer is not None or reason is None else _attention_input(module)
    if block_input is not None and features.output.ndim == 3:
        # Not GAP + linear over these tokens (a class-token head, a norm after the pooling,
        # DeiT's two averaged heads): the input of the last block's attention, whose patch
        # tokens still reach the logits.
        features = next(c for c in reversed(calls) if c.name == block_input)
        layout = _layout(module, calls, features, size, reshape)
    n_calls = sum(1 for c in calls if c.name == features.name)
    call_index = -1 if features.index == n_calls - 1 else features.index
    kept = None if layout.kind == "nchw" else layout
    return CamHead(
        features.name,
        call_index,
        None if classifier is None else classifier.name,
        transform,
        reason is None,
        reason,
        kept,
        n_calls,
    )


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
    """Maps (N, C, h, w) or (N, h, w, C), tokens (N, T, C), or a Conv3d model's maps
    (N, C, d, h, w), from a module that computes."""
    return (
        c.output is not None
        and c.output.ndim in (3, 4, 5)
        and not any(word in type(c.module).__name__ for word in _SKIPPED)
    )


def _attention_input(module: nn.Module) -> str | None:
    """The last transformer block's first norm (the input of its attention), when ``module``
    has timm's ``blocks``, torchvision's ``encoder.layers`` or Hugging Face's ViT/DeiT layers; else None."""
    for path, norm in _ATTENTION_BLOCKS:
        try:
            blocks = module.get_submodule(path)
        except AttributeError:
            continue
        children = list(blocks.named_children())
        if children and isinstance(getattr(children[-1][1], norm, None), nn.Module):
            return f"{path}.{children[-1][0]}.{norm}"
    return None


def _layout(
    module: nn.Module,
    calls: list[_Call],
    features: _Call,
    size: tuple[int, int],
    reshape: Reshape | None,
) -> Layout | ReshapeLayout:
    if reshape is not None:
        layout = ReshapeLayout(reshape)
        layout.to_maps(features.output)  # checks the result's shape now, not at explain time
        return layout
    if features.output.ndim == 5:  # Conv3d maps (N, C, d, h, w): channels first, as torch's
        return Layout("nchw", tuple(int(s) for s in features.output.shape[-2:]))
    position = next(i for i, c in enumerate(calls) if c is features)
    earlier = [(c.module, c.output.shape) for c in calls[:position] if c.output is not None]
    return infer_layout(
        module, features.name, features.module, features.output.shape, size, earlier
    )


def _find_features(
    calls: list[_Call], classifier: _Call | None, layer: str | None, call: int | None
) -> _Call:
    if layer is not None:
        own = [c for c in calls if c.name == layer]
        if not own:
            raise ConfigError(f"layer {layer!r} did not run in the forward pass")
        chosen = own[-1] if call in (None, -1) else next((c for c in own if c.index == call), None)
        if chosen is None or chosen.output is None or chosen.output.ndim not in (3, 4, 5):
            shape = None if chosen is None or chosen.output is None else tuple(chosen.output.shape)
            raise ConfigError(
                f"layer {layer!r} (call {call}) returns {shape}, not feature maps (N, C, h, w), "
                "channels-last maps (N, h, w, C) or tokens (N, T, C); choose a convolutional "
                "layer or a transformer block's layer"
            )
        return chosen
    end = calls.index(classifier) if classifier is not None else len(calls)
    pools = [i for i, c in enumerate(calls[:end]) if _is_global_pooling(c)]
    if pools:
        end = pools[-1]  # the feature map is what the last pooling before the classifier reads
    candidates = [c for c in calls[:end] if _is_feature_map(c)]
    if not candidates:
        raise ConfigError(
            "no layer of this model returns feature maps (N, C, h, w) or tokens (N, T, C); "
            "class activation maps need a convolutional network or a vision transformer"
        )
    return candidates[-1]


def _check_gap(
    features: _Call,
    layout: Layout | ReshapeLayout,
    classifier: _Call,
    linear_input: torch.Tensor,
    calls: list[_Call],
) -> tuple[str | None, str | None]:
    activation = layout.to_maps(features.output)
    fc_in = linear_input.reshape(linear_input.shape[0], -1)
    channels = activation.shape[1]
    if fc_in.shape[1] != channels:
        return None, (
            f"the final linear layer {classifier.name!r} takes {fc_in.shape[1]} inputs, but "
            f"{features.name!r} has {channels} channels: the head is not global average pooling "
            f"followed by one linear layer, so CAM does not apply; {USE_INSTEAD}"
        )
    scale = float(fc_in.abs().max()) + 1e-12
    for transform, mapped in ((None, activation), ("relu", activation.relu())):
        pooled = mapped.flatten(2).mean(dim=-1)  # over (h, w), or (d, h, w) for a volume
        if float((pooled - fc_in).abs().max()) <= 1e-4 * scale:
            return transform, None
    between = calls[calls.index(features) + 1 : calls.index(classifier)]
    norm = next((c for c in between if _is_pooled_norm(c)), None)
    if norm is not None:
        return None, (
            f"a normalisation ({norm.name!r}, {type(norm.module).__name__}) sits between the "
            f"average pooling and the final linear layer {classifier.name!r}, as timm's fc_norm "
            "or ConvNeXt's head norm: the logit is not a linear function of the pooled "
            f"features, so CAM would not be exact; {USE_INSTEAD}"
        )
    if features.output.ndim == 3:  # tokens: does the head read one of the first ones?
        tokens = features.output
        for p in range(min(tokens.shape[1], MAX_PREFIX_TOKENS)):
            if float((tokens[:, p] - fc_in).abs().max()) <= 1e-4 * scale:
                return None, (
                    f"the final linear layer {classifier.name!r} reads prefix token {p} (the "
                    f"class token, CLS) of {features.name!r}, not the average of its patch "
                    "tokens: no map over the patches decomposes the logit, so CAM does not "
                    f"apply; {USE_INSTEAD}"
                )
    return None, (
        f"the input of the final linear layer {classifier.name!r} is not the global average of "
        f"{features.name!r} (something other than pooling sits between them, e.g. a "
        f"normalisation or another layer), so CAM would not be exact; {USE_INSTEAD}"
    )


def _is_pooled_norm(c: _Call) -> bool:
    """A normalisation applied to pooled features ((N, C) or (N, C, 1, 1))."""
    pooled = c.output is not None and (c.output.ndim == 2 or c.output.shape[-2:] == (1, 1))
    return pooled and "Norm" in type(c.module).__name__


def _no_linear_reason(logits: torch.Tensor) -> str:
    return (
        f"no nn.Linear layer produces the model's logits (shape {tuple(logits.shape)}), so CAM "
        f"has no class weights to use; {USE_INSTEAD}"
    )


def is_volume_model(module: nn.Module) -> bool:
    """Whether ``module`` reads volumes (N, C, D, H, W): it has an ``nn.Conv3d``.

    Example:
        >>> is_volume_model(nn.Sequential(nn.Conv3d(1, 2, 3))), is_volume_model(nn.Conv2d(1, 2, 3))
        (True, False)
    """
    return any(isinstance(sub, nn.Conv3d) for sub in module.modules())


def volume_input_channels(module: nn.Module) -> int:
    """The input channels of a volume model: those of its first ``nn.Conv3d``.

    Raises:
        ConfigError: the model has no ``nn.Conv3d``.

    Example:
        >>> volume_input_channels(nn.Sequential(nn.Conv3d(1, 2, 3), nn.Conv3d(2, 4, 3)))
        1
    """
    first = next((sub for sub in module.modules() if isinstance(sub, nn.Conv3d)), None)
    if first is None:
        raise ConfigError(
            "this model has no nn.Conv3d layer, so it does not read volumes (N, C, D, H, W); "
            "explain volumes with a 3-D model such as torchvision:r3d_18"
        )
    return int(first.in_channels)


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
    reshape: Reshape | None = None,
) -> CamHead:
    """``find_cam_head(module, example, layer=..., call=..., output=..., reshape=...)``, found
    once per module and reused while the module's structure (``module_structure``) does not
    change.

    The answer is kept per (module, ``layer``, ``call``, ``output``, ``reshape``, the example's
    shape minus
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
    key = (layer, call, output, reshape, tuple(example.shape[1:]), example.dtype, example.device)
    try:
        hash(key)
    except TypeError:
        return find_cam_head(
            module, example, layer=layer, call=call, output=output, reshape=reshape
        )
    structure, submodules = module_structure(module)
    entry = _HEAD_CACHE.get(module)
    if entry is None or not entry.matches(structure, submodules):
        entry = _HeadCacheEntry(structure, tuple(weakref.ref(sub) for sub in submodules))
        _HEAD_CACHE[module] = entry
    head = entry.heads.get(key)
    if head is None:
        head = find_cam_head(
            module, example, layer=layer, call=call, output=output, reshape=reshape
        )
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
