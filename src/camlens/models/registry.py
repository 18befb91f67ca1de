"""One registry of models and one way to build any of them: ``load_model(spec)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.models.classifier import Classifier
from camlens.models.efficientnet_lite import efficientnet_lite0
from camlens.outputs import OutputSpec

DEFAULT_MODEL = "efficientnet_lite0"

_REGISTRY: dict[str, Callable[[], Classifier]] = {"efficientnet_lite0": efficientnet_lite0}


def register_model(name: str) -> Callable[[Callable[[], Classifier]], Callable[[], Classifier]]:
    """Decorator: make ``load_model(name)`` call the decorated builder."""

    def decorate(builder: Callable[[], Classifier]) -> Callable[[], Classifier]:
        _REGISTRY[name] = builder
        return builder

    return decorate


def available_models() -> list[str]:
    """Names of the built-in registry, plus the prefixes that build other architectures."""
    return [*sorted(_REGISTRY), "torchvision:<name>", "timm:<name>"]


def load_model(
    spec: str | nn.Module | Classifier = DEFAULT_MODEL,
    *,
    labels: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    input_size: int | tuple[int, int] | None = None,
    output: OutputSpec = None,
) -> Classifier:
    """Build a ``Classifier`` from a spec.

    Parameters:
        spec: a built-in name (default ``"efficientnet_lite0"``, ImageNet-pretrained,
            offline), ``"torchvision:<name>"`` or ``"timm:<name>"`` (random weights), an
            ``nn.Module`` (wrapped with ImageNet normalisation), or a ``Classifier``.
        labels: class names (overrides the model's own).
        device: where to put the model (``"cpu"``, ``"cuda"``...).
        input_size: the size ``preprocess`` resizes to, as ``S`` or ``(H, W)``.
        output: how to select the logits when the module returns a tuple or dict.

    Returns:
        A ``Classifier`` with ``.module`` in eval mode, ``.preprocess`` and ``.labels``.

    Raises:
        ConfigError: an unknown name or a spec that cannot be built; the message lists the
            available names.

    Example:
        >>> model = load_model()                      # EfficientNet-Lite0, ImageNet
        >>> model = load_model(my_cnn, labels=["cat", "dog"])
    """
    if isinstance(spec, Classifier):
        classifier = spec
    elif isinstance(spec, nn.Module):
        classifier = Classifier(module=spec, labels=[], name=type(spec).__name__)
    elif isinstance(spec, str):
        classifier = _from_name(spec.strip())
    else:
        raise ConfigError(f"cannot load a model from {type(spec).__name__}; see load_model")
    if labels is not None:
        classifier.labels = list(labels)
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        classifier.input_size = size
    if output is not None:
        classifier.output = output
    if device is not None:
        classifier.module.to(device)
    if not classifier.labels:
        n = _num_classes(classifier.module)
        classifier.labels = [str(i) for i in range(n)] if n else []
    classifier.module.eval()
    return classifier


def _from_name(spec: str) -> Classifier:
    if spec in _REGISTRY:
        return _REGISTRY[spec]()
    prefix, _, name = spec.partition(":")
    if prefix == "torchvision" and name:
        return _torchvision(name)
    if prefix == "timm" and name:
        return _timm(name)
    raise ConfigError(
        f"unknown model {spec!r}; available: {', '.join(available_models())} "
        "(or pass an nn.Module in Python)"
    )


def _torchvision(name: str) -> Classifier:
    try:
        import torchvision
    except ImportError as error:
        raise ConfigError(
            "torchvision models need the 'vision' extra: pip install 'camlens[vision]'"
        ) from error
    try:
        module = torchvision.models.get_model(name, weights=None)
    except ValueError as error:
        raise ConfigError(f"torchvision has no model {name!r}: {error}") from error
    return Classifier(module=module.eval(), labels=[], name=f"torchvision:{name}")


def _timm(name: str) -> Classifier:
    try:
        import timm
    except ImportError as error:
        raise ConfigError(
            "timm models need the 'vision' extra: pip install 'camlens[vision]'"
        ) from error
    try:
        module = timm.create_model(name, pretrained=False)
    except RuntimeError as error:
        raise ConfigError(f"timm has no model {name!r}: {error}") from error
    config = getattr(module, "pretrained_cfg", {}) or {}
    size = tuple(config.get("input_size", (3, 224, 224))[1:])
    return Classifier(
        module=module.eval(),
        labels=[],
        input_size=size,
        mean=tuple(config.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(config.get("std", (0.229, 0.224, 0.225))),
        name=f"timm:{name}",
    )


def _num_classes(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
