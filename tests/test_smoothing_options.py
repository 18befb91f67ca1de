"""The ``eigen_smooth`` and ``aug_smooth`` options of every method: values by hand, against an
independent numpy SVD and pytorch-grad-cam, test-time augmentation against a reference loop,
refusals, and the command-line flags that reach the methods."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import camlens
from camlens import CAM, ConfigError, GradCAM
from camlens.cli import main
from camlens.hooks import get_layer
from camlens.methods import (
    METHODS,
    CAMMethod,
    EigenCAM,
    GradCAMPlusPlus,
    LayerCAM,
    RandomCAM,
    Step,
    XGradCAM,
    check_method,
    get_method,
    options_for,
)
from camlens.methods.base import AUGMENTATIONS
from camlens.tasks.evaluate import build_methods
from tiny_models import TinyCAMNet
from tiny_models_family import FullResNet, TinyFlatNet, TwoStageNet

CHANNEL_WEIGHTED = ["cam", "gradcam", "gradcam++", "xgradcam"]
NOT_CHANNEL_WEIGHTED = ["hirescam", "layercam", "eigencam", "random", "scorecam", "ablationcam"]

# --- eigen_smooth ----------------------------------------------------------------------------


def test_eigen_smooth_by_hand():
    # Class 2 of TinyCAMNet: w = [.5, .5]; rows (positions) of O = [w_0 A_0, w_1 A_1]:
    # (.5, 0), (1, .5), (1.5, 0), (2, -.5); centred: (-.75, 0), (-.25, .5), (.25, 0), (.75, -.5).
    # O^T O = [[1.25, -.5], [-.5, .5]]: eigenvalues 1.5 and .25, v_1 = (2, -1) / sqrt(5), so
    # M = O v_1 = (-1.5, -1, .5, 2) / sqrt(5), which correlates positively with the plain map
    # (.5, 1.5, 1.5, 1.5): no sign flip.
    x = TinyCAMNet.X
    expected = torch.tensor([[-1.5, -1.0], [0.5, 2.0]]) / math.sqrt(5)
    raw = CAM(TinyCAMNet(), eigen_smooth=True)(x, 2)
    torch.testing.assert_close(raw[0, 0], expected, rtol=0, atol=1e-6)
    # Grad-CAM = CAM / (h w) on a GAP head: the same projection, divided by 4.
    torch.testing.assert_close(GradCAM(TinyCAMNet(), eigen_smooth=True)(x, 2)[0, 0], expected / 4)
    # Class 1: w = [-1, 0], one column -A_0; centred: -A_0 + 2.5. The plain map -A_0 is
    # negative everywhere, the projection is its centred copy (positive correlation).
    raw = CAM(TinyCAMNet(), eigen_smooth=True)(x, 1)
    torch.testing.assert_close(
        raw[0, 0], torch.tensor([[1.5, 0.5], [-0.5, -1.5]]), rtol=0, atol=1e-6
    )
    # Grad-CAM on TinyFlatNet (gradients that vary by position): w = [.5, 0]: .5 A_0 centred.
    raw = GradCAM(TinyFlatNet(), eigen_smooth=True)(TinyFlatNet.X, 0)
    torch.testing.assert_close(
        raw[0, 0], torch.tensor([[-0.75, -0.25], [0.25, 0.75]]), rtol=0, atol=1e-6
    )


def _captured(model, layer, x):
    store = {}
    handle = get_layer(model, layer).register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return store["a"], logits


def _numpy_projection(weights: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Independent oracle: (C,) weights, (C, h, w) maps -> (h, w) eigen-smoothed map."""
    c, h, w = maps.shape
    matrix = (weights[:, None, None] * maps).reshape(c, -1).T.astype(np.float64)
    plain = matrix.sum(axis=1)
    centred = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projection = centred @ vt[0]
    if np.dot(projection - projection.mean(), plain - plain.mean()) < 0:
        projection = -projection
    return projection.reshape(h, w)


