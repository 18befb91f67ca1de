"""Feature-map layouts: what a layer's output is, and how it becomes (N, C, h, w) maps.

Every map method works on feature maps ``A`` of shape (N, C, h, w). Convolutional layers give
them directly; vision transformers give tokens (N, T, C) (ViT, DeiT: ``T`` = prefix tokens +
``h * w`` patch tokens) or channels-last maps (N, h, w, C) (Swin stages, timm's patch
embedding with ``dynamic_img_size``). A ``Layout`` says which of the three a layer's output is,
its grid and its number of prefix tokens, and converts both ways:

    nchw:    A = output
    nhwc:    A = output.permute(0, 3, 1, 2)
    tokens:  A = output[:, prefix:].reshape(N, h, w, C).permute(0, 3, 1, 2)

``infer_layout`` decides it from the evidence a traced forward pass gives, and REFUSES when
the evidence does not decide (a wrong map without an error is the worst outcome a heat-map
tool can have: an (N, h, w, C) output read as (N, C, h, w) gives a "grid" of w x C):

1. what the module says about itself: an ``output_fmt`` attribute (timm's ``PatchEmbed``), a
   type that defines the layout (convolutions, batch/group norms and 2-d pooling: NCHW;
   ``nn.LayerNorm`` and ``nn.Linear``, which act on the last dimension, and Swin's stages,
   blocks and patch merging: NHWC);
2. else the layout of the nearest earlier module output of the same shape whose layout its
   type defines (a ReLU after a convolution, a container that returns its last child's map);
3. else the shape: the one reading whose grid has the input's proportions (about one stride
   for both sides).

Tokens: the grid is ``(H // p, W // p)`` for the patch size ``p`` that the model declares
(timm ``patch_embed.patch_size``, torchvision ``patch_size``), the rest of the tokens being
prefix tokens (CLS, distillation, registers: timm ``num_prefix_tokens``, torchvision's
``class_token``); without a declared patch size, the one split ``T = prefix + h * w`` whose
grid has one integer stride for both sides of the input. Two possible splits: refused.

A layer that fits none of this can still be explained with ``reshape=fn``, ``fn`` mapping its
output to (N, C, h, w) by selecting and rearranging entries (``ReshapeLayout``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from camlens.errors import ConfigError

#: At most this many prefix tokens are considered when a model does not declare its count
#: (CLS + distillation + up to 14 registers).
MAX_PREFIX_TOKENS = 16

_NCHW_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
    nn.PixelShuffle,
)
#: Class-name fragments of modules whose 4-d output is channels-last (timm and torchvision
#: Swin: ``SwinTransformerStage``, ``SwinTransformerBlock``, ``PatchMerging``).
_NHWC_NAMES = ("Swin", "PatchMerging")
_RESHAPE_HINT = (
    "Choose another layer (layer=...), or pass reshape=fn, a function that maps this layer's "
    "output to (N, C, h, w) feature maps by selecting and rearranging its entries"
)


@dataclass(frozen=True)
class Layout:
    """How a layer's output holds its feature maps.

    Attributes:
        kind: ``"nchw"`` (N, C, h, w), ``"nhwc"`` (N, h, w, C) or ``"tokens"`` (N, T, C).
        grid: (h, w), the maps' size.
        prefix: tokens only: how many tokens before the patch tokens (CLS, distillation,
            registers) are left out of the maps.
    """

    kind: str
    grid: tuple[int, int]
    prefix: int = 0

    def describe(self) -> str:
        h, w = self.grid
        if self.kind == "tokens":
            return f"tokens: {self.prefix} prefix token(s) + a {h} x {w} grid of patch tokens"
        return f"{self.kind.upper()} maps of {h} x {w}"

    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) feature maps of ``output`` (a view where possible)."""
        if self.kind == "nchw":  # as the layer gives it (a shared module may change size)
            return output
        self._check(output)
        if self.kind == "nhwc":
            return output.permute(0, 3, 1, 2)
        n, _, c = output.shape
        return output[:, self.prefix :].reshape(n, *self.grid, c).permute(0, 3, 1, 2)

    def from_maps(self, maps: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """A new tensor (never a view) in ``output``'s layout holding ``maps`` (N, C, h, w), the
        prefix tokens taken from ``output``. Differentiable with respect to both."""
        if self.kind == "nchw":
            return maps.clone()
        if self.kind == "nhwc":
            return maps.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)
        patches = maps.flatten(2).transpose(1, 2)
        return torch.cat([output[:, : self.prefix].to(maps.dtype), patches], dim=1)

    def _check(self, output: torch.Tensor) -> None:
        h, w = self.grid
        expected = {
            "nchw": output.ndim == 4 and tuple(output.shape[2:]) == (h, w),
            "nhwc": output.ndim == 4 and tuple(output.shape[1:3]) == (h, w),
            "tokens": output.ndim == 3 and output.shape[1] == self.prefix + h * w,
        }[self.kind]
        if not expected:
            raise ConfigError(
                f"the layer's output has shape {tuple(output.shape)}, but its layout was found "
                f"as {self.describe()} on another input; explain inputs of one size per call"
            )


