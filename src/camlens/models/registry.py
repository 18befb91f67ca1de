"""One registry of models and one way to build any of them: ``load_model(spec)``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from camlens.errors import ConfigError
from camlens.models.checkpoints import (
    StateDict,
    checkpoint_classes,
    count_classes,
    load_model_file,
    load_weights,
    read_state_dict,
    replace_output_layer,
)
from camlens.models.classifier import Classifier
from camlens.models.efficientnet_lite import efficientnet_lite0
from camlens.models.labels import check_label_count, read_labels
from camlens.outputs import OutputSpec

DEFAULT_MODEL = "efficientnet_lite0"

_REGISTRY: dict[str, Callable[[], Classifier]] = {"efficientnet_lite0": efficientnet_lite0}

Spec = str | os.PathLike | nn.Module | Classifier
Labels = Sequence[str] | str | os.PathLike


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
    spec: Spec = DEFAULT_MODEL,
    *,
    weights: str | os.PathLike | None = None,
    labels: Labels | None = None,
    trust_model: bool = False,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    input_size: int | tuple[int, int] | None = None,
    output: OutputSpec = None,
) -> Classifier:
    """Build a ``Classifier`` from a spec.

    Parameters:
        spec: one of
            - a built-in name (default ``"efficientnet_lite0"``, ImageNet-pretrained, offline);
            - ``"torchvision:<name>"`` or ``"timm:<name>"``: that architecture, with random
              weights unless ``weights`` is given;
            - a folder written by ``camlens train`` (it holds ``config.json``);
            - a model file: TorchScript (``torch.jit.save``), or a whole module saved with
              ``torch.save(model)``, which needs ``trust_model=True``;
            - an ``nn.Module`` (wrapped with ImageNet normalisation) or a ``Classifier``.
        weights: a state dict file (``.safetensors``, ``.pt``/``.pth`` from
            ``torch.save(model.state_dict())``, or TorchScript) for a named architecture, the
            built-in model or a module. The number of classes is read from the file's final
            linear layer and the architecture is built with that many outputs.
        labels: class names, as a list or a file (see ``read_labels``: text, one per line, or
            JSON). Default: the model's own names, else the class indices ``"0"``, ``"1"``...
        trust_model: allow loading files that run code when read (pickled modules). Only for
            files from a source you trust: such code can do anything your account can.
        num_classes: number of outputs for a named architecture (default: from ``weights``,
            else the architecture's default, 1000 for ImageNet models).
        device: where to put the model (``"cpu"``, ``"cuda"``...).
        input_size: the size ``preprocess`` resizes to, as ``S`` or ``(H, W)``.
        output: how to select the logits when the module returns a tuple or dict.

    Returns:
        A ``Classifier`` with ``.module`` in eval mode, ``.preprocess`` and ``.labels``.

    Raises:
        ConfigError: an unknown name, a file or folder that cannot be loaded, weights that do
            not fit the architecture, a label count different from the number of classes, or
            a file that needs ``trust_model=True``.

    Example:
        >>> model = load_model()                      # EfficientNet-Lite0, ImageNet
        >>> model = load_model("torchvision:resnet18", weights="fine_tuned.safetensors",
        ...                    labels="classes.txt")
        >>> model = load_model(my_cnn, labels=["cat", "dog"])
    """
    classifier = _build(spec, weights, num_classes, trust_model)
    if weights is not None:
        classifier.info["weights"] = str(weights)
    n_classes = count_classes(classifier.module)
    if labels is not None:
        names = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else list(labels)
        source = f"labels file {labels}" if isinstance(labels, (str, os.PathLike)) else "labels"
        check_label_count(names, n_classes, source)
        classifier.labels = names
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        classifier.input_size = size
    if output is not None:
        classifier.output = output
    if device is not None:
        classifier.module.to(device)
    if not classifier.labels:
        classifier.labels = [str(i) for i in range(n_classes)] if n_classes else []
    classifier.module.eval()
    return classifier


def _build(
    spec: Spec, weights: str | os.PathLike | None, num_classes: int | None, trust_model: bool
) -> Classifier:
    if isinstance(spec, (str, os.PathLike)) and _is_saved_model(spec):
        if weights is not None or num_classes is not None:
            raise ConfigError(
                f"{spec} is a saved model with its own weights and classes; weights= and "
                "num_classes= (--weights) apply to architectures named by --model, such "
                "as torchvision:resnet18"
            )
        path = Path(spec).expanduser()
        return _from_folder(path) if path.is_dir() else _from_file(path, trust_model)
    state = read_state_dict(weights, trust_model=trust_model) if weights is not None else None
    if isinstance(spec, (Classifier, nn.Module)):
        return _from_module(spec, state, num_classes)
    if isinstance(spec, (str, os.PathLike)):
        return _from_name(str(spec).strip(), state, num_classes)
    raise ConfigError(f"cannot load a model from {type(spec).__name__}; see load_model")


def _is_saved_model(spec: str | os.PathLike) -> bool:
    """A file or folder, unless the text names a registry model or a torchvision/timm one."""
    text = str(spec).strip()
    prefix, _, name = text.partition(":")
    if text in _REGISTRY or (prefix in ("torchvision", "timm") and name):
        return False
    path = Path(spec).expanduser()
    return path.is_dir() or path.is_file()


def _from_module(
    spec: Classifier | nn.Module, state: StateDict | None, num_classes: int | None
) -> Classifier:
    if num_classes is not None:
        raise ConfigError(
            "num_classes applies to architectures built by name; a module has its own head"
        )
    if isinstance(spec, Classifier):
        classifier = spec
    else:
        classifier = Classifier(module=spec, labels=[], name=type(spec).__name__)
    if state is not None:
        load_weights(classifier.module, state, source=classifier.name)
    return classifier


def _from_name(text: str, state: StateDict | None, num_classes: int | None) -> Classifier:
    prefix, _, name = text.partition(":")
    if prefix == "torchvision" and name:
        return _torchvision(name, state, num_classes)
    if prefix == "timm" and name:
        return _timm(name, state, num_classes)
    if text in _REGISTRY:
        return _builtin(text, state, num_classes)
    raise ConfigError(
        f"unknown model {text!r}: not a built-in name, not torchvision:<name> or "
        f"timm:<name>, and no such file or folder. Available: "
        f"{', '.join(available_models())}, a folder written by `camlens train`, a "
        "TorchScript file (or an nn.Module in Python)"
    )


def _builtin(name: str, state: StateDict | None, num_classes: int | None) -> Classifier:
    classifier = _REGISTRY[name]()
    wanted = _classes_wanted(state, num_classes, lambda: classifier.module, name)
    if wanted is not None and wanted != count_classes(classifier.module):
        replace_output_layer(classifier.module, wanted)
        classifier.labels = []  # the built-in names belong to the original classes
    if state is not None:
        load_weights(classifier.module, state, source=f"the built-in {name}")
    return classifier


def _torchvision(name: str, state: StateDict | None, num_classes: int | None) -> Classifier:
    try:
        import torchvision
    except ImportError as error:
        raise ConfigError(
            "torchvision models need the 'vision' extra: pip install 'camlens[vision]'"
        ) from error

    def build(**options) -> nn.Module:
        try:
            return torchvision.models.get_model(name, weights=None, **options)
        except ValueError as error:
            raise ConfigError(f"torchvision has no model {name!r}: {error}") from error

    module = _architecture(build, state, num_classes, f"torchvision:{name}")
    return Classifier(module=module.eval(), labels=[], name=f"torchvision:{name}")


def _timm(name: str, state: StateDict | None, num_classes: int | None) -> Classifier:
    try:
        import timm
    except ImportError as error:
        raise ConfigError(
            "timm models need the 'vision' extra: pip install 'camlens[vision]'"
        ) from error

    def build(**options) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=False, **options)
        except RuntimeError as error:
            raise ConfigError(f"timm has no model {name!r}: {error}") from error

    module = _architecture(build, state, num_classes, f"timm:{name}")
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


def _architecture(
    build: Callable[..., nn.Module], state: StateDict | None, num_classes: int | None, name: str
) -> nn.Module:
    """Build ``name`` with as many outputs as the weights have (or ``num_classes``), load them."""
    wanted = _classes_wanted(state, num_classes, build, name)
    module = build(num_classes=wanted) if wanted is not None else build()
    if state is not None:
        load_weights(module, state, source=name)
    return module


def _classes_wanted(
    state: StateDict | None,
    num_classes: int | None,
    build: Callable[[], nn.Module],
    name: str,
) -> int | None:
    from_weights = checkpoint_classes(state, build) if state is not None else None
    if num_classes is not None and from_weights is not None and num_classes != from_weights:
        raise ConfigError(
            f"num_classes={num_classes} but the weights for {name} have {from_weights} classes"
        )
    return from_weights if from_weights is not None else num_classes


def _from_file(path: Path, trust_model: bool) -> Classifier:
    module = load_model_file(path, trust_model=trust_model)
    kind = "torchscript" if isinstance(module, torch.jit.ScriptModule) else "pickled module"
    return Classifier(module=module.eval(), labels=[], name=str(path), info={"format": kind})


def _from_folder(path: Path) -> Classifier:
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} is a folder without config.json, so it is not a camlens model folder. "
            "Accepted: a folder written by `camlens train`; a TorchScript file; or an "
            "architecture with a weights file, e.g. --model torchvision:resnet18 "
            "--weights model.safetensors"
        )
    try:
        from camlens.models.trained import load_trained
    except ModuleNotFoundError as error:
        if error.name != "camlens.models.trained":
            raise
        raise ConfigError(
            f"{path} looks like a camlens train output (it holds config.json), but this "
            "version of camlens cannot load trained models yet"
        ) from error
    return load_trained(path)
