"""A white-box GAP network whose CAM is known exactly, and synthetic images for it.

``ColourGAP``: features = a 1x1 convolution with identity weights (the feature maps *are* the
image's colour channels), global average pooling, and a linear head whose class ``c`` weight
is ``GAIN`` on channel ``c`` only (red, green, blue), bias 0. With mean 0 / std 1
preprocessing (pixels in [0, 1]), for an image with a pure-red square on black:

    CAM_red = GAIN * red channel      = GAIN inside the square, 0 elsewhere
    maps    = 1 inside the square, 0 elsewhere (at the input size = the image size)
    logit_red = GAIN * (square area) / (H * W),   logit_green = logit_blue = 0
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import camlens

GAIN = 40.0
SIZE = 64
LABELS = ["red", "green", "blue"]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourGAP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, kernel_size=1, bias=False)
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.fc.weight.copy_(GAIN * torch.eye(3))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def colour_classifier() -> camlens.Classifier:
    """``ColourGAP`` with pixels scaled to [0, 1] and no normalisation, input = image size."""
    return camlens.Classifier(
        module=ColourGAP().eval(),
        labels=list(LABELS),
        input_size=(SIZE, SIZE),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        name="colour-gap",
    )


def square_image(
    path: Path, squares: list[tuple[str, tuple[int, int, int, int]]], size: int = SIZE
) -> Path:
    """Write a black image with coloured squares ``(colour, (x0, y0, x1, y1))``."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    for colour, (x0, y0, x1, y1) in squares:
        pixels[y0:y1, x0:x1] = COLOURS[colour]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def red_logit(area: int, size: int = SIZE) -> float:
    return GAIN * area / (size * size)
