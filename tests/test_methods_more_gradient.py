"""Values of Grad-CAM element-wise, Eigen-Grad-CAM, FEM and KPCA-CAM: maps computed by hand
on tiny models, parity with pytorch-grad-cam 1.5.7 (raw maps, and its relu + min-max maps up
to the documented sign difference), and no side effects on the model."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from camlens.methods.gradient import GradCAMElementWise, HiResCAM, LayerCAM
from camlens.methods.projection import KPCACAM, EigenCAM, EigenGradCAM
from camlens.methods.statistical import FEM
from tiny_models import TinyCAMNet
from tiny_models_family import (
    IdentityNet,
    StatefulNet,
    TinyFlatNet,
    activations_and_gradients,
    assert_state_restored,
    count_hooks,
)

METHODS = [GradCAMElementWise, EigenGradCAM, FEM, KPCACAM]


def _image(*rows_per_channel: list[list[float]]) -> torch.Tensor:
    """A (1, C, h, w) input from one nested list per channel."""
    return torch.tensor([rows_per_channel], dtype=torch.float32)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(((a - a.mean()) * (b - b.mean())).sum())


# --- Grad-CAM element-wise, by hand (TinyFlatNet: G_0, G_1 in its docstring) ----------------


def test_gradcam_elementwise_by_hand_on_signed_activations():
    # A_1 = [[2, 0], [-1, 1]] (one negative value), A_0 as in TinyFlatNet.X:
    #   G_0 A_0 = [[1, 0], [-3, 8]]     G_1 A_1 = [[0, 0], [-1, -2]]
    #   element-wise: relu(G_0 A_0) + relu(G_1 A_1)  = [[1, 0], [0, 8]]
    #   Layer-CAM:    relu(G_0) A_0 + relu(G_1) A_1   = [[1, 0], [-1, 8]]
    #   HiResCAM:     G_0 A_0 + G_1 A_1               = [[1, 0], [-4, 6]]
    # class 1 has zero weights: zero gradient, zero map.
    x = _image([[1, 2], [3, 4]], [[2, 0], [-1, 1]])
    targets = torch.tensor([[0, 1]])
    raw = GradCAMElementWise(TinyFlatNet())(x, targets)
    expected = torch.stack([torch.tensor([[1.0, 0.0], [0.0, 8.0]]), torch.zeros(2, 2)])
    torch.testing.assert_close(raw[0], expected, rtol=0, atol=1e-6)
    layer = LayerCAM(TinyFlatNet())(x, 0)[0, 0]
    torch.testing.assert_close(layer, torch.tensor([[1.0, 0.0], [-1.0, 8.0]]), rtol=0, atol=1e-6)
    hires = HiResCAM(TinyFlatNet())(x, 0)[0, 0]
    torch.testing.assert_close(hires, torch.tensor([[1.0, 0.0], [-4.0, 6.0]]), rtol=0, atol=1e-6)


def test_gradcam_elementwise_equals_layercam_on_non_negative_activations():
    # TinyFlatNet.X >= 0: relu(g A) = relu(g) A; its docstring gives Layer-CAM [[1, 0], [1, 8]]
    raw = GradCAMElementWise(TinyFlatNet())(TinyFlatNet.X, 0)
    torch.testing.assert_close(raw[0, 0], torch.tensor([[1.0, 0.0], [1.0, 8.0]]), rtol=0, atol=0)


# --- Eigen-Grad-CAM, by hand ------------------------------------------------------------------


@pytest.mark.parametrize("center", [True, False])
def test_eigengradcam_by_hand_rank_one_with_negated_sign(center):
    # A_0 = [[0, 5], [1, 1]], A_1 = [[3, 0], [2, 2]] on TinyFlatNet, class 0:
    #   P_0 = G_0 A_0 = [[0, 0], [-1, 2]],  P_1 = G_1 A_1 = [[0, 0], [2, -4]] = -2 P_0
    # rows of O are P_0[i, j] * (1, -2) (rank one), so the first direction is (1, -2) / sqrt 5
    # and O v = +-sqrt(5) P_0 (centred: P_0 - 1/4). The sign rule follows sum_k P_k = -P_0:
    #   M = -sqrt(5) (P_0 - mean)   (the negation of the projection on +(1, -2)).
    # Class 1 (zero gradient): the products are 0, the map is 0 (each target its own map).
    x = _image([[0, 5], [1, 1]], [[3, 0], [2, 2]])
    p0 = torch.tensor([[0.0, 0.0], [-1.0, 2.0]])
    expected = -math.sqrt(5) * (p0 - p0.mean() if center else p0)
    raw = EigenGradCAM(TinyFlatNet(), center=center)(x, torch.tensor([[0, 1]]))
    torch.testing.assert_close(raw[0, 0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(raw[0, 1], torch.zeros(2, 2), rtol=0, atol=0)


def test_eigengradcam_by_hand_on_gap_head_per_target():
    # TinyCAMNet (GAP: g_k = w_k^c / 4 everywhere), A_0 = [[1, 2], [3, 4]], A_1 = [[0, 1], [0, -1]].
    # Class 1, w = [-1, 0]: P = (-A_0 / 4, 0), rank one along channel 0; centred and signed to
    #   correlate with -A_0 / 4: M_1 = -(A_0 - 2.5) / 4 = [[.375, .125], [-.125, -.375]].
    # Class 0, w = [1, 2]: P_0 = A_0 / 4, P_1 = A_1 / 2; centred rows (positions in reading
    #   order) O = [(-.375, 0), (-.125, .5), (.125, 0), (.375, -.5)], 16 O^T O = [[5, -4], [-4, 8]]
    #   with top eigenvalue lam = (13 + sqrt 73) / 2 and eigenvector v ~ (4, 5 - lam).
    #   O v / |v| = [-1.5, -3.386, .5, 4.386] / 7.023; sum_k P_k = [.25, 1, .75, .5] correlates
    #   negatively with it (covariance -1.19 / 7.023), so M_0 = -O v / |v|.
    raw = EigenGradCAM(TinyCAMNet())(TinyCAMNet.X, torch.tensor([[0, 1]]))
    lam = (13 + math.sqrt(73)) / 2
    v = torch.tensor([4.0, 5.0 - lam], dtype=torch.float64)
    rows = torch.tensor([[-0.375, 0.0], [-0.125, 0.5], [0.125, 0.0], [0.375, -0.5]])
    class0 = -(rows.double() @ (v / v.norm())).view(2, 2).float()
    class1 = torch.tensor([[0.375, 0.125], [-0.125, -0.375]])
    torch.testing.assert_close(raw[0, 0], class0, rtol=0, atol=1e-6)
    torch.testing.assert_close(raw[0, 1], class1, rtol=0, atol=1e-6)


# --- FEM, by hand ------------------------------------------------------------------------------


def test_fem_by_hand_two_sigma_on_three_by_three():
    # A_0: a single 9 among zeros: mean 1, std sqrt(9 - 1) = 2.83, threshold 6.66 -> 1 of 9.
    # A_1 = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]: mean 16/9, std sqrt(36/9 - (16/9)^2) = 0.916,
    #   threshold 3.61 -> only the 4: 1 of 9.   M = (A_0 + A_1) / 9; the same for each target.
    a0 = [[0, 0, 0], [0, 9, 0], [0, 0, 0]]
    a1 = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    raw = FEM(IdentityNet(2))(_image(a0, a1), "top2")
    expected = torch.tensor([[1.0, 2.0, 1.0], [2.0, 13.0, 2.0], [1.0, 2.0, 1.0]]) / 9
    torch.testing.assert_close(raw[0, 0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(raw[0, 1], expected, rtol=0, atol=0)


def test_fem_uses_the_population_std_by_hand():
    # k = 1 on 2 x 2. A_0 = [[0, 2], [2, 3]]: mean 1.75, population std sqrt(1.1875) = 1.090,
    #   threshold 2.840 < 3 -> weight 1/4 (the sample std, 1.258, would give 3.008: weight 0).
    # A_1 = [[1, 2], [3, 4]]: mean 2.5, std 1.118, threshold 3.618 -> only the 4: weight 1/4.
    x = _image([[0, 2], [2, 3]], [[1, 2], [3, 4]])
    raw = FEM(IdentityNet(2), k=1)(x, 0)
    torch.testing.assert_close(raw[0, 0], (x[0, 0] + x[0, 1]) / 4, rtol=0, atol=1e-6)


def test_fem_zero_weights_for_constant_channels_and_too_few_positions():
    # a constant channel has nothing above its mean; on 2 x 2 no z-score exceeds sqrt(3) < 2
    x = _image([[5, 5], [5, 5]], [[0, 0], [0, 100]])
    assert torch.equal(FEM(IdentityNet(2))(x, 0), torch.zeros(1, 1, 2, 2))
    # with k = 1: channel 0 still 0, channel 1 (z = sqrt 3 at the 100) weight 1/4
    expected = torch.tensor([[0.0, 0.0], [0.0, 25.0]])
    torch.testing.assert_close(FEM(IdentityNet(2), k=1)(x, 0)[0, 0], expected, rtol=0, atol=0)


# --- KPCA-CAM, by hand -------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_kpcacam_by_hand_on_two_positions(flip):
    # Two positions (1 x 2 map), C = 2: o_1 = (1, 0), o_2 = (0, 3); centred x_1 = -x_2 =
    # (.5, -1.5), |x|^2 = 2.5. Sigmoid kernel, gamma = 1 / C = .5, coef0 = 1:
    #   a = k(x_1, x_1) = k(x_2, x_2) = tanh(.5 * 2.5 + 1) = tanh(2.25), b = k(x_1, x_2) = tanh(-.25)
    # centred kernel matrix ((a - b) / 2) [[1, -1], [-1, 1]]: eigenvalue a - b, eigenvector
    # (1, -1) / sqrt 2, scores sqrt((a - b) / 2) (1, -1); the sign follows sum_k A_k = (1, 3):
    #   M = sqrt((a - b) / 2) (-1, 1).   Linear kernel: a = 2.5, b = -2.5 -> sqrt(2.5) (-1, 1).
    # Swapping the positions swaps the map (the sign follows the image, not the entry order).
    order = [1, 0] if flip else [0, 1]
    x = _image([[1, 0]], [[0, 3]])[..., order]
    a, b = math.tanh(2.25), math.tanh(-0.25)
    sigmoid = math.sqrt((a - b) / 2) * torch.tensor([[-1.0, 1.0]])[..., order]
    linear = math.sqrt(2.5) * torch.tensor([[-1.0, 1.0]])[..., order]
    raw = KPCACAM(IdentityNet(2))(x, "top2")
    torch.testing.assert_close(raw[0, 0], sigmoid, rtol=0, atol=1e-6)
    torch.testing.assert_close(raw[0, 1], sigmoid, rtol=0, atol=0)  # class-agnostic
    raw = KPCACAM(IdentityNet(2), kernel="linear")(x, 0)
    torch.testing.assert_close(raw[0, 0], linear, rtol=0, atol=1e-6)
    # gamma given: a = tanh(2 * 2.5 + 1), b = tanh(-2 * 2.5 + 1)
    a, b = math.tanh(6.0), math.tanh(-4.0)
    raw = KPCACAM(IdentityNet(2), gamma=2.0)(x, 0)
    expected = math.sqrt((a - b) / 2) * torch.tensor([[-1.0, 1.0]])[..., order]
    torch.testing.assert_close(raw[0, 0], expected, rtol=0, atol=1e-6)


def test_kpcacam_linear_kernel_is_centred_eigencam():
    torch.manual_seed(3)
    x = torch.rand(3, 5, 4, 6)
    ours = KPCACAM(IdentityNet(5), kernel="linear")(x, 0)
    eigen = EigenCAM(IdentityNet(5), center=True)(x, 0)
    torch.testing.assert_close(ours, eigen, rtol=1e-4, atol=1e-5)


# --- parity with pytorch-grad-cam ---------------------------------------------------------------


class ParityNet(nn.Module):
    """conv -> ReLU -> conv (``features``, signed, at input resolution) -> ReLU -> conv stride
    2 -> ReLU -> GAP -> fc: the gradients at ``features`` vary by position."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.features(x)).mean(dim=(2, 3)))


