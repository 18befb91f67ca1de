"""Values of the CAM family: hand-computed oracles, exact identities, parity between code
paths, and comparison with independent implementations (torchcam, pytorch-grad-cam)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens import CAM, ConfigError, GradCAM
from camlens.methods import (
    METHODS,
    AblationCAM,
    EigenCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    ScoreCAM,
    XGradCAM,
    fuse_maps,
    get_method,
)
from tiny_models import SharedActNet, TinyCAMNet
from tiny_models_family import (
    FullResNet,
    IdentityNet,
    LogSoftmax,
    StatefulNet,
    TinyFlatNet,
    TwoStageNet,
    activations_and_gradients,
    assert_state_restored,
    count_hooks,
)

NEW = ["gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "ablationcam", "eigencam"]
MORE = [
    "gradcamelementwise",
    "eigengradcam",
    "finercam",
    "shapleycam",
    "fem",
    "kpcacam",
    "guidedbackprop",
    "guidedgradcam",
    "fullgrad",
]
ALL = [*NEW, *MORE, "random"]
#: Methods whose raw maps are at the input's resolution (gradients down to the pixels).
INPUT_RESOLUTION = {"guidedbackprop", "guidedgradcam", "fullgrad"}
GRADIENT = ["gradcam++", "hirescam", "xgradcam", "layercam"]
PERTURBATION = ["scorecam", "ablationcam"]


# --- hand-computed oracles (see the docstrings of the tiny models) -------------------------

A0, A1 = TinyFlatNet.X[0]
HAND = {
    "gradcam": torch.tensor([[0.5, 1.0], [1.5, 2.0]]),
    "hirescam": torch.tensor([[1.0, 0.0], [-2.0, 6.0]]),
    "layercam": torch.tensor([[1.0, 0.0], [1.0, 8.0]]),
    "xgradcam": torch.tensor([[0.1, 1.2], [1.55, 2.15]]),
    "gradcam++": 23 / 132 * A0 + 1 / 3 * A1,
    "ablationcam": 1.2 * A0 - 0.2 * A1,
    "scorecam": torch.sigmoid(torch.tensor(14 / 3)) * A0 + torch.sigmoid(torch.tensor(3.0)) * A1,
}


@pytest.mark.parametrize("name", list(HAND))
def test_flat_net_maps_match_hand_computation(name):
    result = get_method(name)(TinyFlatNet()).run(TinyFlatNet.X, 0)
    assert result.layer == "features" and result.raw.dtype == torch.float32
    torch.testing.assert_close(result.raw[0, 0], HAND[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(result.logits[0], torch.tensor([5.0, 0.0]))


def test_gradcampp_on_gap_head_by_hand():
    # g = w / 4 = [1/4, 1/2] everywhere; alpha = 1 / (2 + S g), S = [10, 0]: [2/9, 1/2]
    # w = 4 * alpha * relu(g) = [2/9, 1] -> 2/9 A_0 + A_1
    raw = GradCAMPlusPlus(TinyCAMNet())(TinyCAMNet.X, 0)
    expected = torch.tensor([[2 / 9, 4 / 9 + 1], [6 / 9, 8 / 9 - 1]])
    torch.testing.assert_close(raw[0, 0], expected, rtol=0, atol=1e-6)


def test_layercam_on_gap_head_is_cam_without_negative_weights_by_hand():
    # relu(w) / (h w): class 0 -> M_0 / 4; class 1 (w = [-1, 0]) -> 0; class 2 -> M_2 / 4
    raw = LayerCAM(TinyCAMNet())(TinyCAMNet.X, torch.tensor([[0, 1, 2]]))
    expected = torch.stack([TinyCAMNet.M[0] / 4, torch.zeros(2, 2), TinyCAMNet.M[2] / 4])
    torch.testing.assert_close(raw[0], expected, rtol=0, atol=1e-6)


def test_xgradcam_gives_zero_weight_to_a_channel_summing_to_zero():
    # A_1 = [[0, 1], [0, -1]] sums to 0: its weight is undefined and set to 0; w_0 = 1 / 4
    raw = XGradCAM(TinyCAMNet())(TinyCAMNet.X, 0)
    torch.testing.assert_close(raw[0, 0], TinyCAMNet.X[0, 0] / 4, rtol=0, atol=1e-6)


# --- exact identities ---------------------------------------------------------------------


def test_hirescam_is_cam_over_hw_and_sums_to_the_logit_on_tiny_model():
    targets = torch.tensor([[0, 1, 2]])
    raw = HiResCAM(TinyCAMNet())(TinyCAMNet.X, targets)
    torch.testing.assert_close(raw[0] * 4, TinyCAMNet.M, rtol=0, atol=1e-6)
    bias = torch.tensor([0.1, 0.2, 0.3])
    torch.testing.assert_close(raw[0].sum(dim=(-2, -1)) + bias, TinyCAMNet.Y)


def test_identities_on_pretrained_model(builtin_model, sample_photos):
    module = builtin_model.module
    x = builtin_model.preprocess(sample_photos)
    cam = CAM(module).run(x, "top2")
    h, w = cam.raw.shape[-2:]
    scale = float(cam.raw.abs().max())
    hires = HiResCAM(module).run(x, "top2")
    assert torch.equal(hires.targets, cam.targets) and hires.layer == cam.layer == "_swish"
    torch.testing.assert_close(hires.raw * h * w, cam.raw, rtol=1e-4, atol=1e-4 * scale)
    bias = module._fc.bias.detach()[cam.targets]
    torch.testing.assert_close(
        hires.raw.sum(dim=(-2, -1)) + bias, cam.logits.gather(1, cam.targets)
    )
    # XGrad-CAM on a GAP head: w_k = sum_ij (A_k / sum A_k) * w_k / hw = w_k / hw (Grad-CAM)
    # (a ReLU6 channel summing to 0 is all zeros: weight 0 and no part in either map)
    assert (_layer_output(module, "_swish", x).sum(dim=(-2, -1)) > 0).any()
    xgrad = XGradCAM(module)(x, "top2")
    torch.testing.assert_close(xgrad * h * w, cam.raw, rtol=1e-3, atol=1e-4 * scale)


def _layer_output(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    from camlens.hooks import LayerCapture, get_layer

    with LayerCapture(get_layer(module, name)) as capture, torch.no_grad():
        module(x)
    return capture.activation


@pytest.mark.parametrize("name", PERTURBATION)
def test_chunk_size_parity(name):
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    one = get_method(name)(model, batch_size=1)(x, "top2")
    seven = get_method(name)(model, batch_size=7)(x, "top2")  # 16 pairs: 7 + 7 + 2
    big = get_method(name)(model, batch_size=64)(x, "top2")
    torch.testing.assert_close(seven, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big, one, rtol=1e-5, atol=1e-6)
    assert one.shape == (2, 2, 4, 5) and one.abs().sum() > 0


@pytest.mark.parametrize("name", PERTURBATION)
def test_perturbed_inputs_are_streamed_in_bounded_chunks(name):
    model = TwoStageNet().eval()
    x = torch.randn(3, 3, 8, 10)
    method = get_method(name)(model, batch_size=5)
    method(x)  # the head is found
    batches = []
    handle = model.register_forward_pre_hook(lambda m, inputs: batches.append(len(inputs[0])))
    try:
        method(x, "top2")
    finally:
        handle.remove()
    # one forward for the batch itself, then 3 images x 8 channels in chunks of <= 5
    assert batches == [3, 5, 5, 5, 5, 4]


def _weights_kept(method_class):
    class Keeping(method_class):
        def combine(self, weights, activation):
            self.kept = weights.clone()
            return super().combine(weights, activation)

    return Keeping


@pytest.mark.parametrize("method_class", [ScoreCAM, AblationCAM])
@pytest.mark.parametrize("keep", [1, 3])
def test_max_channels_keeps_the_full_weights_of_the_top_channels(method_class, keep):
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    full = _weights_kept(method_class)(model)
    full(x, "top2")
    activation = _layer_output(model, "stage2", x)
    top = activation.mean(dim=(-2, -1)).topk(keep, dim=1).indices
    mask = torch.zeros(2, 8).scatter_(1, top, 1.0)[:, None]
    expected = torch.einsum("nkc,nchw->nkhw", full.kept * mask, activation)
    fast = method_class(model, max_channels=keep, batch_size=2)(x, "top2")
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
    assert (full.kept * (1 - mask)).abs().sum() > 0  # the dropped channels did count


def test_scorecam_skips_constant_channels():
    model = IdentityNet(3)
    x = torch.rand(1, 3, 4, 4) + 0.5
    x[0, 1] = 2.0  # a constant channel: the authors' code skips it (weight 0)
    probs = []
    for k in (0, 2):
        mask = (x[0, k] - x[0, k].min()) / (x[0, k].max() - x[0, k].min())
        probs.append(model(x * mask).softmax(dim=1)[0, 0])
    expected = probs[0] * x[0, 0] + probs[1] * x[0, 2]
    torch.testing.assert_close(ScoreCAM(model)(x, 0)[0, 0], expected.detach())


@pytest.mark.parametrize("call", [-1, 0])
def test_ablationcam_zeroes_the_chosen_call_of_a_shared_module(call):
    model = SharedActNet().eval()
    x = torch.randn(2, 3, 8, 8)
    raw = AblationCAM(model, layer="act", call=call, batch_size=5)(x, "top1")

    def forward(n, channel=None):  # the model, written out, with one channel zeroed
        stem = model.act(model.stem(x[n : n + 1]))
        if call == 0 and channel is not None:
            stem[:, channel] = 0
        head = model.act(model.head(stem))
        if call == -1 and channel is not None:
            head[:, channel] = 0
        return model.fc(head.mean(dim=(2, 3)))[0], stem if call == 0 else head

    with torch.no_grad():
        for n in range(2):
            logits, activation = forward(n)
            c = int(logits.argmax())
            drops = [
                (logits[c] - forward(n, k)[0][c]) / logits[c] for k in range(len(activation[0]))
            ]
            expected = torch.einsum("k,khw->hw", torch.stack(drops), activation[0])
            torch.testing.assert_close(raw[n, 0], expected, rtol=1e-4, atol=1e-6)


def test_ablationcam_without_division_when_score_is_zero():
    model = TinyFlatNet()
    raw = AblationCAM(model)(TinyFlatNet.X, 1)  # y_1 = 0 and stays 0: weights 0
    assert torch.equal(raw, torch.zeros(1, 1, 2, 2))


# --- Eigen-CAM ------------------------------------------------------------------------------


def _numpy_projection(activation: torch.Tensor, center: bool) -> np.ndarray:
    result = []
    for a in activation.double().numpy():
        matrix = a.reshape(a.shape[0], -1).T
        if center:
            matrix = matrix - matrix.mean(axis=0)
        u, s, _ = np.linalg.svd(matrix, full_matrices=False)
        result.append(u[:, 0] * s[0])
    return np.stack(result)


@pytest.mark.parametrize("center", [False, True])
def test_eigencam_is_the_svd_projection_with_positive_correlation(center):
    torch.manual_seed(1)
    x = torch.rand(3, 6, 4, 5) * torch.rand(3, 6, 1, 1)
    raw = EigenCAM(IdentityNet(6), center=center)(x, "top2")
    assert torch.equal(raw[:, 0], raw[:, 1])  # class-agnostic
    expected = torch.from_numpy(_numpy_projection(x, center)).float()
    ours = raw[:, 0].flatten(1)
    signs = torch.sign((ours * expected).sum(dim=1))
    torch.testing.assert_close(ours, expected * signs[:, None], rtol=1e-4, atol=1e-5)
    energy = x.sum(dim=1).flatten(1)
    for n in range(3):
        assert np.corrcoef(ours[n].numpy(), energy[n].numpy())[0, 1] > 0


def test_eigencam_flips_the_negative_singular_vector():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.5, 1.0], [2.0, 3.0]]]])
    u, s, _ = torch.linalg.svd(x[0].flatten(1).T, full_matrices=False)
    plain = u[:, 0] * s[0]
    assert (plain < 0).all()  # LAPACK's sign: the test would be vacuous otherwise
    raw = EigenCAM(TinyCAMNet())(x, "top1")
    torch.testing.assert_close(raw[0, 0].flatten(), -plain)


def test_eigencam_centered_matches_pytorch_grad_cam_up_to_its_sign():
    svd = pytest.importorskip("pytorch_grad_cam.utils.svd_on_activations")
    torch.manual_seed(2)
    x = torch.rand(3, 5, 3, 4)
    ours = EigenCAM(IdentityNet(5), center=True)(x, "top1")[:, 0]
    theirs = torch.from_numpy(svd.get_2d_projection(x.numpy()))
    for n in range(3):
        sign = torch.sign((ours[n] * theirs[n]).sum())
        torch.testing.assert_close(ours[n], sign * theirs[n], rtol=1e-4, atol=1e-5)


# --- random baseline ------------------------------------------------------------------------


def test_random_maps_are_seeded():
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    first = RandomCAM(model, seed=7)(x, "top3")
    assert first.shape == (2, 3, 4, 5) and first.min() >= 0 and first.max() < 1
    assert torch.equal(RandomCAM(model, seed=7)(x, "top3"), first)
    assert not torch.equal(RandomCAM(model, seed=8)(x, "top3"), first)
    method = RandomCAM(model, seed=7)
    method(x, "top3")
    assert not torch.equal(method(x, "top3"), first)  # the stream advances between batches


# --- smoothing ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gradcam", *GRADIENT])
def test_smoothing_once_without_noise_equals_plain(name):
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    plain = get_method(name)(model).run(x, "top2")
    smooth = get_method(name)(model, smooth=1, smooth_sigma=0.0).run(x, "top2")
    assert torch.equal(smooth.raw, plain.raw)
    assert torch.equal(smooth.targets, plain.targets)
    assert torch.equal(smooth.logits, plain.logits)


def test_smoothing_averages_maps_of_noisy_copies_for_the_clean_targets():
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    torch.manual_seed(5)
    result = GradCAMPlusPlus(model, smooth=3, smooth_sigma=0.2).run(x, "top1")
    clean = model(x)
    assert torch.equal(result.targets, clean.argmax(dim=1, keepdim=True))
    torch.testing.assert_close(result.logits, clean.detach())
    torch.manual_seed(5)
    sigma = 0.2 * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    maps = [
        GradCAMPlusPlus(model)(x + torch.randn_like(x) * sigma.view(-1, 1, 1, 1), result.targets)
        for _ in range(3)
    ]
    torch.testing.assert_close(result.raw, sum(maps) / 3)
    assert not torch.allclose(result.raw, GradCAMPlusPlus(model)(x, result.targets))


# --- Layer-CAM over several layers ----------------------------------------------------------


def test_layercam_fusion_by_hand_with_autograd():
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    with torch.no_grad():  # the caller's no_grad must not matter
        result = LayerCAM(model, layer=["stage1", "stage2"]).run(x, torch.tensor([1, 3]))
    assert result.layer == "stage1,stage2" and result.raw.shape == (2, 1, 8, 10)
    # independent: autograd through both layers, Eq. 9 scaling, upsampling, element-wise max
    a1 = model.stage1(x).detach().requires_grad_(True)
    a2 = model.stage2(a1)
    logits = model.fc(a2.mean(dim=(2, 3)))
    g1, g2 = torch.autograd.grad(logits[0, 1] + logits[1, 3], [a1, a2])
    fused = []
    for g, a in ((g1, a1), (g2, a2)):
        m = (g.relu() * a).sum(dim=1, keepdim=True).detach().relu()
        m = torch.tanh(2 * m / m.amax(dim=(2, 3), keepdim=True))
        fused.append(F.interpolate(m, size=(8, 10), mode="bilinear", align_corners=False))
    expected = torch.maximum(*fused)
    torch.testing.assert_close(result.raw, expected)
    singles = [LayerCAM(model, layer=n)(x, torch.tensor([1, 3])) for n in ("stage1", "stage2")]
    torch.testing.assert_close(result.raw, fuse_maps(singles))
    assert count_hooks(model) == 0


def test_layer_list_only_for_layercam():
    with pytest.raises(ConfigError, match="only layercam"):
        GradCAM(TwoStageNet(), layer=["stage1", "stage2"])
    with pytest.raises(ConfigError, match="stage3"):
        LayerCAM(TwoStageNet(), layer=["stage1", "stage3"])
    model = TwoStageNet().eval()
    x = torch.randn(1, 3, 8, 8)
    single = LayerCAM(model, layer=["stage2"]).run(x)
    assert single.layer == "stage2" and single.raw.shape == (1, 1, 4, 4)
    fused = LayerCAM(model, layer=["stage1", "stage2"]).run(x)
    again = LayerCAM(model, layer=fused.layer).run(x)  # "stage1,stage2" round-trips
    assert again.layer == fused.layer and torch.equal(again.raw, fused.raw)


# --- no side effects, dtypes, devices -------------------------------------------------------


def _options(name: str) -> dict:
    return {"max_channels": 2, "batch_size": 3} if name in PERTURBATION else {}


@pytest.mark.parametrize("name", ALL)
def test_state_and_hooks_restored_after_success(name):
    model = StatefulNet().train()
    model.stem.requires_grad_(False)
    before = model.stem[1].running_mean.clone()
    raw = get_method(name)(model, **_options(name))(torch.randn(2, 3, 8, 8), "top2")
    size = (8, 8) if name in INPUT_RESOLUTION else (4, 4)
    assert raw.shape == (2, 2, *size) and torch.isfinite(raw).all()
    assert_state_restored(model, before)


@pytest.mark.parametrize(
    ("name", "fail_at"), [(n, 1) for n in ALL] + [(n, 2) for n in PERTURBATION]
)
def test_state_and_hooks_restored_after_exception(name, fail_at):
    model = StatefulNet()
    x = torch.randn(2, 3, 8, 8)
    method = get_method(name)(model, **_options(name))
    method(x)  # the head is found; the next forward passes are the method's own
    model.train()
    model.calls, model.fail_at = 0, fail_at  # 2 = the first perturbed chunk
    with pytest.raises(RuntimeError, match="boom"), method:
        method(x)
    assert model.calls == fail_at
    assert model.training and model.dropout.training and count_hooks(model) == 0
    model.fail_at = None
    assert torch.isfinite(method(x)).all()


@pytest.mark.parametrize("name", ["gradcam++", "layercam", "scorecam", "ablationcam", "eigencam"])
def test_bfloat16_model_gives_float32_maps_close_to_float32(name):
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    expected = get_method(name)(model)(x, "top1")
    raw = get_method(name)(model.to(torch.bfloat16))(x.to(torch.bfloat16), "top1")
    assert raw.dtype == torch.float32
    scale = float(expected.abs().max())
    torch.testing.assert_close(raw, expected, rtol=0.05, atol=0.05 * scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name):
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    expected = get_method(name)(model)(x, "top2")
    raw = get_method(name)(model.cuda())(x.cuda(), "top2")
    assert raw.device.type == "cuda" and raw.dtype == torch.float32
    scale = float(expected.abs().max())  # (random: its generator lives on the CPU)
    torch.testing.assert_close(raw.cpu(), expected, rtol=1e-3, atol=1e-3 * scale)
    half = get_method(name)(model.half())(x.cuda().half(), "top2")
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


# --- names, API, configuration errors -------------------------------------------------------


def test_names_and_aliases():
    assert list(METHODS) == [
        "cam",
        "gradcam",
        *NEW,
        *MORE,
        "drise",
        "rollout",
        "gradrollout",
        "random",
    ]
    for spelling in ("gradcam++", "Grad-CAM++", "gradcampp", "grad_cam_plus_plus"):
        assert get_method(spelling) is GradCAMPlusPlus
    assert get_method("Layer-CAM") is LayerCAM and get_method("score_cam") is ScoreCAM
    assert get_method("Eigen-CAM") is EigenCAM and get_method("RANDOM") is RandomCAM


@pytest.mark.parametrize("name", ALL)
def test_every_method_through_the_api(name):
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    result = camlens.explain(model, x, method=name, target="top2")
    assert result.method == name and result.layer == "stage2"
    size = (8, 10) if name in INPUT_RESOLUTION else (4, 5)
    assert result.raw.shape == (2, 2, *size) and result.maps.shape == (2, 2, 8, 10)
    assert torch.equal(result.raw, get_method(name)(model)(x, "top2"))


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("scorecam", {"batch_size": 0}, "batch_size"),
        ("ablationcam", {"max_channels": 0}, "max_channels"),
        ("scorecam", {"smooth": 2}, "gradient methods"),
        ("eigencam", {"smooth": 2}, "gradient methods"),
        ("gradcam++", {"smooth": -1}, "smooth"),
        ("layercam", {"fusion_gamma": 0}, "fusion_gamma"),
    ],
)
def test_configuration_errors(name, options, message):
    with pytest.raises(ConfigError, match=message):
        get_method(name)(TwoStageNet(), **options)


# --- independent implementations ------------------------------------------------------------

torchcam = pytest.importorskip("torchcam.methods")


def _torchcam_maps(extractor_class, model, layer, x, classes, **options):
    with extractor_class(
        model, target_layer=layer, input_shape=tuple(x.shape[1:]), **options
    ) as ex:
        scores = model(x)
        maps = ex(class_idx=classes, scores=scores, normalized=False)
    return [m.detach() for m in maps]


def _by_max(maps: torch.Tensor) -> torch.Tensor:
    """camlens' normalisation at feature resolution: relu, divided by the maximum."""
    return camlens.normalize_maps(maps.reshape(-1, 1, *maps.shape[-2:]), maps.shape[-2:])


