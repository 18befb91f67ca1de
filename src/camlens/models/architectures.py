"""Architectures by name: build a network, with or without built-in weights, with N classes.

The one place that knows how to build every named architecture:

* built-in names (``efficientnet_lite0``): with their pretrained weights and class names, or
  randomly initialised;
* ``"torchvision:<name>"`` and ``"timm:<name>"``: always randomly initialised, since nothing
  is downloaded at run time.

Its users: ``load_model`` (``camlens.models.registry``), which then loads a weights file;
``camlens.models.trained``, which rebuilds the backbone of a trained model before loading its
weights; and ``camlens.train``, which builds a backbone to train. Loading weights and
refusing random ones are the users' business, not this module's.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import partial
from types import ModuleType

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.models.checkpoints import count_classes, replace_output_layer
from camlens.models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from camlens.models.dense import (
    DEFAULT_DENSE_CLASSES,
    dense_architecture_task,
    dense_checkpoint_classes,
)
from camlens.models.efficientnet_lite import efficientnet_lite0

#: Built-in names -> builders of the pretrained ``Classifier``.
BUILTIN_MODELS: dict[str, Callable[[], Classifier]] = {"efficientnet_lite0": efficientnet_lite0}

# Built-in builders -> the same network without its weights (cheaper when they get replaced).
_UNTRAINED: dict[Callable[[], Classifier], Callable[[], Classifier]] = {
    efficientnet_lite0: partial(efficientnet_lite0, pretrained=False)
}

#: Prefixes of the architectures built by name from another library, with random weights.
LIBRARIES = ("torchvision", "timm")


def is_builtin(spec: str) -> bool:
    """Whether ``spec`` names a built-in (pretrained) model."""
    return spec in BUILTIN_MODELS


def is_library_architecture(spec: str) -> bool:
    """Whether ``spec`` is ``"torchvision:<name>"`` or ``"timm:<name>"``."""
    prefix, _, name = spec.partition(":")
    return prefix in LIBRARIES and bool(name)


def architecture_names() -> list[str]:
    """The built-in names, plus the prefixes that build other libraries' architectures."""
    return [*sorted(BUILTIN_MODELS), *(f"{prefix}:<name>" for prefix in LIBRARIES)]


def module_builder(spec: str) -> Callable[..., nn.Module]:
    """A function ``build(**options) -> nn.Module`` for a torchvision or timm architecture.

    The module it builds is randomly initialised; ``options`` go to the library's builder
    (``num_classes=...``). The name is checked now, so an unknown one fails before anything
    is built.

    Raises:
        ConfigError: the library is not installed, or has no architecture of that name.

    Example:
        >>> build = module_builder("torchvision:resnet18")
        >>> build(num_classes=3).fc.out_features
        3
    """
    prefix, _, name = spec.partition(":")
    if prefix == "torchvision" and name:
        return _torchvision_builder(name)
    if prefix == "timm" and name:
        return _timm_builder(name)
    raise ConfigError(f"{spec!r} is not torchvision:<name> or timm:<name>")


def library_classifier(spec: str, module: nn.Module) -> Classifier:
    """Wrap a torchvision or timm module (no labels) with its input size and normalisation.

    timm models describe theirs in ``pretrained_cfg``; torchvision models use 224 x 224 and
    the ImageNet mean and standard deviation.
    """
    task = dense_architecture_task(spec)
    if task is not None:
        return _dense_classifier(spec, module, task)
    config = getattr(module, "pretrained_cfg", None) or {}
    size = tuple(config.get("input_size", (3, 224, 224))[1:])
    return Classifier(
        module=module.eval(),
        labels=[],
        input_size=size,
        mean=tuple(config.get("mean", IMAGENET_MEAN)),
        std=tuple(config.get("std", IMAGENET_STD)),
        name=spec,
    )


