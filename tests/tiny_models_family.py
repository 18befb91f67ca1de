"""Tiny networks for the CAM family, with maps computed by hand (see each docstring)."""

from __future__ import annotations

import torch
from torch import nn

from camlens.hooks import get_layer


class TinyFlatNet(nn.Module):
    """features (1x1 conv, identity: A = x) -> flatten -> fc(8 -> 2), no pooling.

    The logit is linear in A, so its gradient is the fc weight itself and varies by position:
    ``y_0 = sum_kij G_k[i, j] A_k[i, j]`` and ``y_1 = 0`` (zero weights and biases). With X::

        A_0 = [[1, 2], [3, 4]]   (sum 10)      G_0 = [[1, 0], [-1, 2]]
        A_1 = [[2, 0], [1, 1]]   (sum 4)       G_1 = [[0, 1], [1, -2]]
        y_0 = (1 - 3 + 8) + (1 - 2) = 5

    Maps of class 0, by hand:
        Grad-CAM:   w = mean G = [0.5, 0]          -> 0.5 A_0 = [[.5, 1], [1.5, 2]]
        HiResCAM:   G_0 A_0 + G_1 A_1 = [[1, 0], [-3, 8]] + [[0, 0], [1, -2]] = [[1, 0], [-2, 6]]
        Layer-CAM:  relu(G_0) A_0 + relu(G_1) A_1 = [[1, 0], [0, 8]] + [[0, 0], [1, 0]]
                    = [[1, 0], [1, 8]]
        XGrad-CAM:  w = [6 / 10, -1 / 4]           -> [[0.1, 1.2], [1.55, 2.15]]
        Grad-CAM++: alpha = G^2 / (2 G^2 + S G^3) = 1 / (2 + S G) where G != 0, else 0
                    ch 0 (S = 10): G = 1 -> 1/12, G = -1 -> -1/8, G = 2 -> 1/22
                    ch 1 (S = 4):  G = 1 -> 1/6 (twice), G = -2 -> -1/6
                    w = sum alpha relu(G) = [1/12 + 2/22, 1/6 + 1/6] = [23/132, 1/3]
        Ablation-CAM: y_0 without A_0 = -1, without A_1 = 6
                    w = [(5 + 1) / 5, (5 - 6) / 5] = [1.2, -0.2]
        Score-CAM:  H_0 = (A_0 - 1) / 3, H_1 = A_1 / 2 (no upsampling: 2x2 input);
                    y_0(X * H_0) = (0 + 0 - 2 + 8) + (0 + 0 + 2/3 - 2) = 14/3
                    y_0(X * H_1) = (1 + 0 - 1.5 + 4) + (0 + 0 + 0.5 - 1) = 3
                    p_0 = sigmoid(y_0) since y_1 = 0 -> w = [sigmoid(14/3), sigmoid(3)]
    """

    X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [1.0, 1.0]]]])
    G = torch.tensor([[[1.0, 0.0], [-1.0, 2.0]], [[0.0, 1.0], [1.0, -2.0]]])

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 2, kernel_size=1, bias=False)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.fc.weight.zero_()
            self.fc.weight[0].copy_(self.G.flatten())
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.features(x)))


class TwoStageNet(nn.Module):
    """conv (8x8) -> ReLU -> conv stride 2 (4x4) -> ReLU -> GAP -> fc: two layers to fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(x)).mean(dim=(2, 3)))


class FullResNet(nn.Module):
    """Convolutions without stride (features at input resolution) -> GAP -> fc.

    Score-CAM's masks then need no upsampling, so normalising before or after upsampling
    (torchcam vs. the authors' code) cannot differ.
    """

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 7, 3, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class LogSoftmax(nn.Module):
    """Wraps a classifier so that its outputs are log-probabilities."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).log_softmax(dim=1)


class IdentityNet(nn.Module):
    """features (1x1 conv, identity: A = x) -> GAP -> fc: feeds chosen activations to a method."""

    def __init__(self, channels: int, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.fc = nn.Linear(channels, classes)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class StatefulNet(nn.Module):
    """BatchNorm and dropout (train-mode state to preserve); ``fail_at`` = the forward call
    (1 = the next one) that raises, to check that hooks and state survive an error."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 3)
        self.fail_at: int | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        features = self.features(self.stem(x))
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("boom")
        return self.fc(self.dropout(features.mean(dim=(2, 3))))


def count_hooks(module: nn.Module) -> int:
    """Forward, forward-pre and backward hooks left on ``module`` and its submodules."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


def assert_state_restored(model: StatefulNet, running_mean: torch.Tensor) -> None:
    """A ``StatefulNet`` put in train mode with its stem frozen is as it was after a method
    call: train flags, ``requires_grad``, no parameter ``.grad``, BatchNorm statistics
    (``running_mean``: the stem's before the call) and no hooks left."""
    assert model.training and model.dropout.training and model.stem[1].training
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.stem[1].running_mean, running_mean)
    assert count_hooks(model) == 0


def activations_and_gradients(
    model: nn.Module, layer: str, x: torch.Tensor, classes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output ``A`` of ``layer`` and ``d y_c / d A`` for each image's class, by autograd:
    an independent reference for the gradient methods."""
    store = {}
    handle = get_layer(model, layer).register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    score = logits.gather(1, torch.tensor(classes)[:, None]).sum()
    (grads,) = torch.autograd.grad(score, store["a"])
    return store["a"].detach(), grads