@pytest.mark.parametrize(("ours", "theirs"), [(XGradCAM, "XGradCAM"), (LayerCAM, "LayerCAM")])
def test_gradient_methods_match_torchcam_on_pretrained_model(
    builtin_model, sample_photos, ours, theirs
):
    module = builtin_model.module
    x = builtin_model.preprocess(sample_photos)
    result = ours(module).run(x, torch.tensor([285, 967]))
    (tc,) = _torchcam_maps(getattr(torchcam, theirs), module, "_swish", x, [285, 967])
    torch.testing.assert_close(result.raw[:, 0].relu(), tc, rtol=1e-4, atol=1e-5 * float(tc.max()))


def test_layercam_fusion_matches_torchcam_fuse_cams():
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    ours = LayerCAM(model, layer=["stage1", "stage2"])(x, torch.tensor([0, 2]))
    maps = _torchcam_maps(torchcam.LayerCAM, model, ["stage1", "stage2"], x, [0, 2])
    normalised = [_by_max(m)[:, 0] for m in maps]  # torchcam would min-max normalise
    fused = torchcam.LayerCAM.fuse_cams(normalised)
    torch.testing.assert_close(ours[:, 0], fused)


def test_scorecam_matches_torchcam_on_a_log_probability_model():
    # torchcam's weight is softmax over channels of the logit; for a model that outputs
    # log-probabilities it is p_c(k) / sum_j p_c(j): the authors' weight up to a constant.
    model = LogSoftmax(FullResNet().eval())
    x = torch.randn(2, 3, 6, 7)
    ours = ScoreCAM(model, layer="inner.features", batch_size=5)(x, torch.tensor([1, 4]))
    with torchcam.ScoreCAM(model, "inner.features", batch_size=5, input_shape=(3, 6, 7)) as ex:
        with torch.inference_mode():
            model(x)
        (tc,) = ex(class_idx=[1, 4], normalized=False)
    torch.testing.assert_close(_by_max(ours[:, 0]), _by_max(tc), rtol=1e-4, atol=1e-5)