def test_eigen_smooth_matches_a_numpy_svd_for_every_target():
    torch.manual_seed(3)
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    targets = torch.tensor([[1, 3], [0, 2]])
    a, logits = _captured(model, "stage2", x)
    hw = a.shape[-2] * a.shape[-1]
    cam_weights = model.fc.weight.detach()[targets]  # (N, K, C)
    grad_weights = torch.stack(
        [
            torch.autograd.grad(
                logits.gather(1, targets[:, k : k + 1]).sum(), a, retain_graph=True
            )[0].mean(dim=(-2, -1))
            for k in range(2)
        ],
        dim=1,
    )
    torch.testing.assert_close(grad_weights, cam_weights / hw)  # GAP + fc, by construction
    for method, weights in ((CAM, cam_weights), (GradCAM, grad_weights)):
        raw = method(model, eigen_smooth=True)(x, targets)
        assert raw.shape == (2, 2, 4, 5) and raw.dtype == torch.float32
        for n in range(2):
            for k in range(2):
                expected = _numpy_projection(weights[n, k].numpy(), a[n].detach().numpy())
                np.testing.assert_allclose(raw[n, k].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_eigen_smooth_matches_pytorch_grad_cam_up_to_sign():
    torch.manual_seed(4)
    model = FullResNet().eval()  # features at input resolution: no resizing on either side
    x = torch.randn(3, 3, 6, 7)
    classes = [1, 3, 0]
    ours = GradCAM(model, "features", eigen_smooth=True)(x, torch.tensor(classes))[:, 0]
    with PgcGradCAM(model, target_layers=[model.features]) as pgc:
        theirs = pgc(x, [ClassifierOutputTarget(c) for c in classes], eigen_smooth=True)
    theirs = torch.from_numpy(theirs)

    def normalised(m: torch.Tensor) -> torch.Tensor:  # pytorch-grad-cam: relu, then min-max
        positive = m.relu()
        low = positive.min()
        return (positive - low) / (1e-7 + (positive - low).max())

    for n in range(3):
        # The sign of pytorch-grad-cam's map is the SVD's; camlens fixes it (see the docs).
        candidates = [normalised(ours[n]), normalised(-ours[n])]
        errors = [float((c - theirs[n]).abs().max()) for c in candidates]
        assert min(errors) < 1e-4, errors


def test_eigen_smooth_composes_with_smooth_and_run():
    torch.manual_seed(5)
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    plain = GradCAMPlusPlus(model).run(x, "top2")
    eigen = GradCAMPlusPlus(model, eigen_smooth=True).run(x, "top2")
    assert torch.equal(eigen.logits, plain.logits) and torch.equal(eigen.targets, plain.targets)
    once = GradCAMPlusPlus(model, eigen_smooth=True, smooth=1, smooth_sigma=0.0).run(x, "top2")
    assert torch.equal(once.raw, eigen.raw)
    torch.manual_seed(0)
    smoothed = GradCAMPlusPlus(model, eigen_smooth=True, smooth=3, smooth_sigma=0.2)(x, "top2")
    torch.manual_seed(0)
    sigma = 0.2 * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    reference = torch.stack(
        [
            GradCAMPlusPlus(model, eigen_smooth=True)(
                x + torch.randn_like(x) * sigma, plain.targets
            )
            for _ in range(3)
        ]
    ).mean(dim=0)
    torch.testing.assert_close(smoothed, reference, rtol=1e-5, atol=1e-6)


def test_eigen_smooth_leaves_the_cam_identity_unchecked():
    result = CAM(TinyCAMNet(), eigen_smooth=True).run(TinyCAMNet.X, 0)
    assert result.identity_error is None
    assert CAM(TinyCAMNet()).run(TinyCAMNet.X, 0).identity_error < 1e-5


def test_projection_helpers_moved_but_still_importable():
    from camlens.methods.linalg import first_component_projection as moved
    from camlens.methods.projection import first_component_projection

    assert first_component_projection is moved


# --- aug_smooth ------------------------------------------------------------------------------

#: pytorch-grad-cam's default tta_transforms: HorizontalFlip() x Multiply([0.9, 1, 1.1]).
TTA = [(flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1)]


def test_augmentations_are_pytorch_grad_cam_defaults():
    assert sorted(AUGMENTATIONS) == sorted(TTA) and len(AUGMENTATIONS) == 6
    assert AUGMENTATIONS[0] == (False, 1.0)  # the identity first: its pass gives the logits


class SymmetricNet(nn.Module):
    """Bias-free stride-1 convolutions with left-right symmetric kernels -> ReLU -> GAP -> fc.

    Exactly flip-equivariant (the features of the flipped image are the flipped features) and
    positively homogeneous (features of ``a x`` are ``a`` times those of ``x``).
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.features = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(5, 6, 3, padding=1, bias=False),
            nn.ReLU(),
        )
        with torch.no_grad():
            for conv in (self.features[0], self.features[2]):
                conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["cam", "gradcam", "hirescam", "xgradcam", "layercam", "eigencam"])
def test_aug_smooth_on_a_flip_equivariant_model_is_the_plain_map(name):
    # Maps scale with the input (mean factor (0.9 + 1 + 1.1) / 3 = 1) and follow its flips:
    # the average is the plain map. The input is not symmetric, so a map not flipped back,
    # or another set of factors, would differ.
    model = SymmetricNet().eval()
    x = torch.rand(2, 3, 6, 7)
    plain = get_method(name)(model).run(x, "top2")
    smoothed = get_method(name)(model, aug_smooth=True).run(x, "top2")
    torch.testing.assert_close(smoothed.raw, plain.raw, rtol=1e-5, atol=1e-6)
    assert torch.equal(smoothed.logits, plain.logits)
    assert torch.equal(smoothed.targets, plain.targets)
    asymmetry = (plain.raw - plain.raw.flip(-1)).abs().max()
    assert asymmetry > 0.1 * plain.raw.abs().max()


def _reference(make, x, targets):
    """Independent aug_smooth: the method on each augmented input, flipped back, averaged."""
    maps = []
    for flip, factor in TTA:
        augmented = x * factor
        augmented = augmented.flip(-1) if flip else augmented
        raw = make()(augmented, targets)
        maps.append(raw.flip(-1) if flip else raw)
    return torch.stack(maps).mean(dim=0)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("gradcam", {}),
        ("gradcam++", {}),
        ("scorecam", {}),
        ("ablationcam", {}),
        ("eigencam", {}),
        ("layercam", {"layer": ["stage1", "stage2"]}),
        ("gradcam", {"eigen_smooth": True}),
    ],
)
def test_aug_smooth_equals_a_reference_loop_on_a_general_model(name, options):
    torch.manual_seed(7)
    model = TwoStageNet().eval()  # stride 2, biases: neither flip-equivariant nor homogeneous
    x = torch.randn(2, 3, 8, 10)
    plain = get_method(name)(model, **options).run(x, "top2")
    result = get_method(name)(model, aug_smooth=True, **options).run(x, "top2")
    expected = _reference(lambda: get_method(name)(model, **options), x, plain.targets)
    torch.testing.assert_close(result.raw, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.logits, plain.logits)  # the clean input's
    assert torch.equal(result.targets, plain.targets)
    assert result.layer == plain.layer
    assert not torch.allclose(result.raw, plain.raw, atol=1e-4)


def test_aug_smooth_composes_with_smooth():
    torch.manual_seed(8)
    model = TwoStageNet().eval()
    x = torch.randn(2, 3, 8, 10)
    targets = GradCAM(model).run(x, "top1").targets
    torch.manual_seed(0)
    result = GradCAM(model, aug_smooth=True, smooth=2, smooth_sigma=0.1).run(x, "top1")
    torch.manual_seed(0)
    maps = []
    for flip, factor in AUGMENTATIONS:  # the noise is drawn in this order
        augmented = x * factor
        augmented = augmented.flip(-1) if flip else augmented
        spread = augmented.amax(dim=(1, 2, 3)) - augmented.amin(dim=(1, 2, 3))
        sigma = (0.1 * spread).view(-1, 1, 1, 1)
        noisy = [augmented + torch.randn_like(x) * sigma for _ in range(2)]
        raw = torch.stack([GradCAM(model)(n, targets) for n in noisy]).mean(dim=0)
        maps.append(raw.flip(-1) if flip else raw)
    torch.testing.assert_close(result.raw, torch.stack(maps).mean(dim=0), rtol=1e-5, atol=1e-6)
    assert torch.equal(result.targets, targets)


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOT_CHANNEL_WEIGHTED)
def test_eigen_smooth_is_refused_where_the_map_is_not_a_channel_weighted_sum(name):
    cls = get_method(name)
    assert not cls.eigen_smooth_applies
    with pytest.raises(ConfigError, match=f"eigen_smooth: {name} is not a channel-weighted"):
        cls(TwoStageNet(), eigen_smooth=True)
    cls(TwoStageNet(), eigen_smooth=False)  # the default is fine
    with pytest.raises(ConfigError, match="eigen_smooth: cam, gradcam"):
        check_method(name, {"eigen_smooth": True})
    check_method(name, {"eigen_smooth": False})
    assert options_for(name, {"eigen_smooth": True, "aug_smooth": True}) == (
        {} if name == "random" else {"aug_smooth": True}
    )


@pytest.mark.parametrize("name", CHANNEL_WEIGHTED)
def test_eigen_smooth_applies_to_channel_weighted_methods(name):
    assert get_method(name).eigen_smooth_applies
    assert get_method(name)(TinyCAMNet(), eigen_smooth=True).eigen_smooth
    assert options_for(name, {"eigen_smooth": True}) == {"eigen_smooth": True}


def test_aug_smooth_is_refused_by_the_random_baseline_only():
    with pytest.raises(ConfigError, match="aug_smooth: the maps of random do not depend"):
        RandomCAM(TwoStageNet(), aug_smooth=True)
    with pytest.raises(ConfigError, match="aug_smooth: every method but random"):
        check_method("random", {"aug_smooth": True})
    for name in [*CHANNEL_WEIGHTED, *NOT_CHANNEL_WEIGHTED]:
        assert METHODS[name].aug_smooth_applies == (name != "random")


def test_eigen_smooth_applies_follows_where_compute_raw_comes_from():
    class Weights(CAMMethod):  # a channel weighting: the base's compute_raw
        name = "weights"

        def channel_weights(self, step: Step) -> torch.Tensor:
            return torch.ones(*step.targets.shape, step.activation.shape[1])

    class Own(Weights):  # its own maps
        def compute_raw(self, step: Step) -> torch.Tensor:
            return step.activation.sum(dim=1, keepdim=True)

    class OptedIn(Own):  # its own compute_raw, through weighted_sum
        eigen_smooth_applies = True

        def compute_raw(self, step: Step) -> torch.Tensor:
            return self.weighted_sum(self.channel_weights(step), step.activation)

    class Child(OptedIn):
        pass

    assert (Weights.eigen_smooth_applies, Own.eigen_smooth_applies) == (True, False)
    assert (OptedIn.eigen_smooth_applies, Child.eigen_smooth_applies) == (True, True)
    assert not LayerCAM.eigen_smooth_applies and not EigenCAM.eigen_smooth_applies
    assert XGradCAM.eigen_smooth_applies
    model = TwoStageNet().eval()
    x = torch.randn(1, 3, 8, 10)
    torch.testing.assert_close(
        Child(model, eigen_smooth=True)(x, 0), Weights(model, eigen_smooth=True)(x, 0)
    )


# --- the command line and the server ---------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _tiny() -> camlens.Classifier:
    return camlens.Classifier(
        module=TinyNet().eval(), labels=["red", "green", "blue"], input_size=(16, 16), name="tiny"
    )


def test_explain_flags_reach_the_method(tmp_path, monkeypatch):
    import camlens.api.explaining
    import camlens.tasks.explain

    made = []
    real = camlens.tasks.explain.make_method

    def spy(*args, **options):
        made.append(real(*args, **options))
        return made[-1]

    monkeypatch.setattr(camlens.api.explaining, "job_model", lambda model, device: _tiny())
    monkeypatch.setattr(camlens.tasks.explain, "make_method", spy)
    image = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    args = ["explain", str(image), "--out", str(out), "--method", "gradcam"]
    result = CliRunner().invoke(main, [*args, "--aug-smooth", "--eigen-smooth"])
    assert result.exit_code == 0, result.output
    assert [(m.name, m.aug_smooth, m.eigen_smooth) for m in made] == [("gradcam", True, True)]
    # without the flags: off
    result = CliRunner().invoke(main, [*args[:3], str(tmp_path / "plain"), *args[4:]])
    assert result.exit_code == 0, result.output
    assert (made[-1].aug_smooth, made[-1].eigen_smooth) == (False, False)


def test_explain_refuses_eigen_smooth_for_hirescam_before_loading(tmp_path):
    image = tmp_path / "noise.png"
    Image.new("RGB", (8, 8)).save(image)
    args = ["explain", str(image), "--out", str(tmp_path / "out"), "--method", "hirescam"]
    result = CliRunner().invoke(main, [*args, "--eigen-smooth"])
    assert result.exit_code == 2, result.output
    assert "does not take the option(s) eigen_smooth" in result.output


@pytest.mark.parametrize(
    ("command", "target", "extra"),
    [
        ("evaluate", "camlens.api.evaluating.evaluate", ["--method", "all"]),
        ("audit", "camlens.api.auditing.audit", ["--method", "gradcam"]),
    ],
)
def test_other_commands_pass_the_flags_on(tmp_path, monkeypatch, command, target, extra):
    calls = {}

    def fake(*args, **kwargs):
        calls.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(target, fake)
    data = tmp_path / "data.csv"
    data.write_text("image,x0,y0,x1,y1,label\n")
    positional = [str(data if command == "evaluate" else tmp_path)]
    out = ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [command, *positional, *out, *extra, "--aug-smooth"])
    assert result.exit_code == 0, result.output
    assert calls["method_options"] == {"aug_smooth": True}
    result = CliRunner().invoke(main, [command, *positional, *out, *extra, "--eigen-smooth"])
    assert calls["method_options"] == {"eigen_smooth": True}


@pytest.mark.parametrize("option", ["--aug-smooth", "--eigen-smooth"])
def test_the_flags_have_one_help_text_in_every_method_command(option):
    texts = set()
    for name in ("explain", "demo", "evaluate", "audit", "serve"):
        (param,) = [p for p in main.commands[name].params if option in getattr(p, "opts", ())]
        assert param.is_flag, name
        texts.add(param.help)
    assert len(texts) == 1, texts


def test_evaluate_gives_each_method_the_options_it_takes():
    methods = build_methods(_tiny(), "all", options={"eigen_smooth": True, "aug_smooth": True})
    for method in methods:
        assert method.eigen_smooth == type(method).eigen_smooth_applies, method.name
        assert method.aug_smooth == (method.name != "random"), method.name
    assert {m.name for m in methods if m.eigen_smooth} >= set(CHANNEL_WEIGHTED)
    with pytest.raises(ConfigError, match="none of the methods hirescam takes"):
        build_methods(_tiny(), "hirescam", options={"eigen_smooth": True})


def test_serve_flags_reach_the_methods(monkeypatch):
    from fastapi.testclient import TestClient

    from camlens.serve import create_app

    settings = {}

    def fake_build(create, models, options):
        settings.update(options)
        raise SystemExit(0)

    monkeypatch.setattr("camlens.cli.serve._build", fake_build)
    result = CliRunner().invoke(main, ["serve", "--aug-smooth", "--eigen-smooth"])
    assert result.exit_code == 0, result.output
    assert (settings["aug_smooth"], settings["eigen_smooth"]) == (True, True)

    app = create_app([_tiny()], method="gradcam", aug_smooth=True, eigen_smooth=True)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    files = {"file": ("n.png", buffer.getvalue(), "image/png")}
    with TestClient(app, base_url="http://localhost") as client:
        default = client.post("/api/explain", data={"model": "tiny"}, files=files)
        hires = client.post(
            "/api/explain", data={"model": "tiny", "method": "hirescam"}, files=files
        )
    assert default.status_code == 200, default.text
    assert default.json()["method_options"] == {"aug_smooth": True, "eigen_smooth": True}
    assert hires.json()["method_options"] == {"aug_smooth": True}