@dataclass(frozen=True)
class ReshapeLayout:
    """A user's ``reshape=fn``: ``fn(output)`` -> (N, C, h, w), made only of selections and
    rearrangements (slicing, ``reshape``, ``permute``, ``transpose``) of ``output``'s entries.

    ``from_maps`` needs the inverse: ``fn`` is applied once to the entries' flat indices
    (``arange`` in float64, exact to 2^53) to learn which entry each map value comes from;
    the maps are then scattered back into a copy of the output (differentiably). A ``fn`` that
    changes values (scales, interpolates, sums) or uses an entry twice is refused.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    kind = "reshape"

    def describe(self) -> str:
        return f"the user's reshape {getattr(self.fn, '__name__', repr(self.fn))}"

    def to_maps(self, output: torch.Tensor) -> torch.Tensor:
        maps = self.fn(output)
        if not isinstance(maps, torch.Tensor) or maps.ndim != 4 or maps.shape[0] != len(output):
            raise ConfigError(
                f"reshape={self.describe()} must return (N, C, h, w) feature maps with N = "
                f"{len(output)}; it returned {getattr(maps, 'shape', type(maps))} for an output "
                f"of shape {tuple(output.shape)}"
            )
        return maps

    def sources(self, output: torch.Tensor) -> torch.Tensor:
        """For each entry of ``to_maps(output)``, the flat index of the ``output`` entry it is."""
        index = torch.arange(output.numel(), dtype=torch.float64, device=output.device)
        picked = self.to_maps(index.reshape(output.shape))
        flat = picked.reshape(-1)
        whole = flat.round()
        valid = bool((flat == whole).all()) and bool(((whole >= 0) & (whole < len(index))).all())
        if valid and whole.unique().numel() == whole.numel():
            with torch.no_grad():  # the values too: fn(output) must be output's own entries
                mapped = self.to_maps(output).reshape(-1)
                valid = torch.equal(mapped, output.reshape(-1)[whole.long()].to(mapped.dtype))
        else:
            valid = False
        if not valid:
            raise ConfigError(
                f"reshape={self.describe()} must only select and rearrange the layer's entries "
                "(slicing, reshape, permute), each at most once; it computes new values, so "
                "gradients cannot be mapped back to the layer"
            )
        return whole.long()

    def from_maps(self, maps: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        sources = self.sources(output)
        flat = output.reshape(-1).to(maps.dtype)
        rebuilt = flat.index_put((sources,), maps.reshape(-1))
        return rebuilt.reshape(output.shape)


# ----------------------------------------------------------------------------- inference


def declared_prefix_tokens(model: nn.Module) -> int | None:
    """The number of prefix tokens the model declares: timm's ``num_prefix_tokens``; 1 for a
    torchvision ``VisionTransformer`` (its ``class_token``); None when it declares none."""
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    if isinstance(getattr(model, "class_token", None), torch.Tensor):
        return 1
    return None


def declared_patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The patch size the model declares: timm ``patch_embed.patch_size``, torchvision
    ``patch_size`` (or its ``conv_proj`` stride); None when it declares none."""
    embed = getattr(model, "patch_embed", None)
    for size in (
        getattr(embed, "patch_size", None),
        getattr(model, "patch_size", None),
        getattr(getattr(model, "conv_proj", None), "stride", None),
    ):
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return (size, size)
        if (
            isinstance(size, tuple | list)
            and len(size) == 2
            and all(isinstance(s, int) and s > 0 for s in size)
        ):
            return (int(size[0]), int(size[1]))
    return None


