"""Token maps: vision transformers' tokens (N, T, C) and channels-last maps (N, h, w, C) become
(N, C, h, w) feature maps without a user-written reshape; CAM where it is exact; refusals.

Random weights, seeded, no downloads, batch 1 at 224 px: these models are big for a 2-core
machine, so only some run at their full size. Exactly as named: timm ``vit_small_patch16_224``
(Grad-CAM against pytorch-grad-cam), timm ``swin_tiny_patch4_window7_224`` and torchvision
``swin_t`` (CAM's identity, Grad-CAM x hw = CAM). With fewer blocks (the same architecture,
every block alike): ``deit_small_patch16_224`` with 4 blocks, torchvision ``vit_b_16`` with 2
encoder layers (``VisionTransformer(224, 16, 2, 12, 768, 3072)``), the 160 x 240
``vit_small_patch16_224`` with 4 blocks, both Swin-Ts with one block per stage for the
comparison with pytorch-grad-cam at the last stage. The layout logic itself is checked on ``vit_tiny_patch16_224`` with 1-2 blocks.
torchvision's ViT initialises its head to zeros (every logit 0, every gradient 0): the tests
give it random weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camlens.errors import ConfigError
from camlens.layers import find_cam_head
from camlens.methods import CAM, METHODS, GradCAM, get_method
from camlens.tokens import Layout, ReshapeLayout, infer_layout, token_layout

timm = pytest.importorskip("timm")
tv = pytest.importorskip("torchvision")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.reshape_transforms import (  # noqa: E402
    swinT_reshape_transform,
    vit_reshape_transform,
)


def _count_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _normalised(raw: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's normalisation of one (h, w) map: relu, min-max, bilinear resize."""
    m = raw.double().relu()
    m = m - m.min()
    m = m / (1e-7 + m.max())
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def _correlation(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


def _pgc_map(model, layer, x, cls, reshape) -> np.ndarray:
    with pgc.GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)])
    return out[0]


def _vit_b_16() -> nn.Module:
    """torchvision's ViT-B/16 with 2 encoder layers instead of 12."""
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(224, 16, 2, 12, 768, 3072).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.05)  # torchvision zero-initialises the head
    return model


VITS = {  # name -> (builder, automatic feature layer, that layer as a module)
    "timm:vit_small_patch16_224": (
        lambda: timm.create_model("vit_small_patch16_224", pretrained=False),
        "blocks.11.norm1",
        lambda m: m.blocks[-1].norm1,
    ),
    "timm:deit_small_patch16_224": (
        lambda: timm.create_model("deit_small_patch16_224", pretrained=False, depth=4),
        "blocks.3.norm1",
        lambda m: m.blocks[-1].norm1,
    ),
    "torchvision:vit_b_16": (
        _vit_b_16,
        "encoder.layers.encoder_layer_1.ln_1",
        lambda m: m.encoder.layers[-1].ln_1,
    ),
}


@pytest.mark.parametrize("name", list(VITS))
def test_gradcam_on_vits_matches_pytorch_grad_cam(name):
    build, layer_name, layer = VITS[name]
    torch.manual_seed(1)
    model = build().eval()
    x = torch.randn(1, 3, 224, 224)
    method = GradCAM(model)
    result = method.run(x, "top1")
    head = method.head
    assert head.feature_layer == layer_name and head.layout == Layout("tokens", (14, 14), 1)
    assert not head.cam_exact and "class token" in head.reason
    assert result.layer == layer_name and result.raw.shape == (1, 1, 14, 14)
    cls = int(result.targets[0, 0])
    theirs = _pgc_map(model, layer(model), x, cls, vit_reshape_transform)
    corr = _correlation(_normalised(result.raw[0, 0], (224, 224)), theirs)
    assert corr >= 0.99, corr
    assert _count_hooks(model) == 0


