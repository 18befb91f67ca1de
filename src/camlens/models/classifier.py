"""The Classifier: a module plus how to feed it (preprocess) and how to name its outputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from camlens.errors import ConfigError
from camlens.io import load_image, resized_pixels
from camlens.models.outputs import OutputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = str | os.PathLike | Image.Image

#: The probability a multi-label class needs to count as present (``--threshold-prob``).
DEFAULT_THRESHOLD_PROB = 0.5


def class_probabilities(logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """(N, classes) probabilities of logits: softmax over the classes (one class per image),
    or, for a multi-label model, an independent sigmoid per class.

    The one place camlens turns logits into probabilities for predictions and for the
    probability-based metrics.

    Parameters:
        logits: (N, classes) scores.
        multilabel: sigmoid per class instead of softmax over the classes.

    Returns:
        float32 (N, classes), on the logits' device.

    Example:
        >>> class_probabilities(torch.tensor([[0.0, 0.0]]))
        tensor([[0.5000, 0.5000]])
        >>> class_probabilities(torch.tensor([[0.0, 2.0]]), multilabel=True)
        tensor([[0.5000, 0.8808]])
    """
    logits = logits.float()
    return logits.sigmoid() if multilabel else logits.softmax(dim=1)


def check_threshold_prob(value: float) -> float:
    """``value`` when it is a usable multi-label threshold (strictly between 0 and 1).

    Raises:
        ConfigError: a threshold outside (0, 1).

    Example:
        >>> check_threshold_prob(0.3)
        0.3
    """
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(
            f"the probability threshold must lie strictly between 0 and 1, got {value}; "
            "a multi-label class counts as present when its sigmoid probability reaches it "
            "(default 0.5)"
        )
    return float(value)


@dataclass
class Classifier:
    """An image classifier ready to explain.

    Attributes:
        module: the network, in eval mode.
        labels: one name per class.
        input_size: (height, width) that ``preprocess`` resizes every image to.
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
        name: the spec it was loaded from.
        output: how to select the logits from the module's output (see ``select_logits``).
        layer: default feature layer for the methods (None: found automatically).
        multilabel: the classes are independent (sigmoid outputs, e.g. CheXNet's 14
            findings): probabilities are per-class sigmoids, predictions are every class whose
            probability is at least ``threshold_prob``, and the target ``"positive"``
            explains each of them. False: one class per image (softmax).
        threshold_prob: a multi-label class is predicted when its sigmoid probability is at
            least this (default 0.5).
    """

    module: nn.Module
    labels: list[str]
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    name: str = "custom"
    output: OutputSpec = None
    layer: str | None = None
    info: dict = field(default_factory=dict)
    multilabel: bool = False
    threshold_prob: float = DEFAULT_THRESHOLD_PROB

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, classes) probabilities of this model's logits: sigmoid when ``multilabel``,
        else softmax (see :func:`class_probabilities`).

        Example:
            >>> from torch import nn
            >>> model = Classifier(nn.Identity(), ["a", "b"], multilabel=True)
            >>> model.probabilities(torch.tensor([[0.0, 2.0]]))
            tensor([[0.5000, 0.8808]])
        """
        return class_probabilities(logits, self.multilabel)

    @property
    def device(self) -> torch.device:
        """The device of the module's first parameter (CPU for parameter-free modules)."""
        param = next(self.module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        param = next(self.module.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Images -> normalised batch (N, 3, H, W) on the model's device.

        The whole image is resized to ``input_size`` (bilinear, antialiased; no centre crop,
        so the maps cover the whole photo), scaled to [0, 1] and normalised with
        ``(x - mean) / std``.

        Example:
            >>> import camlens
            >>> model = camlens.load_model()
            >>> model.preprocess(["cat.jpg", "photos/coffee.jpg"]).shape
            torch.Size([2, 3, 224, 224])
        """
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        arrays = [resized_pixels(load_image(img), self.input_size) for img in images]
        return self.normalize(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, H, W) at the input size -> the model's input on its device:
        scaled to [0, 1] and normalised with ``(x - mean) / std``."""
        batch = pixels.float() / 255.0
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        batch = (batch - mean) / std
        return batch.to(device=self.device, dtype=self.dtype)

    def label(self, index: int) -> str:
        """Name of class ``index`` (its number when the model has no names for it)."""
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)
