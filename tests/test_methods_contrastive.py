"""Finer-CAM and Shapley-CAM: hand-computed maps, references written from the papers'
formulas (full Hessians, pytorch-grad-cam's Grad-CAM with a contrastive target) and parity
with pytorch-grad-cam 1.5.7, and no side effects on the model."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget
from torch import nn

from camlens import ConfigError, GradCAM
from camlens.methods.contrastive import FinerCAM, ShapleyCAM, similar_classes
from tiny_models_family import (
    FullResNet,
    StatefulNet,
    TinyFlatNet,
    assert_state_restored,
    count_hooks,
)

X = TinyFlatNet.X  # A = X: A_0 = [[1, 2], [3, 4]], A_1 = [[2, 0], [1, 1]]
A0, A1 = X[0]


class FlatHead(nn.Module):
    """features (1x1 conv, identity: A = x) -> ``y_c = sum G_c * A + 0.5 sum Q_c * A^2 + b_c``.

    ``d y_c / d A = G_c + Q_c * A`` and the Hessian is diagonal, ``Q_c``: ``H A = Q_c * A``.
    """

    def __init__(self, g: torch.Tensor, bias: list[float], q: torch.Tensor | None = None):
        super().__init__()
        channels = g.shape[1]
        self.features = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        self.register_buffer("g", g)
        self.register_buffer("q", torch.zeros_like(g) if q is None else q)
        self.register_buffer("b", torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)[:, None]
        return (
            (self.g * a).sum(dim=(2, 3, 4))
            + 0.5 * (self.q * a.square()).sum(dim=(2, 3, 4))
            + self.b
        )


def _constant(*channel_weights: float) -> torch.Tensor:
    return torch.tensor(channel_weights).view(2, 1, 1).expand(2, 2, 2)


def four_classes(bias_1: float = 0.0) -> FlatHead:
    """Four classes on A = X (channel sums 10 and 4), mean gradient per channel ``m_c``::

    c0: G = TinyFlatNet.G   m = [0.5, 0]   y = 5
    c1: G = [0, 1]          m = [0, 1]     y = 4 + bias_1
    c2: G = [1, 1]          m = [1, 1]     y = 14
    c3: G = [-1, 2], b = 1  m = [-1, 2]    y = -10 + 8 + 1 = -1
    """
    g = torch.stack([TinyFlatNet.G, _constant(0, 1), _constant(1, 1), _constant(-1, 2)])
    return FlatHead(g, [0.0, bias_1, 0.0, 1.0])


# --- Finer-CAM by hand ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "similar", "expected"),
    [
        # top-1 = c2 (14); |y - 14| = [9, 10, -, 15]: neighbours c0, c1, c3 in that order
        # S = {c0}: w = [1, 1] - [0.5, 0] = [0.5, 1] -> 0.5 A_0 + A_1
        ({"n_similar": 1}, [0], [[2.5, 1.0], [2.5, 3.0]]),
        # alpha = 0.5: w = [1, 1] - 0.5 [0.5, 0] = [0.75, 1]
        ({"n_similar": 1, "alpha": 0.5}, [0], [[2.75, 1.5], [3.25, 4.0]]),
        # S = {c0, c1}: w = [1, 1] - ([0.5, 0] + [0, 1]) / 2 = [0.75, 0.5]
        ({"n_similar": 2}, [0, 1], [[1.75, 1.5], [2.75, 3.5]]),
        # default n_similar = 3: w = [1, 1] - ([0.5, 0] + [0, 1] + [-1, 2]) / 3 = [7/6, 0]
        ({}, [0, 1, 3], (7 / 6 * A0).tolist()),
        # 10 similar classes asked, 3 exist: the same
        ({"n_similar": 10}, [0, 1, 3], (7 / 6 * A0).tolist()),
        # alpha = 0: Grad-CAM of c2, w = [1, 1]
        ({"alpha": 0.0}, [0, 1, 3], (A0 + A1).tolist()),
    ],
)
def test_finercam_top1_by_hand(options, similar, expected):
    method = FinerCAM(four_classes(), **options)
    result = method.run(X, "top1")
    assert result.targets.tolist() == [[2]] and result.layer == "features"
    assert method.comparisons.tolist() == [[similar]]
    assert result.raw.dtype == torch.float32
    torch.testing.assert_close(result.raw[0, 0], torch.tensor(expected), rtol=0, atol=1e-6)


def test_finercam_gives_each_target_column_its_own_neighbours():
    # column 0: c2 as above with S = {c0, c1}: [[1.75, 1.5], [2.75, 3.5]]
    # column 1: c0 (5): |y - 5| = [-, 1, 9, 6] -> S = {c1, c3};
    #           w = [0.5, 0] - ([0, 1] + [-1, 2]) / 2 = [1, -1.5] -> A_0 - 1.5 A_1
    method = FinerCAM(four_classes(), n_similar=2)
    raw = method(X, "top2")
    assert method.comparisons.tolist() == [[[0, 1], [1, 3]]]
    expected = torch.tensor([[[1.75, 1.5], [2.75, 3.5]], [[-2.0, 2.0], [1.5, 2.5]]])
    torch.testing.assert_close(raw[0], expected, rtol=0, atol=1e-6)


def test_finercam_never_compares_a_class_with_itself_on_ties():
    # bias_1 = 1: y = [5, 5, 14, -1]; c0 and c1 tie. S(c0) = {c1}, S(c1) = {c0}
    # c0: w = [0.5, 0] - [0, 1] = [0.5, -1]; c1: w = [0, 1] - [0.5, 0] = [-0.5, 1]
    method = FinerCAM(four_classes(bias_1=1.0), n_similar=1)
    raw = method(X, torch.tensor([[0, 1]]))
    assert method.comparisons.tolist() == [[[1], [0]]]
    first = torch.tensor([[-1.5, 1.0], [0.5, 1.0]])
    torch.testing.assert_close(raw[0], torch.stack([first, -first]), rtol=0, atol=1e-6)


def test_finercam_clamps_to_the_classes_there_are():
    # two classes (TinyFlatNet, y_1 = 0 with zero weights): S = {c1}, whose gradient is 0:
    # Grad-CAM of c0, w = [0.5, 0]
    method = FinerCAM(TinyFlatNet())
    torch.testing.assert_close(method(X, 0)[0, 0], 0.5 * A0, rtol=0, atol=1e-6)
    assert method.comparisons.tolist() == [[[1]]]
    # one class: nothing to compare with, Grad-CAM
    single = FlatHead(TinyFlatNet.G[None], [0.0])
    method = FinerCAM(single)
    torch.testing.assert_close(method(X, 0)[0, 0], 0.5 * A0, rtol=0, atol=1e-6)
    assert method.comparisons.shape == (1, 1, 0)


def test_similar_classes_sorts_by_distance_and_excludes_the_target():
    logits = torch.tensor([[0.0, 3.0, 2.5, 3.0, -1.0], [1.0, 1.0, 1.0, 7.0, 0.0]])
    targets = torch.tensor([[1, 4], [0, 3]])
    got = similar_classes(logits, targets, 3)
    assert got.tolist() == [[[3, 2, 0], [0, 2, 1]], [[1, 2, 4], [0, 1, 2]]]
    assert similar_classes(logits, targets, 9).shape == (2, 2, 4)


# --- Finer-CAM against pytorch-grad-cam ----------------------------------------------------


def _scaled(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with its fc weights x 40: maps of order 1, so that the 1e-7 of
    pytorch-grad-cam's min-max normalisation is negligible."""
    with torch.no_grad():
        model.fc.weight.mul_(40)
    return model.eval()