def _gradcam_by_hand(model, layer: nn.Module, x, cls: int, prefix: int, grid) -> torch.Tensor:
    """Grad-CAM from the layer's tokens, reshaped by hand: drop the prefix tokens, (h, w, C)."""
    kept = {}
    handle = layer.register_forward_hook(lambda m, i, o: kept.setdefault("tokens", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    tokens = kept["tokens"]
    (grads,) = torch.autograd.grad(logits[0, cls], tokens)
    a = tokens[0, prefix:].detach().reshape(*grid, -1)  # (h, w, C)
    g = grads[0, prefix:].reshape(*grid, -1)
    weights = g.mean(dim=(0, 1))
    return (a * weights).sum(-1)


def test_dynamic_size_vit_at_160_by_240_gets_a_10_by_15_grid():
    """timm ``dynamic_img_size=True`` at 160 x 240: the grid follows the input (10 x 15), not
    the pretraining size (14 x 14), and not the patch embedding's NHWC output read as NCHW."""
    torch.manual_seed(2)
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, dynamic_img_size=True, depth=4
    ).eval()
    x = torch.randn(1, 3, 160, 240)
    result = GradCAM(model).run(x, "top1")
    assert result.layer == "blocks.3.norm1" and result.raw.shape == (1, 1, 10, 15)
    cls = int(result.targets[0, 0])
    expected = _gradcam_by_hand(model, model.blocks[-1].norm1, x, cls, 1, (10, 15))
    torch.testing.assert_close(result.raw[0, 0], expected, rtol=1e-4, atol=1e-6)
    # pytorch-grad-cam needs its grid told (height=10, width=15); given it, it agrees.
    theirs = _pgc_map(
        model, model.blocks[-1].norm1, x, cls, lambda t: vit_reshape_transform(t, 10, 15)
    )
    assert _correlation(_normalised(result.raw[0, 0], (160, 240)), theirs) >= 0.99
    # The bug: the patch embedding's (N, h, w, C) output is read as channels-last.
    head = find_cam_head(model, x, layer="patch_embed")
    assert head.layout == Layout("nhwc", (10, 15))
    assert GradCAM(model, layer="patch_embed")(x).shape == (1, 1, 10, 15)


def test_distilled_deit_drops_both_prefix_tokens():
    """DeiT distilled: CLS and distillation token (timm ``num_prefix_tokens=2``), two heads
    averaged (no single linear layer gives the logits): the last block's first norm, maps of
    the 196 patch tokens (DeiT-Tiny with 2 blocks)."""
    torch.manual_seed(8)
    model = timm.create_model("deit_tiny_distilled_patch16_224", depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    method = GradCAM(model)
    result = method.run(x, "top1")
    assert result.layer == "blocks.1.norm1"
    assert method.head.layout == Layout("tokens", (14, 14), 2)
    cls = int(result.targets[0, 0])
    expected = _gradcam_by_hand(model, model.blocks[-1].norm1, x, cls, 2, (14, 14))
    torch.testing.assert_close(result.raw[0, 0], expected, rtol=1e-4, atol=1e-6)


SWINS = {  # name -> (builder, last stage, CAM's layer (what the pooling reads), classifier)
    "timm:swin_tiny_patch4_window7_224": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False),
        "layers.3",
        "norm",
        "head.fc",
    ),
    "torchvision:swin_t": (
        lambda: tv.models.swin_t(weights=None),
        "features.7",
        "norm",
        "head",
    ),
}


@pytest.fixture(scope="module")
def swins():
    torch.manual_seed(3)
    return {name: spec[0]().eval() for name, spec in SWINS.items()}


