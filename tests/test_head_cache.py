"""The cache of found heads (``camlens.layers.cached_cam_head``): ``camlens.explain`` builds a
new method per call, and must not trace the model again each time; a changed module must be
traced again."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import camlens
from camlens import layers
from camlens.layers import cached_cam_head, clear_head_cache, module_structure
from camlens.methods import CAM, GradCAM


class PoolNet(nn.Module):
    """conv -> ReLU -> (extra: Identity, skipped) -> adaptive GAP -> flatten -> fc."""

    def __init__(self, width: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.extra = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.extra(self.features(x))).flatten(1))


def expected_cam(net: PoolNet, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CAM by hand: the fc weights of the targets times the map that feeds the pooling."""
    with torch.no_grad():
        features = net.extra(net.features(x))
        return torch.einsum("nkc,nchw->nkhw", net.fc.weight[targets], features)


@pytest.fixture
def counted(monkeypatch):
    """Counts the traced discoveries (calls of ``find_cam_head`` made by the cache)."""
    calls = []
    original = layers.find_cam_head

    def counting(*args, **kwargs):
        calls.append(kwargs.get("layer"))
        return original(*args, **kwargs)

    monkeypatch.setattr(layers, "find_cam_head", counting)
    return calls


def forward_counter(module: nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_hook(lambda *_: seen.append(1))
    return seen


def test_repeated_explain_traces_the_model_once(counted):
    net = PoolNet()
    model = camlens.load_model(net, labels=list("abcde"), input_size=(12, 12))
    forwards = forward_counter(net)
    x = torch.randn(3, 3, 12, 12)
    first = camlens.explain(model, x, method="cam")
    second = camlens.explain(model, x, method="cam")
    assert len(counted) == 1 and len(forwards) == 3  # one discovery + one forward per call
    assert torch.equal(first.raw, second.raw)
    # Grad-CAM asks the same question (default layer, same input): no discovery either.
    camlens.explain(model, x, method="gradcam")
    camlens.explain(model, x, method="gradcam", target="top2")
    assert len(counted) == 1 and len(forwards) == 5
    # Another input size is another question: traced once more, then cached too.
    camlens.explain(model, torch.randn(2, 3, 16, 16), method="cam")
    camlens.explain(model, torch.randn(2, 3, 16, 16), method="cam")
    assert len(counted) == 2


def test_builtin_model_is_traced_once_through_explain(builtin_model, counted):
    module = builtin_model.module
    clear_head_cache(module)
    forwards: list[int] = []
    handle = module.register_forward_hook(lambda *_: forwards.append(1))
    x = torch.randn(2, 3, 64, 64)
    try:
        results = [camlens.explain(builtin_model, x, method=m) for m in ("cam", "cam", "gradcam")]
    finally:
        handle.remove()
    assert counted == [None] and len(forwards) == 4
    assert [r.layer for r in results] == ["_swish"] * 3
    assert results[0].identity_error < 1e-3 and torch.equal(results[0].raw, results[1].raw)


def test_replaced_classifier_is_found_again_with_right_maps(counted):
    net = PoolNet(width=6, classes=5)
    model = camlens.load_model(net, input_size=(10, 10))
    x = torch.randn(2, 3, 10, 10)
    camlens.explain(model, x)
    net.fc = nn.Linear(6, 7)  # another width: logits (N, 7)
    model = camlens.load_model(net, input_size=(10, 10))
    result = camlens.explain(model, x, target="top2")
    assert len(counted) == 2
    assert result.logits.shape == (2, 7) and result.targets.shape == (2, 2)
    torch.testing.assert_close(result.raw, expected_cam(net, x, result.targets))
    assert result.identity_error < 1e-5
    # A weight of another shape set on the same layer invalidates too.
    net.fc.weight = nn.Parameter(torch.randn(4, 6))
    net.fc.bias = nn.Parameter(torch.randn(4))
    result = camlens.explain(model, x, target=[[3], [0]])
    assert len(counted) == 3 and result.logits.shape == (2, 4)
    torch.testing.assert_close(result.raw, expected_cam(net, x, result.targets))


def test_replaced_feature_layer_is_found_again(counted):
    net = PoolNet(width=6)
    model = camlens.load_model(net, input_size=(10, 10))
    x = torch.randn(2, 3, 10, 10)
    method = CAM(net)  # a reused instance sees the change too
    assert camlens.explain(model, x).layer == "features" and method.run(x).layer == "features"
    net.extra = nn.Conv2d(6, 6, 1)  # now the last feature map before the pooling
    result = camlens.explain(model, x)
    assert len(counted) == 2 and result.layer == "extra"
    torch.testing.assert_close(result.raw, expected_cam(net, x, result.targets))
    reused = method.run(x)
    assert reused.layer == "extra" and torch.equal(reused.raw, result.raw)
    # A head that is no longer GAP + one linear layer: CAM refuses it instead of using a
    # stale head.
    net.fc = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5))
    with pytest.raises(camlens.ConfigError, match="CAM cannot explain"):
        camlens.explain(model, x)
    assert camlens.explain(model, x, method="gradcam").layer == "extra"
    assert len(counted) == 3


