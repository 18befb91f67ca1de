"""Attention rollout (Abnar & Zuidema 2020) and gradient-weighted attention rollout (Chefer,
Gur & Wolf 2021): hand-computed values on a hand-built two-block attention model, the
attention probabilities of timm and torchvision ViTs against independent computations,
class-specificity, refusals, and the ``Explanation`` contract.

The real models are small configs of the named architectures (timm ``vit_tiny_patch16_224``
with 2 blocks, a torchvision ``VisionTransformer`` of 2 layers at 32 px), random weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens
from camlens.errors import ConfigError
from camlens.methods import (
    AttentionCapture,
    AttentionRollout,
    GradientRollout,
    get_method,
    methods_for,
    options_for,
)


def _count_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


# --- the hand-built model ------------------------------------------------------------------


class ToyAttention(nn.Module):
    """timm's attention protocol with fixed probabilities ``probs`` (heads, T, T).

    ``fused_attn`` True (the default, as timm's): the probabilities are used without being
    materialised where a hook could see them (like ``F.scaled_dot_product_attention``);
    False: they pass through ``attn_drop`` first. Head ``h`` mixes channel ``h`` of the
    tokens: ``out[n, i, h] = sum_j probs[h, i, j] x[n, j, h]``.
    """

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("probs", probs)
        self.num_heads = probs.shape[0]
        self.fused_attn = True
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.probs.expand(len(x), -1, -1, -1)
        if not self.fused_attn:
            probs = self.attn_drop(probs)
        return torch.einsum("nhij,njh->nih", probs, x)


class ToyBlock(nn.Module):
    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.attn = ToyAttention(probs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)  # the residual connection rollout models with + I


class ToyViT(nn.Module):
    """An image of 1 x 2 pixels (p1, p2) -> tokens CLS = [1, 1], [p1, p1], [p2, p2] (T = 3,
    2 channels = 2 heads) -> two ToyBlocks -> logits = W @ (the CLS token)."""

    num_prefix_tokens = 1

    def __init__(self, a1: torch.Tensor, a2: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ToyBlock(a1), ToyBlock(a2))
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.flatten(1)[..., None].expand(-1, -1, 2)  # (N, 2, 2)
        cls = torch.ones(len(x), 1, 2, dtype=x.dtype)
        tokens = self.blocks(torch.cat([cls, patches], dim=1))
        return self.head(tokens[:, 0])


#: Block 1, heads a and b (rows sum to 1); mean over heads [[.5, .3, .2], [0, 1, 0], [0, 0, 1]].
A1 = torch.tensor(
    [
        [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        [[0.5, 0.1, 0.4], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    ]
)
#: Block 2; mean over heads [[.2, .8, 0], [.4, .6, 0], [0, 0, 1]].
A2 = torch.tensor(
    [
        [[0.4, 0.6, 0.0], [0.8, 0.2, 0.0], [0.0, 0.0, 1.0]],
        [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    ]
)
W = torch.eye(2)  # class 0 reads channel (head) a of the CLS token, class 1 head b
X = torch.tensor([[[[2.0, 3.0]]]])  # (1, 1, 1, 2): p1 = 2, p2 = 3


@pytest.fixture
def toy() -> ToyViT:
    return ToyViT(A1, A2, W).eval()


def test_rollout_equals_the_hand_computed_value(toy):
    """Mean over heads, + I, rows renormalised (they already sum to 1 here, so / 2):

    Â1 = [[.75, .15, .1], [0, 1, 0], [0, 0, 1]]     Â2 = [[.6, .4, 0], [.2, .8, 0], [0, 0, 1]]
    R[0] = (Â2 Â1)[0] = .6 [.75, .15, .1] + .4 [0, 1, 0] = [.45, .49, .06]
    map (1 x 2 grid)  = R[0, 1:] = [.49, .06]
    """
    result = AttentionRollout(toy).run(X, torch.tensor([[0, 1]]))
    expected = torch.tensor([[0.49, 0.06]])
    assert result.raw.shape == (1, 2, 1, 2)
    torch.testing.assert_close(result.raw[0, 0], expected)
    torch.testing.assert_close(result.raw[0, 1], expected)  # class-agnostic
    assert result.layer == "blocks.0.attn,blocks.1.attn"
    assert toy.blocks[0].attn.fused_attn and toy.blocks[1].attn.fused_attn  # restored
    assert _count_hooks(toy) == 0


def test_rollout_with_max_fusion_by_hand(toy):
    """Max over heads: Ā1 row 0 = [.5, .5, .4] -> (Ā1 + I) / 2 row 0 = [.75, .25, .2] / 1.2
    = [5/8, 5/24, 1/6]; Ā2 row 0 = [.4, 1, 0] -> [.7, .5, 0] / 1.2 = [7/12, 5/12, 0]; rows 1
    and 2 of Â1: [0, 1, 0], [0, 0, 1].
    R[0] = 7/12 [5/8, 5/24, 1/6] + 5/12 [0, 1, 0] = [35/96, 155/288, 7/72]."""
    raw = AttentionRollout(toy, head_fusion="max")(X)
    torch.testing.assert_close(raw[0, 0], torch.tensor([[155 / 288, 7 / 72]]))


def test_rollout_discard_ratio_by_hand(toy):
    """discard_ratio 0.6: the int(9 x 0.6) = 5 smallest entries of each fused attention are
    set to 0, never entry (0, 0). Ā1: its four 0s and the .2 at (0, 2) -> row 0 = [.5, .3, 0],
    Â1 row 0 = [.75, .15, 0] / .9 = [5/6, 1/6, 0]. Ā2: its four 0s and the .2 at (0, 0),
    which is kept -> unchanged. R[0] = .6 [5/6, 1/6, 0] + .4 [0, 1, 0] = [.5, .5, 0]."""
    raw = AttentionRollout(toy, discard_ratio=0.6)(X)
    torch.testing.assert_close(raw[0, 0], torch.tensor([[0.5, 0.0]]))


def _gradrollout_by_hand(c: int) -> torch.Tensor:
    """Chefer et al.'s rule with the gradients of the toy model written out (no autograd):

    x0 = tokens, x1[j, h] = x0[j, h] + sum_k A1[h, j, k] x0[k, h]
    y_c = sum_h W[c, h] (x1[0, h] + sum_j A2[h, 0, j] x1[j, h])
    dy_c / dA2[h, i, j] = W[c, h] [i = 0] x1[j, h]
    dy_c / dA1[h, j, k] = W[c, h] ([j = 0] + A2[h, 0, j]) x0[k, h]
    R = I + Ā1,  R <- R + Ā2 R,  Ā_b = mean_h clamp(G_b A_b, min=0);  map = R[0, 1:]
    """
    p = X.flatten()
    x0 = torch.tensor([[1.0, 1.0], [p[0], p[0]], [p[1], p[1]]])
    x1 = x0 + torch.stack([A1[h] @ x0[:, h] for h in range(2)], dim=1)
    g2 = torch.zeros(2, 3, 3)
    g1 = torch.zeros(2, 3, 3)
    for h in range(2):
        for j in range(3):
            g2[h, 0, j] = W[c, h] * x1[j, h]
            for k in range(3):
                g1[h, j, k] = W[c, h] * ((j == 0) + A2[h, 0, j]) * x0[k, h]
    r = torch.eye(3)
    for g, a in ((g1, A1), (g2, A2)):
        r = r + (g * a).clamp(min=0).mean(dim=0) @ r
    return r[0, 1:].reshape(1, 2)


def test_gradrollout_is_class_specific_and_equals_the_hand_computation(toy):
    result = GradientRollout(toy).run(X, torch.tensor([[0, 1]]))
    first, second = _gradrollout_by_hand(0), _gradrollout_by_hand(1)
    torch.testing.assert_close(result.raw[0, 0], first)
    torch.testing.assert_close(result.raw[0, 1], second)
    assert (first - second).abs().max() > 0.1  # two classes, two different maps
    # class 0 reads head a, whose CLS row attends to p1 only in block 1: p2 gets nothing there
    assert first[0, 1] < first[0, 0] and second[0, 1] > first[0, 1]
    assert toy.blocks[0].attn.fused_attn and _count_hooks(toy) == 0


def test_gradrollout_works_inside_no_grad_and_leaves_parameters_alone(toy):
    with torch.no_grad():
        raw = GradientRollout(toy)(X, torch.tensor([[1]]))
    torch.testing.assert_close(raw[0, 0], _gradrollout_by_hand(1))
    assert all(p.grad is None for p in toy.parameters())


# --- real ViTs: the captured probabilities against independent computations ----------------


timm = pytest.importorskip("timm")
tv = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()


@pytest.fixture(scope="module")
def tv_vit():
    """torchvision's VisionTransformer, 2 layers, 32 px, patches of 8 (a 4 x 4 grid)."""
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_()  # torchvision zero-initialises the head
    return model


def _block_inputs(model: nn.Module, norms: list[nn.Module], x: torch.Tensor) -> list:
    kept: list[torch.Tensor] = []
    handles = [n.register_forward_hook(lambda m, i, o: kept.append(o)) for n in norms]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return kept


def test_timm_attention_equals_softmax_of_its_queries_and_keys(timm_vit):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fused_logits = timm_vit(x)
    with AttentionCapture(timm_vit) as capture, torch.no_grad():
        logits = timm_vit(x)
    torch.testing.assert_close(logits, fused_logits, rtol=1e-4, atol=1e-5)
    inputs = _block_inputs(timm_vit, [b.norm1 for b in timm_vit.blocks], x)
    for block, h, captured in zip(timm_vit.blocks, inputs, capture.attentions, strict=True):
        attn = block.attn
        q, k, _ = attn.qkv(h).reshape(2, 197, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        expected = (q @ k.transpose(-2, -1) * attn.head_dim**-0.5).softmax(dim=-1)
        torch.testing.assert_close(captured, expected, rtol=1e-4, atol=1e-6)
    assert all("fused_attn" in vars(b.attn) for b in timm_vit.blocks)
    assert _count_hooks(timm_vit) == 0


def test_torchvision_attention_equals_multihead_attention_weights(tv_vit):
    x = torch.randn(2, 3, 32, 32)
    with AttentionCapture(tv_vit) as capture, torch.no_grad():
        tv_vit(x)
    layers = list(tv_vit.encoder.layers)
    inputs = _block_inputs(tv_vit, [layer.ln_1 for layer in layers], x)
    for layer, h, captured in zip(layers, inputs, capture.attentions, strict=True):
        with torch.no_grad():
            _, weights = layer.self_attention(
                h, h, h, need_weights=True, average_attn_weights=False
            )
        assert captured.shape == (2, 2, 17, 17)
        torch.testing.assert_close(captured, weights, rtol=1e-4, atol=1e-6)
    assert _count_hooks(tv_vit) == 0


def _rollout_reference(attentions: list[torch.Tensor]) -> torch.Tensor:
    result = torch.eye(attentions[0].shape[-1])
    for a in attentions:
        step = a.mean(dim=1) + torch.eye(a.shape[-1])
        result = (step / step.sum(-1, keepdim=True)) @ result
    return result[:, 0, 1:]


def test_rollout_on_torchvision_vit_from_its_own_attention_weights(tv_vit):
    x = torch.randn(2, 3, 32, 32)
    layers = list(tv_vit.encoder.layers)
    weights = []
    for layer, h in zip(
        layers, _block_inputs(tv_vit, [lay.ln_1 for lay in layers], x), strict=True
    ):
        with torch.no_grad():
            weights.append(layer.self_attention(h, h, h, average_attn_weights=False)[1])
    raw = AttentionRollout(tv_vit)(x, "top1")
    assert raw.shape == (2, 1, 4, 4)
    torch.testing.assert_close(raw[:, 0], _rollout_reference(weights).reshape(2, 4, 4))


def _gradrollout_reference(model: nn.Module, x: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Chefer's rule from a plain autograd pass over timm's unfused attention, with the whole
    graph kept (no leaves, no grad-mode switching)."""
    kept: list[torch.Tensor] = []
    handles = [
        b.attn.attn_drop.register_forward_hook(lambda m, i, o: kept.append(o)) for b in model.blocks
    ]
    flags = [b.attn.fused_attn for b in model.blocks]
    for b in model.blocks:
        b.attn.fused_attn = False
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
        for b, flag in zip(model.blocks, flags, strict=True):
            b.attn.fused_attn = flag
    score = logits[torch.arange(len(x)), classes].sum()
    grads = torch.autograd.grad(score, kept)
    r = torch.eye(kept[0].shape[-1]).expand(len(x), -1, -1)
    for a, g in zip(kept, grads, strict=True):
        r = r + (g * a).clamp(min=0).mean(dim=1) @ r
    return r[:, 0, 1:].detach()


def test_gradrollout_on_timm_vit_equals_a_plain_autograd_reference(timm_vit):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    result = GradientRollout(timm_vit).run(x, torch.tensor([[3, 7], [5, 5]]))
    assert result.raw.shape == (2, 2, 14, 14)
    for j, classes in enumerate(([3, 5], [7, 5])):
        expected = _gradrollout_reference(timm_vit, x, classes).reshape(2, 14, 14)
        torch.testing.assert_close(result.raw[:, j], expected, rtol=1e-4, atol=1e-7)
    assert (result.raw[0, 0] - result.raw[0, 1]).abs().max() > 0  # class-specific
    assert _count_hooks(timm_vit) == 0 and all(p.grad is None for p in timm_vit.parameters())


def test_gradrollout_on_torchvision_vit_is_class_specific(tv_vit):
    x = torch.randn(1, 3, 32, 32)
    raw = GradientRollout(tv_vit)(x, torch.tensor([[0, 1]]))
    assert raw.shape == (1, 2, 4, 4) and torch.isfinite(raw).all()
    assert (raw[0, 0] - raw[0, 1]).abs().max() > 1e-6
    assert _count_hooks(tv_vit) == 0 and all(p.grad is None for p in tv_vit.parameters())


def test_explanation_contract(timm_vit):
    x = torch.randn(1, 3, 224, 224)
    for method in ("rollout", "gradrollout"):
        explanation = camlens.explain(timm_vit, x, method=method, target="top2")
        assert explanation.raw.shape == (1, 2, 14, 14) and explanation.raw.dtype == torch.float32
        assert explanation.maps.shape == (1, 2, 224, 224)
        assert float(explanation.maps.min()) >= 0 and float(explanation.maps.max()) <= 1
        assert explanation.method == method


# --- refusals, registry ---------------------------------------------------------------------


def test_model_without_attention_is_refused():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    for method in (AttentionRollout, GradientRollout):
        with pytest.raises(ConfigError, match=r"no self-attention layer.*vision transformer"):
            method(cnn)


def test_window_attention_is_refused():
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1)).eval()
    flags = {name: m.fused_attn for name, m in swin.named_modules() if hasattr(m, "fused_attn")}
    with pytest.raises(ConfigError, match=r"window attention.*gradcam"):
        AttentionRollout(swin)(torch.randn(1, 3, 224, 224))
    assert _count_hooks(swin) == 0
    assert {name: swin.get_submodule(name).fused_attn for name in flags} == flags


def test_hooks_and_flags_restored_after_an_exception(toy):
    class Boom(Exception):
        pass

    def explode(module, inputs, output):
        raise Boom

    handle = toy.head.register_forward_hook(explode)
    try:
        with pytest.raises(Boom):
            GradientRollout(toy)(X)
    finally:
        handle.remove()
    assert _count_hooks(toy) == 0 and all(b.attn.fused_attn for b in toy.blocks)


def test_registry_and_options():
    assert get_method("rollout") is AttentionRollout
    assert get_method("Attention-Rollout") is AttentionRollout
    assert get_method("gradrollout") is GradientRollout
    options = {"discard_ratio": 0.9, "head_fusion": "max", "smooth": 4}
    assert options_for("rollout", options) == {"discard_ratio": 0.9, "head_fusion": "max"}
    assert options_for("gradrollout", options) == {"head_fusion": "max", "smooth": 4}
    with pytest.raises(ConfigError, match="head_fusion"):
        AttentionRollout(ToyViT(A1, A2, W), head_fusion="median")
    with pytest.raises(ConfigError, match="discard_ratio"):
        AttentionRollout(ToyViT(A1, A2, W), discard_ratio=1.0)


def test_methods_for_leaves_attention_methods_out_for_a_cnn(timm_vit):
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert "rollout" not in methods_for(cnn) and "gradcam" in methods_for(cnn)
    assert {"rollout", "gradrollout", "gradcam"} <= set(methods_for(timm_vit))
