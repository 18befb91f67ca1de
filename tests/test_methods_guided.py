"""Guided Backprop, Guided Grad-CAM and FullGrad: hand-computed guided gradients, parity with
pytorch-grad-cam, no side effects, and the public API."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens import ConfigError
from camlens.methods import FullGrad, GradCAM, GuidedBackprop, GuidedGradCAM, get_method
from camlens.methods.guided import guided_relus
from tiny_models_family import assert_state_restored, count_hooks

GUIDED = ["guidedbackprop", "guidedgradcam", "fullgrad"]


class HandNet(nn.Module):
    """1x1 conv (1 -> 2 channels, weights a = [1, -1], no bias) -> rectifier -> GAP -> fc.

    fc row 0 is v = [2, -4], row 1 is 0, so ``d y_0 / d relu(z)_k = v_k / 2 = [1, -2]`` at
    each of the two pixels. Image 0 is x = [1, -2]:

        pixel 0: z = [1, -1] -> relu [1, 0];   pixel 1: z = [-2, 2] -> relu [0, 2]
        plain:  d y_0 / d z = [1, 0] and [0, -2]   -> d y_0 / d x = [1, (-1)(-2)] = [1, 2]
        guided: the -2 of channel 1 is dropped     -> [1, 0]

    Image 1 is x = [-1, 3]: relu [0, 1] and [3, 0]; plain [2, 1], guided [0, 1].
    y_0 = 2 * mean relu_0 - 4 * mean relu_1: image 0: 1 - 4 = -3; image 1: 3 - 2 = 1.
    Grad-CAM of class 0 at the rectifier (same resolution as the input): weights [1, -2],
    image 0: [1 - 0, 0 - 4] = [1, -4]; image 1: [0 - 2, 3 - 0] = [-2, 3].

    ``kind`` picks the rectifier: an ``nn.ReLU`` (in place or not), ``nn.ReLU6`` or the
    functional ``F.relu``, ``torch.relu``, ``Tensor.relu_`` (its result used).
    """

    X = torch.tensor([[[[1.0, -2.0]]], [[[-1.0, 3.0]]]])
    PLAIN = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    GUIDED = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    GRADCAM = torch.tensor([[1.0, -4.0], [-2.0, 3.0]])
    LOGITS = torch.tensor([[-3.0, 0.0], [1.0, 0.0]])

    def __init__(self, kind: str = "module") -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        modules = {"module": nn.ReLU(), "inplace": nn.ReLU(inplace=True), "relu6": nn.ReLU6()}
        self.act = modules.get(kind, nn.Identity())
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, -4.0], [0.0, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        if self.kind == "functional":
            a = F.relu(z)
        elif self.kind == "torch":
            a = torch.relu(z)
        elif self.kind == "tensor_inplace":
            a = (z * 1).relu_()
        elif self.kind == "functional_inplace":
            a = F.relu(z * 1, inplace=True)
        else:
            a = self.act(z)
        return self.fc(a.mean(dim=(2, 3)))


KINDS = [
    "module",
    "inplace",
    "relu6",
    "functional",
    "torch",
    "tensor_inplace",
    "functional_inplace",
]


def _plain_input_gradient(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(leaf)[:, target].sum(), leaf)
    return grad


@pytest.mark.parametrize("kind", KINDS)
def test_guided_gradient_by_hand(kind):
    model = HandNet(kind).eval()
    torch.testing.assert_close(
        _plain_input_gradient(model, HandNet.X, 0)[:, 0, 0], HandNet.PLAIN, rtol=0, atol=0
    )
    method = GuidedBackprop(model)
    with torch.no_grad():  # the caller's no_grad must not matter
        result = method.run(HandNet.X, 0)
    assert result.raw.shape == (2, 1, 1, 2) and result.raw.dtype == torch.float32
    torch.testing.assert_close(result.raw[:, 0, 0], HandNet.GUIDED, rtol=0, atol=0)
    assert method.last_guided.shape == (2, 1, 1, 1, 2)
    torch.testing.assert_close(method.last_guided[:, 0, 0, 0], HandNet.GUIDED, rtol=0, atol=0)
    torch.testing.assert_close(result.logits, HandNet.LOGITS)
    # afterwards the plain gradient is back (no hook, no mode left)
    torch.testing.assert_close(
        _plain_input_gradient(model, HandNet.X, 0)[:, 0, 0], HandNet.PLAIN, rtol=0, atol=0
    )
    assert count_hooks(model) == 0 and torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("kind", ["module", "inplace", "functional"])
def test_guided_gradcam_by_hand(kind):
    model = HandNet(kind).eval()
    method = GuidedGradCAM(model, layer="conv")
    raw = method(HandNet.X, 0)
    # Grad-CAM at the conv output z (before the rectifier): weights mean(g_z) per channel
    # image 0: g_z = [[1, 0], [0, -2]] -> w = [0.5, -1]; z = [[1, -2], [-1, 2]]
    #          cam = 0.5 z_0 - z_1 = [1.5, -3];  image 1: g_z = [[0, 1], [-2, 0]] -> w = [0.5, -1]
    #          z = [[-1, 3], [1, -3]] -> cam = [-1.5, 4.5]
    cam = torch.tensor([[1.5, 0.0], [0.0, 4.5]])  # relu
    torch.testing.assert_close(method.last_cam[:, 0, 0], cam, rtol=0, atol=1e-6)
    torch.testing.assert_close(raw[:, 0, 0], HandNet.GUIDED * cam, rtol=0, atol=1e-6)
    # at the rectifier's output instead (layer found automatically when it is a module)
    if kind != "functional":
        raw = GuidedGradCAM(model)(HandNet.X, 0)
        torch.testing.assert_close(
            raw[:, 0, 0], HandNet.GUIDED * HandNet.GRADCAM.relu(), rtol=0, atol=1e-6
        )


class SmallCNN(nn.Module):
    """conv-BN-ReLU (in place) -> conv stride 2 - ReLU -> conv (bias) -> ReLU -> GAP -> fc."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(8, classes)
        with torch.no_grad():
            bn = self.features[1]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.bias.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_guided_backprop_matches_pytorch_grad_cam_per_image():
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel

    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(3, 3, 8, 10)
    targets = torch.tensor([[1, 4], [0, 2], [3, 3]])
    method = GuidedBackprop(model)
    raw = method(x, targets)
    guided = method.last_guided
    assert guided.shape == (3, 2, 3, 8, 10)
    torch.testing.assert_close(raw, guided.sum(dim=2))
    # the guided and the plain gradient differ on this model
    plain = _plain_input_gradient(model, x[:1], 1)[0]
    assert not torch.allclose(guided[0, 0], plain, atol=1e-4)
    for i in range(3):
        for k in range(2):
            theirs_model = GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")
            theirs = theirs_model(x[i : i + 1].clone(), int(targets[i, k]))  # (H, W, C)
            expected = torch.from_numpy(theirs).permute(2, 0, 1)
            torch.testing.assert_close(guided[i, k], expected, rtol=1e-5, atol=1e-6)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    return ((flat - low) / (high - low)).view_as(maps)