def test_gradcampp_and_xgradcam_match_pytorch_grad_cam_formulas():
    pgc = pytest.importorskip("pytorch_grad_cam")
    model = TwoStageNet().eval()
    with torch.no_grad():
        model.fc.weight.mul_(40)  # gradients of order 1: pytorch-grad-cam's eps is negligible
    x = torch.randn(2, 3, 8, 10)
    a, g = activations_and_gradients(model, "stage2", x, [1, 2])
    for ours, theirs in ((GradCAMPlusPlus, pgc.GradCAMPlusPlus), (XGradCAM, pgc.XGradCAM)):
        weights = theirs.get_cam_weights(None, None, None, None, a.numpy(), g.numpy())
        expected = torch.einsum("nc,nchw->nhw", torch.from_numpy(weights).float(), a)
        raw = ours(model)(x, torch.tensor([1, 2]))
        torch.testing.assert_close(raw[:, 0], expected, rtol=1e-4, atol=1e-5)


def test_ablationcam_matches_pytorch_grad_cam_on_relu_features():
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = FullResNet().eval()
    x = torch.randn(2, 3, 6, 7)
    ours = AblationCAM(model, batch_size=4)(x, torch.tensor([1, 3]))[:, 0]
    # pytorch-grad-cam zeroes channels when the layer's minimum is 0 (ReLU), as the paper does
    ablation = pgc.AblationCAM(model, target_layers=[model.features], batch_size=4)
    theirs = ablation(x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(3)])
    positive = ours.relu().flatten(1)
    low, high = positive.amin(dim=1, keepdim=True), positive.amax(dim=1, keepdim=True)
    minmax = ((positive - low) / (high - low + 1e-7)).view_as(ours)
    torch.testing.assert_close(minmax, torch.from_numpy(theirs), rtol=1e-4, atol=1e-4)
