"""Values of CAM and Grad-CAM: hand-computed oracles, exact identities, no side effects."""

from __future__ import annotations

import pytest
import torch

import camlens
from camlens import CAM, ConfigError, GradCAM
from camlens.layers import find_cam_head
from tiny_models import DictOutputNet, Exploding, InplaceNet, SharedActNet, TinyCAMNet
from tiny_models_family import count_hooks

# --- hand-computed oracle -------------------------------------------------------------


def test_cam_on_tiny_model_matches_hand_computation():
    model = TinyCAMNet()
    result = CAM(model).run(TinyCAMNet.X, targets=torch.tensor([[0, 1, 2]]))
    assert result.layer == "features"
    torch.testing.assert_close(result.raw[0], TinyCAMNet.M, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.logits[0], TinyCAMNet.Y, rtol=0, atol=1e-6)
    assert result.identity_error < 1e-6


def test_gradcam_on_tiny_model_is_cam_over_hw_by_hand():
    raw = GradCAM(TinyCAMNet())(TinyCAMNet.X, "top1")
    # top-1 is class 0 (y = 2.6); alpha = w / (h w) = [1, 2] / 4
    torch.testing.assert_close(raw[0, 0], TinyCAMNet.M[0] / 4, rtol=0, atol=1e-6)


def test_maps_are_relu_divided_by_max_by_hand():
    result = camlens.explain(TinyCAMNet(), TinyCAMNet.X, target=[[0, 1, 2]])
    expected_0 = torch.tensor([[1.0, 4.0], [3.0, 2.0]]) / 4
    torch.testing.assert_close(result.maps[0, 0], expected_0)
    assert torch.equal(result.maps[0, 1], torch.zeros(2, 2))  # no positive evidence
    torch.testing.assert_close(result.maps[0, 2], torch.tensor([[1 / 3, 1.0], [1.0, 1.0]]))
    assert result.boxes()[0] == [(0, 0, 2, 2), None, (0, 0, 2, 2)]


# --- identities on real architectures ---------------------------------------------------


def test_cam_identity_on_pretrained_model(builtin_model, sample_photos):
    result = camlens.explain(builtin_model, sample_photos, target="top5")
    assert result.layer == "_swish"
    relative = result.identity_error / float(result.scores.abs().max())
    assert relative < 1e-4
    assert result.targets[0, 0] in (281, 282, 283, 284, 285)
    assert result.targets[1, 0] == 967


def test_gradcam_times_hw_equals_cam_on_pretrained_model(builtin_model, sample_photos):
    x = builtin_model.preprocess(sample_photos)
    cam = CAM(builtin_model.module)(x, "top5")
    grad = GradCAM(builtin_model.module)(x, "top5")
    h, w = cam.shape[-2:]
    torch.testing.assert_close(grad * h * w, cam, rtol=1e-4, atol=1e-4 * float(cam.abs().max()))


tv = pytest.importorskip("torchvision")

EXACT = {  # name -> (feature layer, classifier)
    "resnet18": ("layer4", "fc"),
    "densenet121": ("features", "classifier"),
    "efficientnet_b0": ("features", "classifier.1"),
    "regnet_y_400mf": ("trunk_output", "fc"),
}
NOT_EXACT = {"vgg11": "features", "mobilenet_v3_small": "features", "convnext_tiny": "features"}


@pytest.fixture(scope="module")
def tv_models():
    torch.manual_seed(0)
    return {name: tv.models.get_model(name, weights=None).eval() for name in [*EXACT, *NOT_EXACT]}


@pytest.mark.parametrize("name", list(EXACT))
def test_cam_identity_on_random_torchvision_models(tv_models, name):
    model = tv_models[name]
    x = torch.randn(2, 3, 64, 96)  # non-square
    head = find_cam_head(model, x)
    assert (head.feature_layer, head.classifier, head.cam_exact) == (*EXACT[name], True)
    cam = CAM(model).run(x, "top5")
    scale = float(cam.logits.abs().max())
    assert cam.identity_error / scale < 1e-4
    if name == "densenet121":
        return  # a functional ReLU sits between the layer and GAP: Grad-CAM sees pre-ReLU maps
    grad = GradCAM(model)(x, "top5")
    h, w = cam.raw.shape[-2:]
    torch.testing.assert_close(grad * h * w, cam.raw, rtol=1e-3, atol=1e-4 * scale)


def test_densenet_needs_the_functional_relu():
    head = find_cam_head(tv.models.densenet121(weights=None).eval(), torch.randn(1, 3, 64, 64))
    assert head.feature_transform == "relu"


@pytest.mark.parametrize("name", list(NOT_EXACT))
def test_cam_refused_clearly_where_head_is_not_gap_linear(tv_models, name):
    model = tv_models[name]
    x = torch.randn(1, 3, 64, 64)
    assert find_cam_head(model, x).feature_layer == NOT_EXACT[name]
    with pytest.raises(ConfigError, match="gradcam"):
        CAM(model)(x)
    raw = GradCAM(model)(x)
    assert raw.shape[:2] == (1, 1) and torch.isfinite(raw).all() and raw.abs().sum() > 0