@pytest.mark.parametrize("name", list(SWINS))
def test_cam_on_swin_is_exact(swins, name):
    model, (_, _, layer, classifier) = swins[name], SWINS[name]
    x = torch.randn(1, 3, 224, 224)
    method = CAM(model)
    cam = method.run(x, "top2")
    head = method.head  # found automatically: what the average pooling reads
    assert (head.feature_layer, head.classifier, head.cam_exact) == (layer, classifier, True)
    assert head.layout == Layout("nhwc", (7, 7))
    scale = float(cam.logits.abs().max())
    assert cam.raw.shape == (1, 2, 7, 7)
    assert cam.identity_error / scale < 1e-4, cam.identity_error / scale
    # GAP + linear over the token grid: Grad-CAM x hw = CAM, as on CNNs.
    grad = GradCAM(model)(x, cam.targets)
    torch.testing.assert_close(grad * 49, cam.raw, rtol=1e-3, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def small_swins():
    """Swin-T with one block per stage (depths 1, 1, 1, 1 instead of 2, 2, 6, 2)."""
    torch.manual_seed(9)
    return {
        "timm:swin_tiny_patch4_window7_224": timm.create_model(
            "swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1)
        ).eval(),
        "torchvision:swin_t": tv.models.SwinTransformer(
            [4, 4], 96, [1, 1, 1, 1], [3, 6, 12, 24], [7, 7]
        ).eval(),
    }


@pytest.mark.parametrize("name", list(SWINS))
def test_gradcam_on_swin_last_stage_matches_pytorch_grad_cam(small_swins, name):
    model, (_, stage, _, _) = small_swins[name], SWINS[name]
    x = torch.randn(1, 3, 224, 224)
    method = GradCAM(model, layer=stage)
    result = method.run(x, "top1")
    assert method.head.layout == Layout("nhwc", (7, 7))  # the stage's (N, 7, 7, 768), permuted
    cls = int(result.targets[0, 0])

    def swin_tokens(t: torch.Tensor) -> torch.Tensor:  # (N, 7, 7, C) -> their (N, 49, C) input
        return swinT_reshape_transform(t.flatten(1, 2), 7, 7)

    theirs = _pgc_map(model, model.get_submodule(stage), x, cls, swin_tokens)
    corr = _correlation(_normalised(result.raw[0, 0], (224, 224)), theirs)
    assert corr >= 0.99, corr


# --- the layout logic on a small ViT ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit():
    """ViT-Tiny with 2 blocks (the smallest config of the architecture: fast checks)."""
    torch.manual_seed(4)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()


def test_cam_on_a_class_token_vit_is_refused_naming_reason_and_methods(tiny_vit):
    with pytest.raises(ConfigError) as error:
        CAM(tiny_vit)(torch.randn(1, 3, 224, 224))
    message = str(error.value)
    assert "class token" in message and "not the average of its patch tokens" in message
    for works in ("gradcam", "hirescam", "rollout", "gradrollout"):
        assert works in message


def test_cam_refused_where_a_norm_follows_the_pooling():
    """timm ``global_pool="avg"`` enables ``fc_norm`` (a LayerNorm after pooling)."""
    torch.manual_seed(5)
    model = timm.create_model("vit_tiny_patch16_224", depth=2, global_pool="avg").eval()
    head = find_cam_head(model, torch.randn(1, 3, 224, 224))
    assert not head.cam_exact and "'fc_norm'" in head.reason and "gradcam" in head.reason
    assert head.feature_layer == "blocks.1.norm1"


def test_cam_exact_on_average_pooled_vit_without_fc_norm():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 128, 192)  # another resolution and shape: 8 x 12 patches
    model = timm.create_model(
        "vit_tiny_patch16_224",
        depth=2,
        global_pool="avg",
        fc_norm=False,
        class_token=False,
        dynamic_img_size=True,
    ).eval()
    head = find_cam_head(model, x)
    assert (head.feature_layer, head.cam_exact) == ("norm", True)
    assert head.layout == Layout("tokens", (8, 12), 0)
    cam = CAM(model).run(x, "top2")
    assert cam.identity_error / float(cam.logits.abs().max()) < 1e-4
    torch.testing.assert_close(GradCAM(model)(x, cam.targets) * 96, cam.raw, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "method",
    [n for n in METHODS if n not in ("cam", "rollout", "gradrollout", "shapleycam")],
)
def test_every_method_runs_on_a_token_layer_and_cleans_up(tiny_vit, method):
    """Every layer-based method, through the base class (no per-method code). Not ShapleyCAM:
    its Hessian-vector product differentiates twice, which torch's fused CPU attention kernel
    (``F.scaled_dot_product_attention``) does not implement."""
    cls = get_method(method)
    options = {"max_channels": 8, "batch_size": 8} if method in ("scorecam", "ablationcam") else {}
    options = {"n_masks": 16} if method == "drise" else options
    x = torch.randn(1, 3, 224, 224)
    raw = cls(tiny_vit, **options)(x, "top2")
    at_input = ("guidedbackprop", "guidedgradcam", "fullgrad", "drise")
    grid = (224, 224) if method in at_input else (14, 14)
    assert raw.shape == (1, 2, *grid) and torch.isfinite(raw).all()
    assert _count_hooks(tiny_vit) == 0


def test_ablationcam_zeroes_token_channels():
    """Ablation-CAM's channel mask reaches the patch tokens (not the class token): its map
    equals sum_k w_k A_k with w_k = (y - y^(k)) / y, y^(k) computed here by zeroing channel k
    of the patch tokens by hand (ViT-Tiny, 1 block, 64 x 96 input: a 4 x 6 grid)."""
    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", depth=1, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 64, 96)
    layer = model.blocks[-1].norm1
    kept = {}
    handle = layer.register_forward_hook(lambda m, i, o: kept.setdefault("tokens", o))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    tokens = kept["tokens"]  # (1, 1 + 24, 192)
    cls, channels = int(logits.argmax()), tokens.shape[-1]

    def zero_one_channel_each(m, i, o):
        o = o.expand(channels, -1, -1).clone()
        o[torch.arange(channels), 1:, torch.arange(channels)] = 0
        return o

    handle = layer.register_forward_hook(zero_one_channel_each)
    with torch.no_grad():
        dropped = model(x.expand(channels, -1, -1, -1))[:, cls]
    handle.remove()
    y = logits[0, cls]
    weights = (y - dropped) / y
    maps = tokens[0, 1:].reshape(4, 6, channels).permute(2, 0, 1)
    expected = torch.einsum("c,chw->hw", weights, maps)
    raw = get_method("ablationcam")(model, batch_size=64)(x, torch.tensor([[cls]]))
    torch.testing.assert_close(raw[0, 0], expected, rtol=1e-3, atol=1e-5)
    assert _count_hooks(model) == 0