def _setup(seed: int, size: tuple[int, int] = (9, 11)) -> tuple[ParityNet, torch.Tensor]:
    torch.manual_seed(seed)
    model = ParityNet().eval()
    with torch.no_grad():
        model.fc.weight.mul_(10)  # gradients of order 1
    return model, torch.randn(3, 3, *size)


def _pgc_scale(raw: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's normalisation of (N, h, w) maps at the feature size: relu, then
    ``(m - min) / (1e-7 + max)`` per image (``scale_cam_image``), twice (per layer, then
    after averaging the layers)."""
    scaled = raw.double().relu()
    for _ in range(2):
        scaled = scaled - scaled.amin(dim=(-2, -1), keepdim=True)
        scaled = scaled / (1e-7 + scaled.amax(dim=(-2, -1), keepdim=True))
    return scaled.float()


def _pgc_maps(cam_class, model, x, classes, **options) -> torch.Tensor:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cam_class(model=model, target_layers=[model.features], **options) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    assert count_hooks(model) == 0
    return torch.from_numpy(out)


CLASSES = [[1, 3], [0, 4], [2, 2]]  # two targets per image


@pytest.mark.parametrize("seed", [0, 1])
def test_gradcam_elementwise_matches_pytorch_grad_cam(seed):
    pgc = pytest.importorskip("pytorch_grad_cam")
    model, x = _setup(seed)
    raw = GradCAMElementWise(model, "features")(x, torch.tensor(CLASSES))
    for j in range(2):
        classes = [c[j] for c in CLASSES]
        a, g = activations_and_gradients(model, "features", x, classes)
        theirs_raw = pgc.GradCAMElementWise.get_cam_image(
            None, None, None, None, a.numpy(), g.numpy(), False
        )
        torch.testing.assert_close(raw[:, j], torch.from_numpy(theirs_raw), rtol=1e-5, atol=1e-6)
        theirs = _pgc_maps(pgc.GradCAMElementWise, model, x, classes)
        torch.testing.assert_close(_pgc_scale(raw[:, j]), theirs, rtol=0, atol=1e-5)
        assert (a < 0).any() and (g < 0).any()  # both signs occur: the relu matters


@pytest.mark.parametrize("seed", [0, 1])
def test_eigengradcam_matches_pytorch_grad_cam_up_to_its_sign(seed):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    model, x = _setup(seed)
    raw = EigenGradCAM(model, "features")(x, torch.tensor(CLASSES))
    assert not torch.allclose(raw[:, 0], raw[:, 1])  # per target
    for j in range(2):
        classes = [c[j] for c in CLASSES]
        a, g = activations_and_gradients(model, "features", x, classes)
        theirs_raw = torch.from_numpy(get_2d_projection((g * a).numpy()))
        theirs = _pgc_maps(pgc.EigenGradCAM, model, x, classes)
        for n in range(3):
            ours = raw[n, j]
            # camlens' sign: positive correlation with sum_k g_k A_k (HiResCAM's map)
            assert _pearson(ours, (g[n] * a[n]).sum(dim=0)) > 0
            sign = 1.0 if (ours * theirs_raw[n]).sum() >= 0 else -1.0
            scale = float(ours.abs().max())
            torch.testing.assert_close(ours, sign * theirs_raw[n], rtol=1e-4, atol=1e-5 * scale)
            torch.testing.assert_close(
                _pgc_scale(sign * ours[None])[0], theirs[n], atol=1e-4, rtol=0
            )


@pytest.mark.parametrize("k", [2.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_fem_matches_pytorch_grad_cam(seed, k):
    pgc = pytest.importorskip("pytorch_grad_cam")
    model, x = _setup(seed)
    raw = FEM(model, "features", k=k)(x, torch.tensor(CLASSES))
    assert torch.equal(raw[:, 0], raw[:, 1])  # class-agnostic
    a, _ = activations_and_gradients(model, "features", x, [0, 0, 0])
    theirs_raw = pgc.FEM.get_cam_image(
        SimpleNamespace(k=k), None, None, None, a.numpy(), None, False
    )
    theirs_raw = torch.from_numpy(theirs_raw).float()  # float64 weights x float32 maps
    torch.testing.assert_close(raw[:, 0], theirs_raw, rtol=1e-5, atol=1e-6)
    assert raw.abs().sum() > 0
    theirs = _pgc_maps(pgc.FEM, model, x, [c[0] for c in CLASSES], k=k)
    torch.testing.assert_close(_pgc_scale(raw[:, 0]), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("seed", "size", "kernel", "gamma"),
    [
        (0, (9, 11), "sigmoid", None),
        (1, (9, 11), "rbf", 0.05),
        (2, (16, 15), "sigmoid", None),  # 240 positions: scikit-learn's ARPACK solver
    ],
)
def test_kpcacam_matches_pytorch_grad_cam_up_to_its_sign(seed, size, kernel, gamma):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel

    model, x = _setup(seed, size)
    raw = KPCACAM(model, "features", kernel=kernel, gamma=gamma)(x, torch.tensor(CLASSES))
    assert torch.equal(raw[:, 0], raw[:, 1])  # class-agnostic
    a, _ = activations_and_gradients(model, "features", x, [0, 0, 0])
    theirs_raw = torch.from_numpy(get_2d_projection_kernel(a.numpy(), kernel, gamma))
    theirs = _pgc_maps(pgc.KPCA_CAM, model, x, [c[0] for c in CLASSES], kernel=kernel, gamma=gamma)
    signs = []
    for n in range(3):
        ours = raw[n, 0]
        assert _pearson(ours, a[n].sum(dim=0)) > 0  # camlens' sign rule
        signs.append(1.0 if (ours * theirs_raw[n]).sum() >= 0 else -1.0)
        scale = float(ours.abs().max())
        torch.testing.assert_close(ours, signs[n] * theirs_raw[n], rtol=1e-4, atol=1e-4 * scale)
        expected = theirs[n]
        torch.testing.assert_close(
            _pgc_scale(signs[n] * ours[None])[0], expected, atol=1e-4, rtol=0
        )
    # scikit-learn's sign (svd_flip: largest entry positive) is not camlens' for some image
    assert -1.0 in signs


# --- no side effects -------------------------------------------------------------------------


@pytest.mark.parametrize("method_class", METHODS)
def test_state_and_hooks_restored_after_success(method_class):
    model = StatefulNet().train()
    model.stem.requires_grad_(False)
    before = model.stem[1].running_mean.clone()
    x = torch.randn(2, 3, 8, 8)
    reference = method_class(copy.deepcopy(model).eval())(x, "top2")
    raw = method_class(model)(x, "top2")
    torch.testing.assert_close(raw, reference)  # computed in eval mode, values unchanged
    assert raw.abs().sum() > 0
    assert_state_restored(model, before)


@pytest.mark.parametrize("method_class", METHODS)
def test_state_and_hooks_restored_after_exception(method_class):
    model = StatefulNet()
    x = torch.randn(2, 3, 8, 8)
    method = method_class(model)
    first = method(x)  # the head is found; the next forward pass is the method's own
    model.train()
    model.calls, model.fail_at = 0, 1
    with pytest.raises(RuntimeError, match="boom"), method:
        method(x)
    assert model.calls == 1
    assert model.training and model.dropout.training and count_hooks(model) == 0
    model.fail_at = None
    torch.testing.assert_close(method(x), first)


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method_class", "options", "message"),
    [
        (FEM, {"k": float("nan")}, "k must be a finite number"),
        (FEM, {"k": "2"}, "k must be a finite number"),
        (KPCACAM, {"kernel": "precomputed"}, "kernel must be one of"),
        (KPCACAM, {"gamma": 0.0}, "gamma must be a number > 0"),
        (FEM, {"smooth": 2}, "does not use gradients"),
        (KPCACAM, {"smooth": 2}, "does not use gradients"),
    ],
)
def test_configuration_errors(method_class, options, message):
    from camlens import ConfigError

    with pytest.raises(ConfigError, match=message):
        method_class(TinyCAMNet(), **options)


def test_names_and_options_are_keyword_only():
    import inspect

    assert [m.name for m in METHODS] == ["gradcamelementwise", "eigengradcam", "fem", "kpcacam"]
    assert [m.needs_gradients for m in METHODS] == [True, True, False, False]
    for cls in (EigenGradCAM, FEM, KPCACAM):
        parameters = inspect.signature(cls.__init__).parameters.values()
        own = [p for p in parameters if p.name in {"center", "k", "kernel", "gamma"}]
        assert own and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in own)
    assert np.isclose(FEM(TinyCAMNet()).k, 2.0) and KPCACAM(TinyCAMNet()).kernel == "sigmoid"
