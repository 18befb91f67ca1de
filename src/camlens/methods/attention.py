"""Transformer-native maps: attention rollout and gradient-weighted attention rollout.

Both read the attention probabilities ``A_b`` (N, heads, T, T) of every self-attention block
``b`` of a vision transformer and follow them from the class token back to the patch tokens;
the map is the class token's row over the patch tokens, on the token grid (h, w) (raw, at
token resolution, like every method's raw maps; ``Explanation.maps`` upsamples them).

Where the probabilities come from (``AttentionCapture``, a context manager that always
removes its hooks and restores what it changed):

- timm's ``Attention`` and the modules that follow its protocol (a ``fused_attn`` flag and an
  ``attn_drop`` module applied to the softmax probabilities, e.g. ViT, DeiT, EVA): the fused
  kernel (``F.scaled_dot_product_attention``) never materialises them, so ``fused_attn`` is
  set to False for the duration (the explicit softmax path computes the same values) and a
  forward hook on ``attn_drop`` records its output, the tensor that multiplies the values.
- ``nn.MultiheadAttention`` (torchvision's ``EncoderBlock`` calls it with
  ``need_weights=False``): a forward hook recomputes the attention from the module's inputs
  and its ``in_proj`` weights, ``A = softmax(Q K^T / sqrt(d))``, recomputes the output
  ``out_proj(A V)``, checks that it equals the module's own output (else refuses) and passes
  it on, so that gradients reach ``A``.

Gradients: the forward runs under ``torch.no_grad()``; a pre-hook on the first attention
module switches grad mode on and makes its input a leaf, so the backward pass reaches only as
deep as the first block (parameters' ``.grad`` are never written).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import nn

from camlens.errors import ConfigError
from camlens.layers import CamHead
from camlens.methods.base import CAMMethod, LayerSpec
from camlens.models.outputs import select_logits
from camlens.targets import Target, resolve_targets
from camlens.tokens import token_layout

_FUSIONS = ("mean", "max", "min")


@dataclass(frozen=True)
class AttentionModule:
    """One self-attention module: its qualified name, the module, and how it is read
    (``"timm"``: ``fused_attn`` off, hook on ``attn_drop``; ``"mha"``: recomputed)."""

    name: str
    module: nn.Module
    kind: str


def find_attention(model: nn.Module) -> list[AttentionModule]:
    """The self-attention modules of ``model``, in ``named_modules`` order.

    Raises:
        ConfigError: the model has none (a CNN, or attention camlens cannot read).
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            found.append(AttentionModule(name, module, "mha"))
        elif isinstance(getattr(module, "attn_drop", None), nn.Module) and isinstance(
            getattr(module, "fused_attn", None), bool
        ):
            found.append(AttentionModule(name, module, "timm"))
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no self-attention layer that camlens can read "
            "(timm's Attention, with fused_attn and attn_drop, or nn.MultiheadAttention): "
            "attention rollout needs a vision transformer (ViT, DeiT); for a convolutional "
            "network use method='gradcam' or 'cam'"
        )
    return found


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` has a self-attention module that ``find_attention`` can read."""
    try:
        find_attention(model)
    except ConfigError:
        return False
    return True


class AttentionCapture:
    """Record the attention probabilities (N, heads, T, T) of every attention module during
    one forward pass, in the order they run (``attentions``).

    With ``track_gradients`` they stay in the autograd graph (grad mode is switched on at the
    first attention module, whose input becomes a leaf), so that ``torch.autograd.grad`` of a
    logit with respect to them works even when the forward runs under ``torch.no_grad()``.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", depth=2).eval()
        >>> with AttentionCapture(model) as capture, torch.no_grad():
        ...     _ = model(torch.rand(1, 3, 224, 224))
        >>> [tuple(a.shape) for a in capture.attentions]
        [(1, 3, 197, 197), (1, 3, 197, 197)]
        >>> "fused_attn" in vars(model.blocks[0].attn)  # restored: the module's own flag again
        True
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[AttentionModule] | None = None,
        *,
        track_gradients: bool = False,
    ) -> None:
        self.model = model
        self.modules = list(modules) if modules is not None else find_attention(model)
        self.track_gradients = track_gradients
        self.attentions: list[torch.Tensor] = []
        self.names: list[str] = []
        self._stack: contextlib.ExitStack | None = None
        self._started = False

    def __enter__(self) -> Self:
        self.attentions, self.names, self._started = [], [], False
        stack = contextlib.ExitStack()
        try:
            for entry in self.modules:
                module = entry.module
                if self.track_gradients:
                    handle = module.register_forward_pre_hook(self._start, with_kwargs=True)
                    stack.callback(handle.remove)
                if entry.kind == "timm":
                    stack.enter_context(_unfused(module))
                    handle = module.attn_drop.register_forward_hook(self._recorder(entry.name))
                else:
                    handle = module.register_forward_hook(
                        self._recomputer(entry.name), with_kwargs=True
                    )
                stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """First attention module to run: grad mode on, its tensor inputs become one leaf each."""
        if self._started:
            return None
        self._started = True
        torch.set_grad_enabled(True)
        leaves: dict[int, torch.Tensor] = {}

        def leaf(value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                return value
            if id(value) not in leaves:
                leaves[id(value)] = value.detach().requires_grad_(True)
            return leaves[id(value)]

        return tuple(leaf(a) for a in args), {k: leaf(v) for k, v in kwargs.items()}

    def _recorder(self, name: str):
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor | None:
            constant = self.track_gradients and not output.requires_grad
            if constant:  # attention that does not depend on the input: its own leaf
                output = output.detach().requires_grad_(True)
            self.names.append(name)
            self.attentions.append(output)
            return output if constant else None

        return hook

    def _recomputer(self, name: str):
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> Any:
            attention, recomputed = _recompute_mha(module, name, args, kwargs, output)
            self.names.append(name)
            self.attentions.append(attention)
            return (recomputed, *output[1:]) if self.track_gradients else None

        return hook


@contextlib.contextmanager
def _unfused(module: nn.Module) -> Iterator[None]:
    """``module.fused_attn = False`` for the duration; its own value restored afterwards."""
    had_own = "fused_attn" in vars(module)
    before = module.fused_attn
    module.fused_attn = False
    try:
        yield
    finally:
        if had_own:
            module.fused_attn = before
        else:
            del module.fused_attn


def _recompute_mha(
    module: nn.MultiheadAttention, name: str, args: tuple, kwargs: dict, output: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (N, heads, T, S), the module's output recomputed from A) for one call."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
    given = {n: args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)}
    query, key, value = given["query"], given["key"], given["value"]
    unsupported = [
        what
        for what, present in (
            ("attn_mask", given["attn_mask"] is not None),
            ("key_padding_mask", given["key_padding_mask"] is not None),
            ("bias_k/bias_v", module.bias_k is not None),
            ("add_zero_attn", module.add_zero_attn),
            ("is_causal", bool(kwargs.get("is_causal", False))),
        )
        if present
    ]
    if unsupported or query is None or key is None or value is None or query.ndim != 3:
        raise ConfigError(
            f"attention {name!r} (nn.MultiheadAttention) is called with "
            f"{', '.join(unsupported) or 'inputs other than (N, T, C) query, key, value'}; "
            "camlens recomputes plain self-attention only, so it cannot read its attention"
        )
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    heads, dim = module.num_heads, module.embed_dim
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)

    def split(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        projected = F.linear(t, w, b)
        return projected.unflatten(-1, (heads, dim // heads)).transpose(1, 2)  # (N, h, T, d)

    q, k, v = (split(t, w, b) for t, w, b in zip((query, key, value), weights, biases, strict=True))
    attention = (q @ k.transpose(-2, -1) / math.sqrt(dim // heads)).softmax(dim=-1)
    mixed = (attention @ v).transpose(1, 2).flatten(2)
    recomputed = module.out_proj(mixed)
    own = output[0] if isinstance(output, tuple) else output
    own = own if module.batch_first else own.transpose(0, 1)
    scale = float(own.detach().abs().max()) + 1e-12
    tolerance = 1e-4 if own.dtype in (torch.float32, torch.float64) else 2e-2
    if float((recomputed.detach() - own.detach()).abs().max()) > tolerance * scale:
        raise ConfigError(
            f"attention {name!r} (nn.MultiheadAttention): recomputing softmax(Q K^T / sqrt(d)) "
            "from its in_proj weights does not give its output (a modified attention?), so "
            "camlens cannot read its attention probabilities"
        )
    if not module.batch_first:
        recomputed = recomputed.transpose(0, 1)
    return attention, recomputed


# --------------------------------------------------------------------------------- methods


class AttentionMethod(CAMMethod):
    """Base of the methods that read attention instead of a feature layer.

    Subclasses supply ``relevance(attentions, logits, targets)``: (N, K, T, T) token-to-token
    relevance, whose class-token row over the patch tokens is the map. Hooks, grad mode, the
    token grid (``camlens.tokens.token_layout``: from the token count, the input size and the
    prefix tokens the model declares) and smoothing are shared. ``layer`` is not used (every
    attention block counts); ``MethodResult.layer`` names the attention modules, joined by
    commas.
    """

    eigen_smooth_applies: ClassVar[bool] = False

    def __init__(
        self,
        module: nn.Module,
        layer: LayerSpec = None,
        *,
        head_fusion: str = "mean",
        **options: Any,
    ) -> None:
        if head_fusion not in _FUSIONS:
            raise ConfigError(
                f"head_fusion must be one of {', '.join(_FUSIONS)}, got {head_fusion!r}"
            )
        if options.get("reshape") is not None:
            raise ConfigError(
                f"{self.name} reads attention, not a layer's feature maps: reshape= does not apply"
            )
        super().__init__(module, None, **options)
        self.head_fusion = head_fusion
        self.attention = find_attention(module)

    def resolve_heads(self, x: torch.Tensor) -> list[CamHead]:
        names = ",".join(a.name for a in self.attention)
        reason = f"{self.name} reads attention, not a GAP + linear head"
        self.head = CamHead(names, -1, None, None, False, reason)
        self.heads = [self.head]
        return self.heads

    def fuse_heads(self, attention: torch.Tensor) -> torch.Tensor:
        """(N, heads, T, T) -> (N, T, T) by ``head_fusion``: mean, max or min over heads."""
        if self.head_fusion == "mean":
            return attention.mean(dim=1)
        return attention.amax(dim=1) if self.head_fusion == "max" else attention.amin(dim=1)

    def relevance(
        self, attentions: list[torch.Tensor], logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """(N, K, T, T) relevance of token j for token i's output, per target."""
        raise NotImplementedError

    def _explain_once(
        self, x: torch.Tensor, targets: Target
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        capture = AttentionCapture(
            self.module, self.attention, track_gradients=self.needs_gradients
        )
        grad_context = torch.no_grad() if self.needs_gradients else torch.inference_mode()
        with capture, grad_context:
            logits = select_logits(self.module(x), self.output)
        ids = resolve_targets(targets, logits.detach(), self.labels)
        attentions = self._checked(capture.attentions, capture.names, len(x))
        relevance = self.relevance(attentions, logits, ids)
        layout = token_layout(self.module, attentions[0].shape[-1], tuple(x.shape[-2:]))
        # the class token's row; without one (average-pooled tokens) the mean of all rows
        rows = relevance[:, :, 0, layout.prefix :] if layout.prefix else relevance.mean(dim=2)
        raw = rows.reshape(*rows.shape[:2], *layout.grid)
        return raw.detach().float(), logits, ids

    def _checked(
        self, attentions: list[torch.Tensor], names: list[str], n: int
    ) -> list[torch.Tensor]:
        if not attentions:
            raise ConfigError(
                f"{self.name}: no attention module ran in the forward pass; "
                f"the model's attention modules are {', '.join(a.name for a in self.attention)}"
            )
        for name, a in zip(names, attentions, strict=True):
            if a.ndim != 4 or a.shape[0] != n or a.shape[-1] != a.shape[-2]:
                raise ConfigError(
                    f"{self.name}: attention {name!r} has shape {tuple(a.shape)} for {n} "
                    "image(s), not (N, heads, T, T) over all tokens (window attention, as in "
                    "Swin, or cross-attention): rollout needs global self-attention (ViT, "
                    "DeiT); use method='gradcam' (or hirescam, gradcam++, xgradcam, layercam, "
                    "scorecam, ablationcam; cam where the head is GAP + linear, as Swin's)"
                )
            if a.shape[-1] != attentions[0].shape[-1]:
                raise ConfigError(
                    f"{self.name}: attention {name!r} is over {a.shape[-1]} tokens, the first "
                    f"one over {attentions[0].shape[-1]}: rollout needs one token sequence "
                    "through all blocks"
                )
        return attentions


class AttentionRollout(AttentionMethod):
    """Attention rollout: attention (with the residual connection) multiplied across blocks.

    Per block ``b``, the attention is fused over heads (``head_fusion``: mean, as in the paper,
    or max / min), the weakest ``discard_ratio`` share of its entries is set to 0 per image
    (never the class token's attention to itself; jacobgil/vit-explain's option), the identity
    is added for the residual connection and each row is renormalised::

        Â_b = (fuse(A_b) + I) / 2,   Â_b[i, :] /= sum_j Â_b[i, j]
        R   = Â_L ... Â_2 Â_1
        M[i, j] = R[cls, prefix + i w + j]

    Class-agnostic: every target gets the same map. With no class token (average-pooled
    models) the map is the mean of all rows of R. Rows are renormalised as in the paper
    (vit-explain divides by the sums of the wrong axis).

    Abnar, Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.

    Parameters:
        discard_ratio: share in [0, 1) of each fused attention's entries set to 0 before
            rollout (0, the default: the paper's rollout).
        head_fusion: "mean" (default), "max" or "min" over heads.
    """

    name = "rollout"
    needs_gradients = False

    def __init__(
        self,
        module: nn.Module,
        layer: LayerSpec = None,
        *,
        discard_ratio: float = 0.0,
        **options: Any,
    ) -> None:
        if not 0 <= discard_ratio < 1:
            raise ConfigError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
        super().__init__(module, layer, **options)
        self.discard_ratio = discard_ratio

    def relevance(
        self, attentions: list[torch.Tensor], logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        n, t = attentions[0].shape[0], attentions[0].shape[-1]
        eye = torch.eye(t, device=attentions[0].device, dtype=torch.float32)
        result = eye.expand(n, t, t)
        for attention in attentions:
            fused = self.discard(self.fuse_heads(attention.float()))
            step = (fused + eye) / 2
            step = step / step.sum(dim=-1, keepdim=True)
            result = step @ result
        return result[:, None].expand(n, targets.shape[1], t, t)

    def discard(self, fused: torch.Tensor) -> torch.Tensor:
        """Set the ``discard_ratio`` smallest entries of each image's (T, T) attention to 0,
        except entry (0, 0)."""
        count = int(fused[0].numel() * self.discard_ratio)
        if count == 0:
            return fused
        flat = fused.flatten(1)
        lowest = flat.topk(count, dim=-1, largest=False).indices
        drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
        drop[:, 0] = False
        return flat.masked_fill(drop, 0).view_as(fused)


class GradientRollout(AttentionMethod):
    """Gradient-weighted attention rollout: attention weighted by its gradient, class-specific.

    Per block ``b`` (in forward order), with ``A_b`` the attention probabilities (N, heads,
    T, T) and ``G_b = d y_c / d A_b`` (``y_c`` the logit of the target)::

        Ā_b = mean_heads(clamp(G_b ⊙ A_b, min=0))
        R   = I;   R <- R + Ā_b R    for b = 1 .. L
        M[i, j] = R[cls, prefix + i w + j]

    One backward pass per target column, reaching only as deep as the first block. With no
    class token (average-pooled models) the map is the mean of all rows of R.

    Chefer, Gur, Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
    Encoder-Decoder Transformers", ICCV 2021 (its self-attention rule; hila-chefer/
    Transformer-MM-Explainability).
    """

    name = "gradrollout"
    needs_gradients = True

    def relevance(
        self, attentions: list[torch.Tensor], logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        n, t = attentions[0].shape[0], attentions[0].shape[-1]
        eye = torch.eye(t, device=attentions[0].device, dtype=torch.float32)
        k = targets.shape[1]
        per_target = []
        with torch.enable_grad():
            for j in range(k):
                score = logits.gather(1, targets[:, j : j + 1]).sum()
                grads = torch.autograd.grad(score, attentions, retain_graph=j < k - 1)
                result = eye.expand(n, t, t)
                for attention, grad in zip(attentions, grads, strict=True):
                    weighted = (grad.float() * attention.detach().float()).clamp(min=0)
                    result = result + weighted.mean(dim=1) @ result
                per_target.append(result)
        return torch.stack(per_target, dim=1)