def test_weight_updates_do_not_retrace_and_maps_follow_them(counted):
    net = PoolNet()
    model = camlens.load_model(net, input_size=(8, 8))
    x = torch.randn(2, 3, 8, 8)
    before = camlens.explain(model, x, target=[[1], [2]])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    net(x).sum().backward()
    optimizer.step()
    net.load_state_dict({k: v * 2 for k, v in net.state_dict().items()})
    after = camlens.explain(model, x, target=[[1], [2]])
    assert len(counted) == 1
    assert not torch.equal(before.raw, after.raw)
    torch.testing.assert_close(after.raw, expected_cam(net, x, after.targets))
    assert after.identity_error < 1e-4


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_cached_and_uncached_results_are_identical(method, builtin_model):
    x = torch.randn(2, 3, 64, 64)
    uncached = []
    for _ in range(2):
        clear_head_cache()
        uncached.append(camlens.explain(builtin_model, x, method=method, target="top2").raw)
    cached = [camlens.explain(builtin_model, x, method=method, target="top2").raw for _ in range(2)]
    instance = camlens.methods.get_method(method)(builtin_model.module)
    reused = camlens.explain(builtin_model, x, method=instance, target="top2").raw
    for raw in (uncached[1], *cached, reused):
        assert torch.equal(raw, uncached[0])


@pytest.mark.parametrize("cls", [CAM, GradCAM])
def test_methods_without_explain_share_the_cache(cls, counted):
    net = PoolNet()
    x = torch.randn(2, 3, 8, 8)
    raws = [cls(net).run(x).raw for _ in range(3)]
    assert len(counted) == 1 and all(torch.equal(r, raws[0]) for r in raws)


def test_cache_keys_and_structure():
    net = PoolNet()
    x = torch.randn(1, 3, 8, 8)
    head = cached_cam_head(net, x)
    assert cached_cam_head(net, x) is head
    assert cached_cam_head(net, torch.randn(5, 3, 8, 8)) is head  # the batch size is not a key
    assert cached_cam_head(net, x, layer="features.0").feature_layer == "features.0"
    structure, submodules = module_structure(net)
    assert [part[0] for part in structure] == ["", "features", "features.0", "features.1",
                                               "extra", "pool", "fc"]  # fmt: skip
    assert structure[-1][2] == (
        ("weight", torch.Size([5, 6]), torch.float32, torch.device("cpu")),
        ("bias", torch.Size([5]), torch.float32, torch.device("cpu")),
    )
    assert submodules[0] is net
    clear_head_cache(net)
    again = cached_cam_head(net, x)
    assert again is not head and again == head
    net.double()  # parameters of another dtype: traced again
    assert cached_cam_head(net, x.double()) is not again


def test_cache_does_not_keep_models_alive():
    net = PoolNet()
    cached_cam_head(net, torch.randn(1, 3, 8, 8))
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


def test_a_shared_layer_is_captured_at_its_last_call_only():
    """The head's ``call = -1`` (the last call) becomes an index, so the capture copies the
    head's output only, not the stem's too; the maps stay CAM's: W[c] . relu6(head(stem))."""
    from tiny_models import SharedActNet

    torch.manual_seed(0)
    module, x = SharedActNet().eval(), torch.rand(2, 3, 16, 16)
    head = layers.find_cam_head(module, x)
    assert (head.feature_layer, head.call, head.layer_calls, head.call_index) == ("act", -1, 2, 1)
    copies = []
    original_clone = torch.Tensor.clone

    def counting_clone(tensor, *args, **kwargs):
        copies.append(tuple(tensor.shape))
        return original_clone(tensor, *args, **kwargs)

    features = module.act(module.head(module.act(module.stem(x))))
    expected = torch.einsum("kc,nchw->nkhw", module.fc.weight, features)
    CAM(module)(x, "top1")  # the head found (traced) and cached
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "clone", counting_clone)
        raw = CAM(module)(x, [[0, 1, 2, 3, 4]] * 2)
    assert copies == [(2, 6, 4, 4)]  # the head's output; the stem's (2, 4, 8, 8) passes as is
    torch.testing.assert_close(raw, expected)
