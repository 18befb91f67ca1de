"""CAM-ready networks that ``camlens train`` builds, and loading them back from a folder.

Every trained model ends in convolutional features -> global average pooling -> one linear
layer (Zhou et al. 2016), so that its class activation maps are exact. Its structure is
described by a small ``architecture`` dictionary (saved in ``config.json``), from which
``build_network`` rebuilds it; its weights are in ``model.safetensors``. Loading never runs
code from the folder: JSON and safetensors only.

Recipes (``architecture["recipe"]``):

* ``"simple"``: ``SimpleCNN``, a small CNN trained from scratch (for small images, on a CPU).
* ``"replace-linear"``: a backbone whose head already is GAP + one linear layer (the built-in
  EfficientNet-Lite0, ResNets, DenseNets...); only that linear layer is replaced.
* ``"zhou"``: any other backbone is cut after its last convolutional feature layer, and
  ``CamHead`` adds a 3x3 convolution (1024 channels by default) + ReLU, GAP and a linear layer,
  as in the CAM paper.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.models.architectures import build_architecture
from camlens.models.classifier import Classifier

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "camlens-trained-model"
FORMAT_VERSION = 1

SIMPLE_WIDTHS = (16, 32, 64, 128)


class SimpleCNN(nn.Module):
    """A small CNN for small images: conv blocks -> GAP -> linear.

    The first block is conv 3x3 -> instance normalisation -> ReLU; each further width adds
    conv 3x3 -> batch normalisation -> ReLU, preceded by max pooling (halving the resolution)
    except for the last block, which refines the features at the resolution of the one before
    it. With the default widths the class activation maps are a quarter of the input's side:
    16 x 16 at 64 px.

    Instance normalisation first removes each image's own mean colour from the first features,
    so the network sees contrast rather than absolute colour. On the shapes data set (random
    shape and background colours, 600 images at 64 px) it is what makes learning from a few
    hundred images work: in our runs, below 50 % validation accuracy after 20-30 epochs with
    batch normalisation in the first block, 96-98 % with instance normalisation. Keeping the
    last block unpooled (16 x 16 instead of 8 x 8 maps at 64 px) cost 12 % more training time
    and raised top-1 localisation at Zhou's threshold from 8 % to 31 % of the validation
    images (``benchmarks/train_bench.py``).

    Parameters:
        num_classes: number of outputs.
        widths: channels of the blocks.

    Example:
        >>> SimpleCNN(3)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 3])
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = SIMPLE_WIDTHS) -> None:
        super().__init__()
        first = widths[0]
        layers: list[nn.Module] = [
            nn.Conv2d(3, first, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(first, affine=True),
            nn.ReLU(inplace=True),
        ]
        pooled = len(widths) - 2  # every further block but the last halves the resolution
        for i, (in_channels, out_channels) in enumerate(itertools.pairwise(widths)):
            if i < pooled:
                layers.append(nn.MaxPool2d(2))
            layers.extend(
                [
                    nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
            )
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class CamHead(nn.Module):
    """Zhou's recipe on a cut backbone: features -> 3x3 conv + ReLU -> GAP -> linear.

    Parameters:
        features: the backbone up to its last convolutional feature layer (returns N, C, h, w).
        in_channels: C.
        num_classes: number of outputs.
        channels: output channels of the added convolution (1024 in the CAM paper).
    """

    def __init__(
        self, features: nn.Module, in_channels: int, num_classes: int, channels: int = 1024
    ) -> None:
        super().__init__()
        self.features = features
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.conv(self.features(x))))))


class TruncatedBackbone(nn.Module):
    """A backbone cut after ``layer`` (torch.fx, via torchvision's feature extractor)."""

    def __init__(self, backbone: nn.Module, layer: str) -> None:
        super().__init__()
        try:
            from torchvision.models.feature_extraction import create_feature_extractor
        except ImportError as error:
            raise ConfigError(
                "cutting a backbone for Zhou's recipe needs torchvision: "
                "pip install 'camlens[vision]'"
            ) from error
        try:
            self.body = create_feature_extractor(backbone, return_nodes={layer: "features"})
        except Exception as error:  # torch.fx raises many kinds of errors on untraceable code
            raise ConfigError(
                f"cannot cut the backbone after {layer!r} (torch.fx could not trace it: "
                f"{error}); choose another backbone"
            ) from error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)["features"]