def test_fullgrad_matches_pytorch_grad_cam():
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(1)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 10)
    classes = [2, 4]
    raw = FullGrad(model)(x, torch.tensor(classes))
    assert raw.shape == (2, 1, 8, 10) and (raw >= 0).all()
    fullgrad = pgc.FullGrad(copy.deepcopy(model), target_layers=[])
    theirs = fullgrad(x.clone(), targets=[ClassifierOutputTarget(c) for c in classes])
    torch.testing.assert_close(_minmax(raw[:, 0]), torch.from_numpy(theirs), rtol=0, atol=1e-5)
    # 4 bias layers (3 convs, 1 BN): the input term (3 channels) + 4 terms, each map <= 1
    assert len(FullGrad(model).bias_layers()) == 4
    assert float(raw.max()) <= 3 + 4 * 8 + 1e-4


def test_fullgrad_by_hand_on_a_conv_with_bias():
    # x (1 channel, 1x2) -> conv 1x1 (w = 2, b = 1) -> GAP -> fc (weight 3):
    # y = 3 * mean(2 x + 1); d y / d x = 3 at each pixel; d y / d z = 1.5 (constant)
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.append(nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[0].bias.fill_(1.0)
        model[3].weight.fill_(3.0)
        model[3].bias.zero_()
    x = torch.tensor([[[[1.0, -3.0]]]])
    # input term: |x * 3| = [3, 9] -> min-max [0, 1]; bias term |1 * 1.5| constant -> 0
    torch.testing.assert_close(FullGrad(model)(x, 0)[0, 0, 0], torch.tensor([0.0, 1.0]))


def test_guided_gradcam_is_guided_backprop_times_upsampled_relu_gradcam():
    torch.manual_seed(2)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 10)
    method = GuidedGradCAM(model)
    result = method.run(x, "top2")
    guided = GuidedBackprop(model)
    guided(x, result.targets)
    cam = GradCAM(model)(x, result.targets)
    assert cam.shape == (2, 2, 4, 5)
    upsampled = F.interpolate(cam.relu(), size=(8, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(method.last_cam, upsampled)
    torch.testing.assert_close(method.last_guided, guided.last_guided)
    expected = (guided.last_guided * upsampled[:, :, None]).sum(dim=2)
    torch.testing.assert_close(result.raw, expected)
    assert result.raw.shape == (2, 2, 8, 10) and result.raw.abs().sum() > 0


class FailingNet(nn.Module):
    """Train-mode state (BN, dropout), an nn.ReLU, a functional F.relu; ``fail`` raises."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 3)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv(self.stem(x)))
        if self.fail:
            raise RuntimeError("boom")
        return self.fc(self.dropout(features.mean(dim=(2, 3))))


@pytest.mark.parametrize("name", GUIDED)
def test_state_hooks_and_functional_relu_restored(name):
    model = FailingNet().train()
    model.stem.requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    before = model.stem[1].running_mean.clone()
    method = get_method(name)(model)
    raw = method(x, "top2")
    assert raw.shape == (2, 2, 8, 8) and torch.isfinite(raw).all()

    def restored() -> None:
        assert_state_restored(model, before)
        assert torch._C._len_torch_function_stack() == 0
        assert all(type(m) is nn.ReLU for m in [model.stem[2]])

    restored()
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"), method:
        method(x)
    restored()
    # the functional ReLU is plain again: its gradient keeps negative values
    z = torch.tensor([1.0, 2.0], requires_grad=True)
    (grad,) = torch.autograd.grad((F.relu(z) * torch.tensor([-1.0, 1.0])).sum(), z)
    assert torch.equal(grad, torch.tensor([-1.0, 1.0]))
    model.fail = False
    assert torch.isfinite(method(x)).all()


def test_guided_relus_context_restores_after_an_exception():
    model = HandNet("inplace").eval()
    with pytest.raises(RuntimeError, match="inside"), guided_relus(model):
        assert count_hooks(model) == 1 and torch._C._len_torch_function_stack() == 1
        raise RuntimeError("inside")
    assert count_hooks(model) == 0 and torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("name", GUIDED)
def test_through_the_public_api(name):
    torch.manual_seed(3)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 10)
    result = camlens.explain(model, x, method=name, target="top2")
    assert result.method == name and result.layer == "features"
    assert result.raw.shape == (2, 2, 8, 10) and result.maps.shape == (2, 2, 8, 10)
    assert float(result.maps.max()) == pytest.approx(1.0)
    assert torch.equal(result.raw, get_method(name)(model)(x, "top2"))


def test_guided_gradcam_explain_maps_have_the_input_size():
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 12, 14)
    result = camlens.explain(model, x, method="guidedgradcam")
    assert result.maps.shape == (1, 1, 12, 14) and result.raw.shape == (1, 1, 12, 14)
    assert float(result.maps.min()) >= 0 and float(result.maps.max()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", GUIDED)
def test_eigen_smooth_refused_aug_smooth_and_smooth_work(name):
    cls = get_method(name)
    assert cls.needs_gradients and not cls.eigen_smooth_applies and cls.aug_smooth_applies
    with pytest.raises(ConfigError, match="eigen_smooth"):
        cls(SmallCNN(), eigen_smooth=True)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 10)
    plain = cls(model).run(x, "top1")
    augmented = cls(model, aug_smooth=True).run(x, "top1")
    assert augmented.raw.shape == plain.raw.shape and torch.equal(augmented.targets, plain.targets)
    # the mean over the six augmentations, each flipped back
    maps = []
    for flip, factor in ((False, 1.0), (False, 0.9), (False, 1.1), (True, 0.9), (True, 1.0)):
        copy_ = (x * factor).flip(-1) if flip else x * factor
        raw = cls(model)(copy_, plain.targets)
        maps.append(raw.flip(-1) if flip else raw)
    copy_ = (x * 1.1).flip(-1)
    maps.append(cls(model)(copy_, plain.targets).flip(-1))
    torch.testing.assert_close(augmented.raw, sum(maps) / 6, rtol=1e-5, atol=1e-6)
    once = cls(model, smooth=1, smooth_sigma=0.0).run(x, "top1")
    torch.testing.assert_close(once.raw, plain.raw)


def test_explain_writes_the_guided_pictures_beside_the_overlays(tmp_path):
    """``run_explain`` with a guided method writes ``guided/<stem>_c<class>.png`` per map: the
    paper's picture of the same gradients the method returns, at the overlay's size."""
    from PIL import Image

    from camlens.render import gradient_picture

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()  # fmt: skip
    classifier = camlens.load_model(net, labels=["a", "b", "c"], input_size=(16, 16))
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("one.png", "two.png"):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / name)
    for name in ("guidedgradcam", "guidedbackprop"):
        out = tmp_path / name
        run = camlens.run_explain(classifier, [images], out, method=name, target="top2",
                                  options=camlens.RunOptions(progress=False))  # fmt: skip
        assert run.n_ok == 2
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        method = get_method(name)(net)
        for record in records:
            x = classifier.preprocess(record["input"])
            method(x, "top2")
            expected = method.picture_gradients()[0]
            for k, entry in enumerate(record["maps"]):
                written = Image.open(out / entry["guided"])
                overlay = Image.open(out / entry["overlay"])
                assert written.size == overlay.size == (24, 20)
                picture = gradient_picture(expected[k].numpy(), size=overlay.size)
                np.testing.assert_array_equal(np.asarray(written), np.asarray(picture))
    plain = tmp_path / "gradcam"
    camlens.run_explain(classifier, [images], plain, method="gradcam",
                        options=camlens.RunOptions(progress=False))  # fmt: skip
    assert not (plain / "guided").exists()
    assert all("guided" not in m for line in (plain / "results.jsonl").read_text().splitlines()
               for m in json.loads(line)["maps"])  # fmt: skip