def test_timm_model_head_found():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 80)
    head = find_cam_head(model, x)
    assert (head.feature_layer, head.classifier, head.cam_exact) == ("layer4", "fc", True)
    assert CAM(model).run(x).identity_error / 10 < 1e-4


# --- modules called more than once -----------------------------------------------------


def test_shared_module_uses_last_call_by_default():
    model = SharedActNet().eval()
    x = torch.randn(2, 3, 16, 20)
    head = find_cam_head(model, x)
    assert (head.feature_layer, head.call, head.cam_exact) == ("act", -1, True)
    result = CAM(model).run(x, "top1")
    assert result.raw.shape == (2, 1, 4, 5)  # the head's resolution, not the stem's
    assert result.identity_error < 1e-5
    stem = GradCAM(model, layer="act", call=0)(x)
    assert stem.shape == (2, 1, 8, 10)


def test_reused_relu_in_basic_block_last_call_equals_block_output():
    model = tv.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    by_block = CAM(model, layer="layer4").run(x)
    by_relu = CAM(model, layer="layer4.1.relu").run(x)
    torch.testing.assert_close(by_relu.raw, by_block.raw)
    first_call = GradCAM(model, layer="layer4.1.relu", call=0)(x)
    assert not torch.allclose(first_call, GradCAM(model, layer="layer4")(x))


# --- no side effects ----------------------------------------------------------------------


@pytest.mark.parametrize("method", [CAM, GradCAM])
def test_state_and_hooks_restored_after_success(method):
    model = tv.models.resnet18(weights=None)
    model.train()
    model.layer1.requires_grad_(False)
    method(model)(torch.randn(2, 3, 32, 32))
    assert model.training and model.layer4.training
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())
    assert all(p.grad is None for p in model.parameters())  # never into parameter .grad
    assert count_hooks(model) == 0


@pytest.mark.parametrize("method", [CAM, GradCAM])
def test_state_and_hooks_restored_after_exception_in_forward(method):
    model = Exploding()
    x = torch.randn(1, 3, 8, 8)
    explainer = method(model, layer="conv")
    explainer(x)  # first call succeeds (head found)
    model.train()
    model.explode = True
    with pytest.raises(RuntimeError, match="boom"), explainer:
        explainer(x)
    assert model.training and count_hooks(model) == 0


def test_batchnorm_running_stats_untouched_by_model_in_train_mode():
    model = tv.models.resnet18(weights=None).train()
    before = model.bn1.running_mean.clone()
    GradCAM(model)(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)


def test_gradcam_works_inside_no_grad_and_inference_mode():
    model = SharedActNet().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = GradCAM(model)(x, "top2")
    with torch.no_grad():
        torch.testing.assert_close(GradCAM(model)(x, "top2"), expected)
    with torch.inference_mode():
        x_inf = x.clone()
    torch.testing.assert_close(GradCAM(model)(x_inf, "top2"), expected)


def test_inplace_relu_after_layer_sees_pre_relu_values():
    model = InplaceNet().eval()
    x = torch.randn(2, 3, 6, 5)
    raw = GradCAM(model, layer="conv")(x, torch.tensor([1, 3]))
    # independent computation with autograd on a copy of the conv output
    a = model.conv(x).detach().requires_grad_(True)
    logits = model.fc(torch.relu(a).mean(dim=(2, 3)))
    (grad,) = torch.autograd.grad(logits[0, 1] + logits[1, 3], a)
    expected = torch.einsum("nc,nchw->nhw", grad.mean(dim=(2, 3)), a.detach())
    torch.testing.assert_close(raw[:, 0], expected)
    assert (a < 0).any()  # the test would be vacuous without negative pre-ReLU values


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_tuple_and_dict_outputs(kind):
    inner = TinyCAMNet()
    wrapped = DictOutputNet(inner, kind)
    expected = CAM(inner)(TinyCAMNet.X, "top1")
    torch.testing.assert_close(CAM(wrapped)(TinyCAMNet.X, "top1"), expected)
    selector = "logits" if kind == "dict" else 0
    torch.testing.assert_close(CAM(wrapped, output=selector)(TinyCAMNet.X), expected)


def test_half_precision_model_gives_float32_maps():
    model = SharedActNet().eval()
    x = torch.randn(1, 3, 16, 16)
    expected = CAM(model)(x)
    raw = CAM(model.to(torch.bfloat16))(x.to(torch.bfloat16))
    assert raw.dtype == torch.float32
    torch.testing.assert_close(raw, expected, rtol=0.05, atol=0.05 * float(expected.abs().max()))


# --- configuration errors ---------------------------------------------------------------


def test_unknown_layer_lists_close_names():
    with pytest.raises(ConfigError, match="layer4"):
        CAM(tv.models.resnet18(weights=None), layer="layer5")


def test_unknown_method():
    with pytest.raises(ConfigError, match="cam, gradcam"):
        camlens.get_method("scorecamm")