def _dense_classifier(spec: str, module: nn.Module, task: str) -> Classifier:
    """A torchvision detector or segmenter, with what its task needs.

    A detector normalises and resizes its input itself (``module.transform``): it gets
    pixels in [0, 1] (mean 0, std 1), at a square of its ``min_size``. A segmenter gets the
    ImageNet normalisation at 224 x 224 (``input_size`` changes it). ``info`` holds the
    ``task`` and ``num_classes`` (their class layers are not a final ``nn.Linear``).
    """
    with torch.device("meta"):
        probe = module_builder(spec)()
    classes = dense_checkpoint_classes(module.state_dict(), probe, task)
    info = {"task": task, "num_classes": classes or DEFAULT_DENSE_CLASSES[task]}
    if task == "detection":
        min_size = getattr(getattr(module, "transform", None), "min_size", (320,))
        side = int(min_size[0] if isinstance(min_size, (tuple, list)) else min_size)
        mean, std, size = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (side, side)
    else:
        mean, std, size = IMAGENET_MEAN, IMAGENET_STD, (224, 224)
    return Classifier(
        module=module.eval(), labels=[], input_size=size, mean=mean, std=std, name=spec, info=info
    )


def set_num_classes(classifier: Classifier, num_classes: int) -> bool:
    """Give ``classifier`` a new, randomly initialised output layer with ``num_classes`` outputs.

    Nothing changes when it already has that many. Returns whether the layer was replaced
    (the class names are then dropped: they belonged to the old classes).
    """
    if num_classes == count_classes(classifier.module):
        return False
    replace_output_layer(classifier.module, num_classes)
    classifier.labels = []
    return True


def build_architecture(
    spec: str, *, pretrained: bool = True, num_classes: int | None = None
) -> Classifier:
    """Build the architecture ``spec`` names.

    Parameters:
        spec: a built-in name, ``"torchvision:<name>"`` or ``"timm:<name>"``.
        pretrained: give a built-in model its pretrained weights and class names. ``False``
            builds it randomly initialised where it can (``efficientnet_lite0``), for weights
            that come from elsewhere. torchvision and timm architectures are always randomly
            initialised.
        num_classes: number of outputs (default: the architecture's own, 1000 for ImageNet
            models). A built-in model gets a new, random output layer.

    Returns:
        A ``Classifier`` in eval mode with the architecture's input size and normalisation;
        its labels are the built-in names when they still apply, else empty.

    Raises:
        ConfigError: an unknown name, or a library that is not installed.

    Example:
        >>> build_architecture("torchvision:resnet18", num_classes=3).module.fc.out_features
        3
    """
    if is_library_architecture(spec):
        build = module_builder(spec)
        module = build() if num_classes is None else build(num_classes=num_classes)
        return library_classifier(spec, module)
    if is_builtin(spec):
        builder = BUILTIN_MODELS[spec]
        classifier = builder() if pretrained else _UNTRAINED.get(builder, builder)()
        if num_classes is not None:
            set_num_classes(classifier, num_classes)
        return classifier
    raise ConfigError(
        f"unknown architecture {spec!r}; expected one of: {', '.join(architecture_names())}"
    )


def _vision_library(library: str) -> ModuleType:
    """``torchvision`` or ``timm``, imported when an architecture of it is asked for."""
    try:
        return importlib.import_module(library)
    except ImportError as error:
        raise ConfigError(
            f"{library} models need the 'vision' extra: pip install 'camlens[vision]'"
        ) from error


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    torchvision = _vision_library("torchvision")
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as error:
        raise ConfigError(
            f"torchvision has no model {name!r}: {error} (torchvision.models.list_models() "
            "lists them)"
        ) from error
    # Detection and segmentation builders default their backbone to ImageNet weights, which
    # they would download: loading a model never reaches for the network.
    offline = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        offline["weights_backbone"] = None

    def build(**options) -> nn.Module:
        try:
            return torchvision.models.get_model(name, **offline, **options)
        except ValueError as error:
            raise ConfigError(f"cannot build torchvision:{name}: {error}") from error

    return build


def _timm_builder(name: str) -> Callable[..., nn.Module]:
    timm = _vision_library("timm")
    if not timm.is_model(name):
        raise ConfigError(f"timm has no model {name!r} (timm.list_models() lists them)")

    def build(**options) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=False, **options)
        except RuntimeError as error:
            raise ConfigError(f"cannot build timm:{name}: {error}") from error

    return build