def build_network(architecture: dict[str, Any], *, pretrained: bool = False) -> nn.Module:
    """Build the network an ``architecture`` dictionary describes.

    Parameters:
        architecture: ``{"backbone", "recipe", "num_classes", ...}`` as written by
            ``make_architecture`` (``widths`` for simple; ``classifier`` for replace-linear;
            ``feature_layer``, ``in_channels`` and ``head_channels`` for zhou).
        pretrained: start the built-in backbone from its pretrained weights (for training);
            loading a trained model does not need them.

    Returns:
        The ``nn.Module`` (in train mode, as built).

    Raises:
        ConfigError: an unknown recipe or backbone, or a dictionary with missing keys.

    Example:
        >>> build_network({"backbone": "simple", "recipe": "simple", "num_classes": 3,
        ...                "widths": [32, 64, 128]})
        SimpleCNN(...)
    """
    try:
        recipe = architecture["recipe"]
        num_classes = int(architecture["num_classes"])
        if recipe == "simple":
            return SimpleCNN(num_classes, tuple(architecture["widths"]))
        backbone = backbone_module(architecture["backbone"], pretrained=pretrained)
        if recipe == "replace-linear":
            return replace_linear(backbone, architecture["classifier"], num_classes)
        if recipe == "zhou":
            features = TruncatedBackbone(backbone, architecture["feature_layer"])
            return CamHead(
                features,
                int(architecture["in_channels"]),
                num_classes,
                int(architecture["head_channels"]),
            )
    except KeyError as error:
        raise ConfigError(f"architecture {architecture} lacks the key {error}") from error
    raise ConfigError(f"unknown recipe {recipe!r}; expected simple, replace-linear or zhou")


def backbone_module(spec: str, *, pretrained: bool) -> nn.Module:
    """The backbone ``nn.Module`` an architecture name builds (see ``build_architecture``).

    ``pretrained`` gives a built-in backbone its pretrained weights; torchvision and timm
    backbones are always randomly initialised.
    """
    return build_architecture(spec, pretrained=pretrained).module


def replace_linear(module: nn.Module, name: str, num_classes: int) -> nn.Module:
    """Replace the linear layer ``name`` of ``module`` by a new one with ``num_classes`` outputs."""
    old = module.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"{name!r} is a {type(old).__name__}, not the final nn.Linear")
    module.set_submodule(name, nn.Linear(old.in_features, num_classes))
    return module


def load_trained(path: str | Path, *, device: str | torch.device | None = None) -> Classifier:
    """Load a model folder written by ``camlens train``: ``config.json`` + ``model.safetensors``.

    Parameters:
        path: the folder (``MODEL_DIR``).
        device: where to put the model (default: CPU).

    Returns:
        A ``Classifier`` in eval mode, with the trained labels, input size and normalisation,
        multi-label when the folder was trained with ``--multilabel`` (its config's
        ``"multilabel": true``). Its head is GAP + linear, so CAM is exact for it.

    Raises:
        ConfigError: a missing or malformed file, or weights that do not fit the architecture.

    Example:
        >>> model = load_trained("runs/shapes")  # written by camlens.train
        >>> model.labels, model.input_size
        (['circle', 'square', 'triangle'], (32, 32))
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    config = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(
            f"{weights} is missing; a model folder needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(written by camlens train when an epoch finishes)"
        )
    module = build_network(config["architecture"], pretrained=False)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"cannot read {weights}: {error}") from error
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"the weights in {weights} do not fit the architecture in {folder / CONFIG_FILE}: "
            f"{error}"
        ) from error
    if device is not None:
        module.to(device)
    module.eval()
    return Classifier(
        module=module,
        labels=list(config["labels"]),
        input_size=tuple(config["input_size"]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        name=str(folder),
        info={"config": config},
        multilabel=bool(config.get("multilabel", False)),
    )


def read_config(folder: str | Path) -> dict[str, Any]:
    """Read and check ``folder/config.json`` of a trained model."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; pass a folder written by camlens train") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a camlens trained-model config (format {FORMAT!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(
            f"{path} has format version {config['format_version']}; this camlens reads up to "
            f"{FORMAT_VERSION}: upgrade camlens"
        )
    missing = [
        k for k in ("architecture", "labels", "input_size", "mean", "std") if k not in config
    ]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}")
    return config