def _normalised(raw: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's post-processing: relu, then per-image min-max (eps 1e-7)."""
    positive = raw.relu().flatten(1)
    low, high = positive.amin(dim=1, keepdim=True), positive.amax(dim=1, keepdim=True)
    return ((positive - low) / (high - low + 1e-7)).view_as(raw)


def test_finercam_with_one_neighbour_matches_pytorch_grad_cam():
    # With one comparison class pytorch-grad-cam's probability weighting p_j (y_c - alpha y_j)
    # / (p_j + 1e-9) is the plain difference (up to the 1e-9): the same map for the top-1.
    model = _scaled(FullResNet())
    x = torch.randn(3, 3, 6, 7)
    ours = FinerCAM(model, "features", alpha=0.7, n_similar=1)(x, "top1")[:, 0]
    finer = pgc.FinerCAM(model, target_layers=[model.features])
    theirs = finer(x, targets=None, alpha=0.7, comparison_categories=[1])
    assert ours.abs().amax() > 0
    torch.testing.assert_close(_normalised(ours), torch.from_numpy(theirs), rtol=1e-4, atol=1e-4)


def test_finercam_matches_a_reference_from_the_formula_for_every_column():
    # Reference: pytorch-grad-cam's Grad-CAM of the paper's score y_c - alpha mean_S y_j,
    # S chosen here with numpy (pytorch-grad-cam's FinerCAM weighs S by softmax instead).
    model = _scaled(FullResNet(classes=6))
    x = torch.randn(2, 3, 6, 7)
    alpha, k = 0.8, 3
    method = FinerCAM(model, "features", alpha=alpha)
    result = method.run(x, f"top{k}")
    logits = model(x).detach().numpy()
    gradcam = pgc.GradCAM(model, target_layers=[model.features])
    for j in range(k):
        scores = []
        for n in range(x.shape[0]):
            c = int(result.targets[n, j])
            distance = np.abs(logits[n] - logits[n, c])
            distance[c] = np.inf
            similar = np.argsort(distance, kind="stable")[:3].tolist()
            assert method.comparisons[n, j].tolist() == similar
            scores.append(lambda out, c=c, s=similar: out[c] - alpha * out[s].mean())
        theirs = torch.from_numpy(gradcam(x, targets=scores))
        torch.testing.assert_close(_normalised(result.raw[:, j]), theirs, rtol=1e-4, atol=1e-4)


# --- Shapley-CAM by hand --------------------------------------------------------------------


def test_shapleycam_second_order_term_by_hand():
    # y = sum G * A + 0.5 sum Q * A^2, G = TinyFlatNet.G (mean [0.5, 0]), Q = [1, -2] per channel
    # g = G + Q A, H A = Q A: g - H A / 2 = G + Q A / 2, mean: [0.5 + 2.5 / 2, 0 - 2 * 1 / 2]
    # = [1.75, -1] -> 1.75 A_0 - A_1. (Grad-CAM: mean(G + Q A) = [3, -2] -> 3 A_0 - 2 A_1.)
    model = FlatHead(TinyFlatNet.G[None], [0.0], q=_constant(1, -2)[None])
    raw = ShapleyCAM(model, utility="logit")(X, 0)
    torch.testing.assert_close(
        raw[0, 0], torch.tensor([[-0.25, 3.5], [4.25, 6.0]]), rtol=0, atol=1e-6
    )
    gradcam = GradCAM(model)(X, 0)
    torch.testing.assert_close(
        gradcam[0, 0], torch.tensor([[-1.0, 6.0], [7.0, 10.0]]), rtol=0, atol=1e-6
    )


P0 = torch.sigmoid(torch.tensor(5.0))  # TinyFlatNet: y = [5, 0], p_0 = sigmoid(5)
P1 = torch.sigmoid(torch.tensor(-5.0))  # p_1 = 1 - p_0


@pytest.mark.parametrize(
    ("utility", "factor"),
    [
        # U = y_0: g = G, H = 0
        ("logit", torch.tensor(1.0)),
        # U = 2 y_0 - logsumexp(y): d U / d y = 2 e_0 - p, d^2 U / d y^2 = -(diag p - p p^T);
        # y = W A with W_0 = G, W_1 = 0: g = (2 - p_0) G, H A = -W^T (diag p - p p^T) y
        # = -5 p_0 p_1 G -> g - H A / 2 = (2 - p_0 + 2.5 p_0 p_1) G
        ("rest", 2 - P0 + 2.5 * P0 * P1),
        # U = p_0 = sigmoid(y_0): g = p_0 p_1 G, H A = p_0 p_1 (1 - 2 p_0) y_0 G
        ("softmax", P0 * P1 * (1 - 2.5 * (1 - 2 * P0))),
    ],
)
def test_shapleycam_utilities_by_hand(utility, factor):
    # every case is factor * G: the weights are factor * mean G = factor * [0.5, 0]
    raw = ShapleyCAM(TinyFlatNet(), utility=utility)(X, 0)
    torch.testing.assert_close(raw[0, 0], factor * 0.5 * A0, rtol=1e-5, atol=1e-7)


class TanhNet(nn.Module):
    """conv (the explained layer) -> 1x1 conv -> tanh -> GAP -> fc: a curved head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, 3)

    def head(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.mix(a)).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


UTILITIES = {
    "logit": lambda y, c: y[c],
    "rest": lambda y, c: y[c] + y.log_softmax(dim=0)[c],
    "softmax": lambda y, c: y.softmax(dim=0)[c],
}


@pytest.mark.parametrize("utility", list(UTILITIES))
def test_shapleycam_matches_the_full_hessian(utility):
    model = TanhNet().eval()
    with torch.no_grad():
        model.mix.weight.mul_(3)  # tanh well away from linear
    x = torch.randn(2, 3, 4, 5)
    result = ShapleyCAM(model, "features", utility=utility).run(x, "top2")
    a = model.features(x).detach()
    for n in range(2):
        for j in range(2):
            c = int(result.targets[n, j])

            def score(v, c=c):
                return UTILITIES[utility](model.head(v[None])[0], c)

            grad = torch.autograd.functional.jacobian(score, a[n])
            hessian = torch.autograd.functional.hessian(score, a[n], vectorize=True)
            hessian = hessian.reshape(a[n].numel(), -1)
            hvp = (hessian @ a[n].flatten()).view_as(a[n])
            weights = (grad - 0.5 * hvp).mean(dim=(1, 2))
            expected = torch.einsum("c,chw->hw", weights, a[n])
            torch.testing.assert_close(result.raw[n, j], expected, rtol=1e-4, atol=1e-6)
            # the second-order term is really there
            assert (0.5 * hvp).mean(dim=(1, 2)).abs().max() > 1e-3 * grad.abs().max()


def test_shapleycam_of_the_logit_is_gradcam_on_a_piecewise_linear_head():
    model = FullResNet().eval()
    x = torch.randn(2, 3, 6, 7)
    shapley = ShapleyCAM(model, "features.1", utility="logit")(x, "top2")
    torch.testing.assert_close(
        shapley, GradCAM(model, "features.1")(x, "top2"), rtol=1e-5, atol=1e-7
    )
    # the softmax in ReST curves it
    rest = ShapleyCAM(model, "features.1")(x, "top2")
    assert (rest - shapley).abs().amax() > 1e-3 * shapley.abs().amax()


# --- Shapley-CAM against pytorch-grad-cam -----------------------------------------------------


@pytest.mark.parametrize(
    ("utility", "target"), [("rest", ClassifierOutputReST), ("logit", ClassifierOutputTarget)]
)
def test_shapleycam_matches_pytorch_grad_cam(utility, target):
    for model in (_scaled(FullResNet()), _scaled(TanhNet())):
        x = torch.randn(3, 3, 6, 7)
        classes = torch.tensor([1, 2, 0])
        ours = ShapleyCAM(model, "features", utility=utility)(x, classes)[:, 0]
        shapley = pgc.ShapleyCAM(model, target_layers=[model.features])
        theirs = shapley(x, targets=[target(int(c)) for c in classes])
        assert ours.relu().amax() > 0
        torch.testing.assert_close(
            _normalised(ours), torch.from_numpy(theirs), rtol=1e-4, atol=1e-4
        )


# --- options, hooks, state ----------------------------------------------------------------


METHODS = [FinerCAM, ShapleyCAM]


@pytest.mark.parametrize("method_class", METHODS)
def test_state_and_hooks_restored_after_success(method_class):
    model = StatefulNet().train()
    model.stem.requires_grad_(False)
    before = model.stem[1].running_mean.clone()
    with torch.no_grad():  # the caller's no_grad does not stop the (double) backward
        raw = method_class(model)(torch.randn(2, 3, 8, 8), "top2")
    assert raw.shape == (2, 2, 4, 4) and raw.dtype == torch.float32
    assert torch.isfinite(raw).all() and raw.abs().amax() > 0
    assert_state_restored(model, before)


@pytest.mark.parametrize("method_class", METHODS)
def test_state_and_hooks_restored_after_exception(method_class):
    model = StatefulNet()
    x = torch.randn(2, 3, 8, 8)
    method = method_class(model)
    method(x)  # the head is found; the next forward pass is the method's own
    model.train()
    model.calls, model.fail_at = 0, 1
    with pytest.raises(RuntimeError, match="boom"), method:
        method(x)
    assert model.training and model.dropout.training and count_hooks(model) == 0
    model.fail_at = None
    assert torch.isfinite(method(x)).all()


@pytest.mark.parametrize(
    ("method_class", "options", "message"),
    [
        (FinerCAM, {"n_similar": 0}, "n_similar"),
        (FinerCAM, {"n_similar": 2.5}, "n_similar"),
        (FinerCAM, {"alpha": float("nan")}, "alpha"),
        (ShapleyCAM, {"utility": "probability"}, "utility"),
    ],
)
def test_configuration_errors(method_class, options, message):
    with pytest.raises(ConfigError, match=message):
        method_class(TinyFlatNet(), **options)


def test_names_and_gradient_flags():
    assert (FinerCAM.name, ShapleyCAM.name) == ("finercam", "shapleycam")
    assert FinerCAM.needs_gradients and ShapleyCAM.needs_gradients
    smooth = ShapleyCAM(TinyFlatNet(), smooth=1, smooth_sigma=0.0)(X, 0)
    torch.testing.assert_close(smooth, ShapleyCAM(TinyFlatNet())(X, 0))
