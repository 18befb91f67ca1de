"""Tiny networks with hand-set weights, whose maps can be computed by hand."""

from __future__ import annotations

import torch
from torch import nn


class TinyCAMNet(nn.Module):
    """features (1x1 conv, identity weights: A = x) -> global average pooling -> fc(2 -> 3).

    With x = X below, by hand (M_c = sum_k w_k^c A_k, y_c = mean(M_c) + b_c):
        M_0 = 1*A_0 + 2*A_1 = [[1, 4], [3, 2]]          y_0 = 2.5 + 0.1 = 2.6
        M_1 = -1*A_0        = [[-1, -2], [-3, -4]]      y_1 = -2.5 + 0.2 = -2.3
        M_2 = .5*A_0 + .5*A_1 = [[.5, 1.5], [1.5, 1.5]] y_2 = 1.25 + 0.3 = 1.55
    """

    X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, -1.0]]]])
    M = torch.tensor(
        [[[1.0, 4.0], [3.0, 2.0]], [[-1.0, -2.0], [-3.0, -4.0]], [[0.5, 1.5], [1.5, 1.5]]]
    )
    Y = torch.tensor([2.6, -2.3, 1.55])

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 2, kernel_size=1, bias=False)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.5, 0.5]]))
            self.fc.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class SharedActNet(nn.Module):
    """The same activation module runs in the stem and in the head (as in EfficientNet-Lite)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.act(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


class InplaceNet(nn.Module):
    """conv -> in-place ReLU -> GAP -> fc; explaining ``conv`` must see pre-ReLU values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


class DictOutputNet(nn.Module):
    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner = inner
        self.kind = kind

    def forward(self, x: torch.Tensor):
        logits = self.inner(x)
        aux = torch.zeros(x.shape[0], 7)
        if self.kind == "dict":
            return {"aux": aux, "logits": logits}
        return (logits, aux)


class Exploding(nn.Module):
    """Raises inside forward, after the feature layer ran (hooks must still be removed)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        if self.explode:
            raise RuntimeError("boom")
        return self.fc(features.mean(dim=(2, 3)))