def test_explicit_reshape_equals_the_automatic_layout(tiny_vit):
    x = torch.randn(1, 3, 224, 224)
    auto = GradCAM(tiny_vit)(x, "top2")
    given = GradCAM(tiny_vit, reshape=vit_reshape_transform)(x, "top2")
    torch.testing.assert_close(given, auto)


def test_reshape_that_changes_values_is_refused(tiny_vit):
    with pytest.raises(ConfigError, match="only select and rearrange"):
        GradCAM(tiny_vit, reshape=lambda t: vit_reshape_transform(t) * 2)(
            torch.randn(1, 3, 224, 224)
        )


class Mystery(nn.Module):
    """Returns (N, 8, 8, 8) at an 8 x 8 input: channels first and last both fit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 2, 1, 1)


class MysteryNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mystery = Mystery()
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mystery(self.conv(x)).mean(dim=(2, 3)))


def test_layer_of_unknown_layout_is_refused_with_a_message():
    model = MysteryNet().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError) as error:
        find_cam_head(model, x)
    message = str(error.value)
    assert "'mystery' (Mystery) returns shape (1, 8, 8, 8) for an input of 8 x 8" in message
    assert "channels come first or last" in message and "reshape=" in message
    with pytest.raises(ConfigError, match="channels come first or last"):
        GradCAM(model)(x)
    # told by the user, it works (here: channels first)
    raw = GradCAM(model, reshape=lambda t: t)(x)
    assert raw.shape == (1, 1, 8, 8)
    assert _count_hooks(model) == 0


def test_infer_layout_rules():
    conv, norm, relu = nn.Conv2d(3, 8, 1), nn.LayerNorm(8), nn.ReLU()
    size = (8, 8)
    # own type: a convolution is channels-first, a LayerNorm on 4-d maps channels-last
    assert infer_layout(nn.Module(), "c", conv, (1, 8, 8, 8), size) == Layout("nchw", (8, 8))
    assert infer_layout(nn.Module(), "n", norm, (1, 8, 8, 8), size) == Layout("nhwc", (8, 8))
    # no own type: an earlier output of the same shape decides
    earlier = [(conv, (1, 8, 8, 8))]
    assert infer_layout(nn.Module(), "r", relu, (1, 8, 8, 8), size, earlier).kind == "nchw"
    # else the shape: only the channels-last reading fits a 160 x 240 input
    shape = (1, 10, 15, 384)
    assert infer_layout(nn.Module(), "r", relu, shape, (160, 240)) == Layout("nhwc", (10, 15))
    with pytest.raises(ConfigError, match="both"):
        infer_layout(nn.Module(), "r", relu, (1, 8, 8, 8), size)
    with pytest.raises(ConfigError, match="not a feature map"):
        infer_layout(nn.Module(), "r", relu, (1, 8), size)


def test_token_grids_and_prefix_tokens():
    plain = nn.Module()
    assert token_layout(plain, 197, (224, 224)) == Layout("tokens", (14, 14), 1)
    assert token_layout(plain, 151, (160, 240)) == Layout("tokens", (10, 15), 1)
    registers = nn.Module()
    registers.num_prefix_tokens = 5  # CLS + 4 registers
    assert token_layout(registers, 201, (224, 224)) == Layout("tokens", (14, 14), 5)
    with pytest.raises(ConfigError, match="more than one way"):
        token_layout(plain, 5, (4, 4))  # 1 + 2 x 2 or 4 + 1 x 1
    with pytest.raises(ConfigError, match="do not split"):
        token_layout(registers, 99, (224, 224))  # 5 + 94 or 0 + 99: neither a 1:1 grid
    layout = token_layout(registers, 201, (224, 224))
    tokens = torch.randn(2, 201, 6)
    maps = layout.to_maps(tokens)
    assert maps.shape == (2, 6, 14, 14)
    torch.testing.assert_close(maps[1, :, 0, 1], tokens[1, 6])  # 5 prefix tokens, then row 0
    torch.testing.assert_close(layout.from_maps(maps, tokens), tokens)


def test_reshape_layout_round_trip_and_gradient():
    tokens = torch.randn(2, 197, 4)
    layout = ReshapeLayout(vit_reshape_transform)
    maps = layout.to_maps(tokens).detach().requires_grad_(True)
    rebuilt = layout.from_maps(maps, tokens)
    torch.testing.assert_close(rebuilt, tokens)
    (grad,) = torch.autograd.grad((rebuilt[:, 1:] ** 2).sum(), maps)
    torch.testing.assert_close(grad, 2 * maps.detach())
