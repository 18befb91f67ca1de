"""One registry of models and one way to build any of them: ``load_model(spec)``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from camlens.defaults import DEFAULT_MODEL
from camlens.errors import ConfigError
from camlens.models import trained
from camlens.models.architectures import (
    architecture_names,
    build_architecture,
    is_builtin,
    is_library_architecture,
    library_classifier,
    module_builder,
    set_num_classes,
)
from camlens.models.checkpoints import (
    StateDict,
    checkpoint_classes,
    count_classes,
    load_model_file,
    load_weights,
    read_state_dict,
)
from camlens.models.classifier import Classifier, check_threshold_prob
from camlens.models.dense import (
    dense_architecture_task,
    dense_checkpoint_classes,
    resize_detector_input,
)
from camlens.models.devices import check_device
from camlens.models.huggingface import (
    is_huggingface_spec,
    load_huggingface,
    looks_like_huggingface_folder,
)
from camlens.models.labels import check_label_count, read_labels
from camlens.models.outputs import OutputSpec

Spec = str | os.PathLike | nn.Module | Classifier
Labels = Sequence[str] | str | os.PathLike


def available_models() -> list[str]:
    """Names of the built-in registry, plus the prefixes that build other architectures."""
    return architecture_names()


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
    random_weights: bool = False,
    multilabel: bool | None = None,
    threshold_prob: float | None = None,
) -> Classifier:
    """Build a ``Classifier`` from a spec.

    Parameters:
        spec: one of
            - a built-in name (default ``"efficientnet_lite0"``, ImageNet-pretrained, offline);
            - ``"torchvision:<name>"`` or ``"timm:<name>"``: that architecture, with the
              ``weights`` given (nothing is downloaded; without weights it is refused unless
              ``random_weights=True``);
            - a folder written by ``camlens train`` (it holds ``config.json``);
            - ``"hf:<folder>"``: a Hugging Face ``transformers`` image classifier saved with
              ``save_pretrained`` (``config.json`` + ``model.safetensors``; labels from
              ``id2label``, preprocessing from ``preprocessor_config.json``; see
              ``camlens.models.huggingface``; needs ``pip install 'camlens[hf]'``);
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
        input_size: the size ``preprocess`` resizes to, as ``S`` or ``(H, W)``; a torchvision
            detector's own resizing (``transform.min_size``, ``max_size``) is set to it too,
            so that the image is not resized twice.
        output: how to select the logits when the module returns a tuple or dict.
        random_weights: allow a network with random weights: a torchvision or timm
            architecture without ``weights``, an ``hf:`` folder without weights, or the
            built-in model with another
            ``num_classes`` and no weights. Its predictions and maps mean nothing; for tests
            and sanity checks only (command line: ``--random-weights``).
        multilabel: the model's classes are independent (sigmoid outputs): probabilities are
            per-class sigmoids, predictions every class at or above ``threshold_prob``, and
            the target ``"positive"`` explains each of them (command line: ``--multilabel``).
            Default: what a ``camlens train`` folder records (trained with ``--multilabel``),
            else False (softmax).
        threshold_prob: the sigmoid probability a multi-label class needs to be predicted
            (default 0.5; command line: ``--threshold-prob``).

    Returns:
        A ``Classifier`` with ``.module`` in eval mode, ``.preprocess`` and ``.labels``.

    Raises:
        ConfigError: an unknown name, a file or folder that cannot be loaded, weights that do
            not fit the architecture, a label count different from the number of classes, a
            file that needs ``trust_model=True``, or a network that would have random weights
            (without ``random_weights=True``).

    Example:
        >>> model = load_model()                      # EfficientNet-Lite0, ImageNet
        >>> model.labels[285], model.input_size
        ('Egyptian cat', (224, 224))
        >>> import torchvision
        >>> from safetensors.torch import save_file
        >>> save_file(torchvision.models.resnet18(num_classes=2).state_dict(),
        ...           "fine_tuned.safetensors")  # your own fine-tuned weights
        >>> _ = Path("classes.txt").write_text("cat\\ndog\\n")
        >>> model = load_model("torchvision:resnet18", weights="fine_tuned.safetensors",
        ...                    labels="classes.txt")
        >>> model.name, model.labels
        ('torchvision:resnet18', ['cat', 'dog'])
        >>> my_cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                        nn.Flatten(), nn.Linear(8, 2))
        >>> model = load_model(my_cnn, labels=["cat", "dog"])
        >>> model.module is my_cnn, my_cnn.training  # your module, as it was (methods switch
        ...                                          # it to eval mode for each call only)
        (True, True)
        >>> load_model(my_cnn, multilabel=True).probabilities(torch.zeros(1, 2))  # sigmoid
        tensor([[0.5000, 0.5000]])
        >>> load_model("runs/shapes").labels  # a folder written by camlens train
        ['circle', 'square', 'triangle']
        >>> untrained = load_model("torchvision:resnet18", random_weights=True)  # a baseline
    """
    classifier = _build(spec, weights, num_classes, trust_model, random_weights)
    if weights is not None:
        classifier.info["weights"] = str(weights)
    n_classes = classifier.info.get("num_classes") or count_classes(classifier.module)
    if labels is not None:
        names = read_labels(labels) if isinstance(labels, (str, os.PathLike)) else list(labels)
        source = f"labels file {labels}" if isinstance(labels, (str, os.PathLike)) else "labels"
        check_label_count(names, n_classes, source)
        classifier.labels = names
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        classifier.input_size = size
        resize_detector_input(classifier.module, size)
    if output is not None:
        classifier.output = output
    if multilabel is not None:
        classifier.multilabel = bool(multilabel)
    if threshold_prob is not None:
        classifier.threshold_prob = check_threshold_prob(threshold_prob)
    if device is not None:
        classifier.module.to(check_device(device))
    if not classifier.labels:
        classifier.labels = [str(i) for i in range(n_classes)] if n_classes else []
    if not isinstance(spec, (Classifier, nn.Module)):
        classifier.module.eval()  # a model camlens built; the caller's own module is untouched
    return classifier


def _build(
    spec: Spec,
    weights: str | os.PathLike | None,
    num_classes: int | None,
    trust_model: bool,
    random_weights: bool,
) -> Classifier:
    if isinstance(spec, str) and is_huggingface_spec(spec.strip()):
        if weights is not None or num_classes is not None:
            raise ConfigError(
                f"{spec} is a Hugging Face model folder with its own weights and classes; "
                "weights= and num_classes= (--weights) do not apply to it: save the model you "
                "want with model.save_pretrained(FOLDER) and pass hf:FOLDER"
            )
        return load_huggingface(spec.strip(), random_weights=random_weights)
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
        return _from_name(str(spec).strip(), state, num_classes, random_weights)
    raise ConfigError(f"cannot load a model from {type(spec).__name__}; see load_model")


def _is_saved_model(spec: str | os.PathLike) -> bool:
    """A file or folder, unless the text names a registry model or a torchvision/timm one."""
    text = str(spec).strip()
    if is_builtin(text) or is_library_architecture(text):
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


def _from_name(
    text: str, state: StateDict | None, num_classes: int | None, random_weights: bool
) -> Classifier:
    if is_library_architecture(text):
        return _library(text, state, num_classes, random_weights)
    if is_builtin(text):
        return _builtin(text, state, num_classes, random_weights)
    raise ConfigError(
        f"unknown model {text!r}: not a built-in name, not torchvision:<name> or "
        f"timm:<name>, and no such file or folder. Available: "
        f"{', '.join(available_models())}, a folder written by `camlens train`, "
        "hf:<folder> (a Hugging Face model saved with save_pretrained), a TorchScript file "
        "(or an nn.Module in Python)"
    )


def _builtin(
    name: str, state: StateDict | None, num_classes: int | None, random_weights: bool
) -> Classifier:
    classifier = build_architecture(name, pretrained=True)
    wanted = _classes_wanted(state, num_classes, lambda: classifier.module, name)
    own = count_classes(classifier.module)
    if state is None and wanted not in (None, own) and not random_weights:
        raise ConfigError(
            _random_weights_message(
                f"{name} with {wanted} classes instead of its {own} and no weights file would "
                "have random weights in its new output layer"
            )
        )
    if wanted is not None:
        set_num_classes(classifier, wanted)
    if state is not None:
        load_weights(classifier.module, state, source=f"the built-in {name}")
    return classifier


def _library(
    spec: str, state: StateDict | None, num_classes: int | None, random_weights: bool
) -> Classifier:
    """A torchvision or timm architecture with as many outputs as the weights have, loaded."""
    build = module_builder(spec)  # checks the name first
    if state is None and not random_weights:
        raise ConfigError(
            _random_weights_message(
                f"{spec} has no weights of its own (camlens downloads nothing), so without a "
                "weights file the network would have random weights"
            )
        )
    task = dense_architecture_task(spec)
    if task is None:
        wanted = _classes_wanted(state, num_classes, build, spec)
    else:
        wanted = _dense_classes_wanted(state, num_classes, build, spec, task)
    module = build(num_classes=wanted) if wanted is not None else build()
    if state is not None:
        load_weights(module, state, source=spec)
    return library_classifier(spec, module)


def _dense_classes_wanted(
    state: StateDict | None,
    num_classes: int | None,
    build: Callable[[], nn.Module],
    spec: str,
    task: str,
) -> int | None:
    """The classes of a torchvision detector or segmenter: from its weights (their class
    layers, ``dense_checkpoint_classes``), else ``num_classes``."""
    if state is None:
        return num_classes
    with torch.device("meta"):
        probe = build()
    from_weights = dense_checkpoint_classes(state, probe, task)
    if num_classes is not None and from_weights not in (None, num_classes):
        raise ConfigError(
            f"num_classes={num_classes} but the weights for {spec} have {from_weights} classes"
        )
    return from_weights if from_weights is not None else num_classes


def _random_weights_message(problem: str) -> str:
    """The refusal of a network with random weights: ``problem``, then the ways out."""
    return (
        f"{problem}: its predictions and maps would mean nothing. Pass the weights it was "
        "trained with: --weights FILE on the command line, weights='FILE' in Python "
        "(camlens.load_model). For tests and sanity checks, --random-weights (command line) "
        "or random_weights=True (Python: camlens.load_model) allows random weights."
    )


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
    if looks_like_huggingface_folder(path):
        raise ConfigError(
            f"{path} holds a Hugging Face transformers model (its config.json has a "
            f"model_type), not a folder written by `camlens train`; load it with "
            f"--model hf:{path} (Python: load_model('hf:{path}'))"
        )
    return trained.load_trained(path)