def _grids_for(tokens: int, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The (h, w) with ``h * w == tokens`` that one integer stride ``s`` gives for both sides of
    ``size``: ``(H // s, W // s)`` (patches without padding) or ``(ceil(H / s), ceil(W / s))``
    (padded to whole patches)."""
    height, width = size
    found = []
    for h in range(1, tokens + 1):
        if tokens % h:
            continue
        w = tokens // h
        for s in range(1, max(height, width) + 1):
            if (height // s, width // s) == (h, w) or (-(-height // s), -(-width // s)) == (h, w):
                found.append((h, w))
                break
    return found


def token_layout(model: nn.Module, tokens: int, size: tuple[int, int]) -> Layout:
    """The layout of (N, ``tokens``, C) outputs of ``model`` for inputs of ``size`` (H, W).

    Raises:
        ConfigError: no split of the tokens into prefix + grid, or more than one.
    """
    prefix = declared_prefix_tokens(model)
    patch = declared_patch_size(model)
    prefixes = [prefix, 0] if prefix else [0] if prefix == 0 else range(MAX_PREFIX_TOKENS + 1)
    if patch is not None:
        height, width = size
        for grid in {
            (height // patch[0], width // patch[1]),
            (-(-height // patch[0]), -(-width // patch[1])),
        }:
            extra = tokens - grid[0] * grid[1]
            if extra in prefixes and min(grid) > 0:
                return Layout("tokens", grid, extra)
    splits = [
        (p, g) for p in dict.fromkeys(prefixes) if p < tokens for g in _grids_for(tokens - p, size)
    ]
    if len(splits) == 1:
        p, grid = splits[0]
        return Layout("tokens", grid, p)
    declared = (
        f"the model declares {prefix} prefix token(s)"
        if prefix is not None
        else "the model declares no prefix-token count (num_prefix_tokens)"
    )
    if not splits:
        raise ConfigError(
            f"{tokens} tokens for an input of {size[0]} x {size[1]} do not split into prefix "
            f"tokens and a grid with the input's proportions ({declared})"
        )
    options = ", ".join(f"{p} prefix + {g[0]} x {g[1]}" for p, g in splits[:4])
    raise ConfigError(
        f"{tokens} tokens for an input of {size[0]} x {size[1]} split in more than one way "
        f"({options}; {declared}), so the grid is not known"
    )


def _declared_layout(module: nn.Module, ndim: int) -> str | None:
    """What ``module``'s own type says about the layout of its ``ndim``-d output."""
    fmt = getattr(module, "output_fmt", None)
    fmt = str(getattr(fmt, "value", fmt) or "").upper()
    if fmt in ("NCHW", "NHWC"):
        return fmt.lower()
    if fmt in ("NLC", "NCL"):
        return None
    if ndim != 4:
        return None
    name = type(module).__name__
    if name.endswith("2d") or isinstance(module, _NCHW_TYPES):  # timm's LayerNorm2d too
        return "nchw"
    if isinstance(module, nn.LayerNorm | nn.Linear) or any(n in name for n in _NHWC_NAMES):
        return "nhwc"
    return None


def _fits(grid: Sequence[int], size: tuple[int, int]) -> bool:
    """Whether a (h, w) grid has the proportions of an input of ``size``: both sides within
    the input and about the same stride (within a factor 1.5)."""
    (h, w), (height, width) = grid, size
    if not (1 <= h <= height and 1 <= w <= width):
        return False
    strides = (height / h, width / w)
    return max(strides) / min(strides) <= 1.5


def infer_layout(
    model: nn.Module,
    name: str,
    module: nn.Module,
    shape: Sequence[int],
    size: tuple[int, int],
    earlier: Sequence[tuple[nn.Module, Sequence[int]]] = (),
) -> Layout:
    """The layout of one module's output, from a traced forward pass.

    Parameters:
        model: the whole classifier (for the prefix tokens and patch size it declares).
        name: the module's qualified name (for messages).
        module: the module.
        shape: its output's shape.
        size: (H, W) of the input.
        earlier: (module, output shape) of the modules that finished before it, in order.

    Raises:
        ConfigError: the layout cannot be determined; the message says why and what to do.
    """
    shape = tuple(int(s) for s in shape)
    where = (
        f"layer {name!r} ({type(module).__name__}) returns shape {shape} for an input of "
        f"{size[0]} x {size[1]}"
    )
    if len(shape) == 3:
        try:
            return token_layout(model, shape[1], size)
        except ConfigError as error:
            raise ConfigError(
                f"{where}, read as (N, tokens, C): {error}. {_RESHAPE_HINT}"
            ) from None
    if len(shape) != 4:
        raise ConfigError(
            f"{where}: not a feature map (N, C, h, w), tokens (N, T, C) or channels-last maps "
            f"(N, h, w, C). {_RESHAPE_HINT}"
        )
    kind = _declared_layout(module, 4)
    if kind is None:
        kind = next(
            (
                found
                for other, other_shape in reversed(earlier)
                if tuple(other_shape) == shape and (found := _declared_layout(other, 4)) is not None
            ),
            None,
        )
    if kind is None:
        readings = [
            k for k, grid in (("nchw", shape[2:]), ("nhwc", shape[1:3])) if _fits(grid, size)
        ]
        if len(readings) != 1:
            why = (
                "both (N, C, h, w) and (N, h, w, C) readings fit the input"
                if readings
                else "neither the (N, C, h, w) nor the (N, h, w, C) reading fits the input"
            )
            raise ConfigError(
                f"{where}: cannot tell whether its channels come first or last ({why}, and "
                f"neither its type nor an earlier layer says which). {_RESHAPE_HINT}"
            )
        kind = readings[0]
    grid = shape[2:] if kind == "nchw" else shape[1:3]
    return Layout(kind, (grid[0], grid[1]))
