"""Hugging Face ``transformers`` image classifiers from a local folder: ``load_model("hf:DIR")``.

The folder is what ``model.save_pretrained(DIR)`` writes (and what a model page on the Hub
holds): ``config.json`` (the architecture, ``id2label``) and ``model.safetensors`` (the
weights; a sharded ``model.safetensors.index.json`` works too), plus, when the model comes
with one, ``preprocessor_config.json`` (what ``image_processor.save_pretrained(DIR)`` writes:
the input size and the normalisation). Nothing is downloaded, ever (``local_files_only``), no
code from the folder runs (no ``trust_remote_code``), and pickled ``pytorch_model.bin``
weights are refused: safetensors only.

Every architecture of ``transformers``' ``AutoModelForImageClassification`` loads (ViT, DeiT,
Swin, ConvNeXt, ResNet, BEiT, EfficientNet, ...): the logits are the ``logits`` field of the
model's output object, the labels its ``config.id2label`` in class-index order. The
``Classifier`` is adapted to how camlens finds maps in it:

* CNNs (ResNet: average pooling + linear, CAM exact; ConvNeXt: a LayerNorm after the pooling,
  so CAM is refused and Grad-CAM works) need nothing more.
* ViT and DeiT classify from the class token, so their feature layer is the input of the last
  block's attention, the last block's ``layernorm_before`` (``vit.layers.<last>.
  layernorm_before`` in transformers 5, ``vit.encoder.layer.<last>.layernorm_before`` in 4;
  the practice of pytorch-grad-cam's ViT tutorial): ``Classifier.layer`` names it.
* ViT, DeiT and Swin output tokens (N, T, C). The module gets timm's declarations so that
  ``camlens.tokens`` reads the token grid without guessing: ``num_prefix_tokens`` (1 for ViT:
  CLS; 2 for DeiT: CLS and distillation; 0 for Swin) and, for ViT and DeiT, ``patch_size``.

Needs the ``hf`` extra: ``pip install 'camlens[hf]'`` (``transformers`` is imported only when
such a model is loaded).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from safetensors import SafetensorError
from torch import nn

from camlens.errors import ConfigError
from camlens.models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier

#: The prefix of a ``load_model`` spec naming a Hugging Face model folder.
PREFIX = "hf:"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

#: Input size when neither ``preprocessor_config.json`` nor ``config.json`` gives one.
DEFAULT_SIZE = 224

#: Models whose head reads the class token: the name of the last block's first norm (the
#: input of its attention), the prefix tokens before the patch tokens.
_CLASS_TOKEN_MODELS = {"vit": ("layernorm_before", 1), "deit": ("layernorm_before", 2)}
#: Models whose tokens are all patch tokens (their stages downsample: no single patch size).
_PATCH_TOKEN_MODELS = ("swin", "swinv2")

_INSTALL = "pip install 'camlens[hf]'"


def is_huggingface_spec(spec: str) -> bool:
    """Whether ``spec`` is ``"hf:<folder>"``.

    Example:
        >>> is_huggingface_spec("hf:models/vit"), is_huggingface_spec("timm:vit_small")
        (True, False)
    """
    return spec.startswith(PREFIX)


def looks_like_huggingface_folder(folder: str | Path) -> bool:
    """Whether ``folder/config.json`` is a ``transformers`` config (it has ``model_type``), so
    that a message can suggest ``hf:<folder>``."""
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def load_huggingface(spec: str | Path, *, random_weights: bool = False) -> Classifier:
    """Load a ``transformers`` image classifier saved in a local folder.

    Parameters:
        spec: ``"hf:<folder>"`` or the folder itself. The folder holds ``config.json`` and
            ``model.safetensors`` (``save_pretrained``); ``preprocessor_config.json`` is read
            when present.
        random_weights: allow a folder without weights (the network built from ``config.json``
            with random weights; for tests only).

    Returns:
        A ``Classifier`` in eval mode (float32, on the CPU) whose
        - ``labels`` are ``config.id2label`` in class-index order;
        - ``output`` is ``"logits"`` (the field of the model's output object);
        - ``input_size``, ``mean`` and ``std`` come from ``preprocessor_config.json``: its
          ``crop_size`` when it centre-crops, else its ``size`` (``{"height", "width"}``, or
          ``{"shortest_edge": S}`` read as S x S: camlens resizes the whole image, no crop),
          ``image_mean`` and ``image_std``, with its ``do_rescale``/``rescale_factor`` and
          ``do_normalize`` folded into them. Without that file: ``config.json``'s
          ``image_size`` (else 224) and the ImageNet mean and standard deviation, which most
          Hugging Face image classifiers use (ResNet, ConvNeXt, Swin, DeiT; Google's ViT
          checkpoints use 0.5 and 0.5: keep their ``preprocessor_config.json`` with them).
          ``info["preprocessing"]`` says which was used.
        - ``layer`` is the last block's ``layernorm_before`` for ViT and DeiT (see the module
          docstring), else None (found automatically);
        - ``multilabel`` is True when ``config.problem_type`` is
          ``"multi_label_classification"`` (sigmoid outputs; see ``Classifier.multilabel``).

    Raises:
        ConfigError: ``transformers`` is not installed; the folder, its ``config.json`` or its
            weights are missing or unreadable; the config is not an image classifier or needs
            code from the folder; the weights do not fit the config (the message says what to
            do in each case).

    Example:
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        ...                       id2label={0: "cat", 1: "dog"})
        >>> ResNetForImageClassification(config).save_pretrained("hf_resnet")
        >>> model = load_huggingface("hf:hf_resnet")
        >>> model.labels, model.input_size, model.output
        (['cat', 'dog'], (224, 224), 'logits')
    """
    text = str(spec).strip()
    where = text[len(PREFIX) :].strip() if is_huggingface_spec(text) else text
    if not where:
        raise ConfigError(
            f"{text!r} names no folder; pass hf:FOLDER with the folder that "
            "model.save_pretrained(FOLDER) wrote"
        )
    folder = Path(where).expanduser()
    _check_folder(folder)
    raw = _read_json(folder / CONFIG_FILE, "its model configuration")
    transformers = _transformers()
    model_class = _model_class(transformers, raw, folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"cannot read the Hugging Face config {folder / CONFIG_FILE}: {error}. Write it "
            "again with model.config.save_pretrained(folder)"
        ) from error
    weights = _weights_file(folder)
    if weights is None and not random_weights:
        raise ConfigError(_missing_weights_message(folder))
    if weights is not None:
        module = _pretrained(model_class, folder, weights)
    elif model_class is transformers.AutoModelForImageClassification:
        module = model_class.from_config(config)
    else:
        module = model_class(config)
    module = module.float().eval()
    model_type = str(raw.get("model_type"))
    _declare_tokens(module, config, model_type)
    size, mean, std, source = _preprocessing(folder, config)
    return Classifier(
        module=module,
        labels=_labels(config, folder),
        input_size=size,
        mean=mean,
        std=std,
        name=f"{PREFIX}{folder}",
        output="logits",
        layer=_default_layer(module, model_type),
        multilabel=getattr(config, "problem_type", None) == "multi_label_classification",
        info={
            "format": "huggingface",
            "architecture": type(module).__name__,
            "model_type": model_type,
            "preprocessing": source,
        },
    )


# ------------------------------------------------------------------------------ checks


def _transformers() -> ModuleType:
    try:
        return importlib.import_module("transformers")
    except ImportError as error:
        raise ConfigError(
            f"Hugging Face models (--model hf:FOLDER) need the 'hf' extra ({error.name or error} "
            f"is missing): {_INSTALL}"
        ) from error


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise ConfigError(
            f"Hugging Face model folder {folder} does not exist; pass hf:FOLDER with the folder "
            "that model.save_pretrained(FOLDER) wrote (config.json and model.safetensors). "
            "camlens downloads nothing: get a Hub model into a folder first, e.g. "
            "huggingface-cli download NAME --local-dir FOLDER"
        )
    if not folder.is_dir():
        raise ConfigError(
            f"{folder} is not a folder; hf:FOLDER needs the folder that "
            "model.save_pretrained(FOLDER) wrote (config.json and model.safetensors)"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{folder} has no {CONFIG_FILE}, so it is not a Hugging Face model folder; save the "
            "model with model.save_pretrained(FOLDER), which writes config.json and "
            "model.safetensors"
        )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"cannot read {path} ({what}): {error}") from error
    if not isinstance(content, dict):
        raise ConfigError(f"{path} ({what}) must hold a JSON object, not {type(content).__name__}")
    return content


def _classifier_names(transformers: ModuleType) -> dict[str, tuple[str, ...]]:
    """model_type -> the ``...ForImageClassification`` class names transformers has for it."""
    from transformers.models.auto.modeling_auto import (  # the registry AutoModel... uses
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names,
    )

    return {
        key: (value,) if isinstance(value, str) else tuple(value) for key, value in names.items()
    }


def _model_class(transformers: ModuleType, raw: dict[str, Any], folder: Path) -> type[nn.Module]:
    """The class to build: ``config.json``'s ``architectures`` entry when it is an image
    classifier of its ``model_type`` (DeiT's "with teacher" head), else
    ``AutoModelForImageClassification``'s choice for the ``model_type``."""
    path = folder / CONFIG_FILE
    if "auto_map" in raw:
        raise ConfigError(
            f"{path} names custom code (auto_map: {sorted(raw['auto_map'])}); camlens never runs "
            "code from a model folder. Use a model whose architecture transformers itself "
            "provides"
        )
    model_type = raw.get("model_type")
    classifiers = _classifier_names(transformers)
    declared = [str(name) for name in raw.get("architectures") or []]
    if model_type not in classifiers:
        what = f" ({', '.join(declared)})" if declared else ""
        raise ConfigError(
            f"{path} describes a model of type {model_type!r}{what}, which transformers' "
            "AutoModelForImageClassification does not build: not an image classifier. "
            f"Image classifier types: {', '.join(sorted(classifiers))}"
        )
    own = classifiers[model_type]
    if declared and not any(name in own for name in declared):
        raise ConfigError(
            f"{path} describes a {', '.join(declared)}, not an image classifier (for "
            f"{model_type!r}: {', '.join(own)}); save a model with a classification head, e.g. "
            f"{own[0]}.from_pretrained(...) fine-tuned, then save_pretrained(FOLDER)"
        )
    name = next((n for n in declared if n in own), None)
    found = getattr(transformers, name, None) if name is not None else None
    return found if found is not None else transformers.AutoModelForImageClassification


def _weights_file(folder: Path) -> Path | None:
    return next((folder / n for n in WEIGHTS_FILES if (folder / n).is_file()), None)


def _missing_weights_message(folder: Path) -> str:
    pickled = [n for n in PICKLED_WEIGHTS if (folder / n).is_file()]
    if pickled:
        return (
            f"{folder} holds {pickled[0]}, pickled weights that can run code when loaded; "
            "camlens reads safetensors only. Convert them once where you trust the file: "
            "model = AutoModelForImageClassification.from_pretrained(FOLDER); "
            "model.save_pretrained(FOLDER, safe_serialization=True)"
        )
    return (
        f"{folder} has no weights ({' or '.join(WEIGHTS_FILES)}); save the model with "
        "model.save_pretrained(FOLDER). For tests only, random_weights=True "
        "(--random-weights) builds the network from config.json with random weights"
    )


def _pretrained(model_class: Any, folder: Path, weights: Path) -> nn.Module:
    """``model_class.from_pretrained`` of the local folder: safetensors only, no Hub, no code;
    weights that leave parameters uninitialised are refused."""
    options: dict[str, Any] = {
        "local_files_only": True,
        "use_safetensors": True,
        "trust_remote_code": False,
        "output_loading_info": True,
    }
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar on every load
    try:
        module, loading = model_class.from_pretrained(folder, **options)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as error:
        raise ConfigError(
            f"cannot load the Hugging Face model in {folder} from {weights.name}: {error}. "
            "The file is damaged or does not fit config.json: save the model and its config "
            "together again with model.save_pretrained(FOLDER)"
        ) from error
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = list(loading.get("missing_keys") or [])
    mismatched = [str(item[0]) for item in loading.get("mismatched_keys") or []]
    if missing or mismatched:
        problems = missing[:5] + mismatched[:5]
        raise ConfigError(
            f"{folder / weights.name} does not hold every weight of the "
            f"{type(module).__name__} that {CONFIG_FILE} describes (missing or of another "
            f"shape: {', '.join(problems)}{' ...' if len(missing) + len(mismatched) > 5 else ''}"
            "), so part of the network would have random weights; save the model and its config "
            "together with model.save_pretrained(FOLDER)"
        )
    return module


# ---------------------------------------------------------------------------- adaptation


def _labels(config: Any, folder: Path) -> list[str]:
    id2label = {int(key): str(name) for key, name in (config.id2label or {}).items()}
    count = int(config.num_labels)
    if sorted(id2label) != list(range(count)):
        raise ConfigError(
            f"{folder / CONFIG_FILE}: id2label must name classes 0..{count - 1} (num_labels "
            f"{count}), each once; it has {sorted(id2label)[:10]}. Fix id2label or pass "
            "labels= (--labels FILE)"
        )
    return [id2label[i] for i in range(count)]


def _declare_tokens(module: nn.Module, config: Any, model_type: str) -> None:
    """timm's ``num_prefix_tokens`` and ``patch_size`` on the module, read by
    ``camlens.tokens`` to split a transformer's tokens into prefix tokens and a grid."""
    if model_type in _CLASS_TOKEN_MODELS:
        module.num_prefix_tokens = _CLASS_TOKEN_MODELS[model_type][1]
        patch = config.patch_size
        module.patch_size = tuple(patch) if isinstance(patch, list | tuple) else (patch, patch)
    elif model_type in _PATCH_TOKEN_MODELS:
        module.num_prefix_tokens = 0


def _default_layer(module: nn.Module, model_type: str) -> str | None:
    """The last block's first norm of a class-token ViT/DeiT, else None: the last module
    called ``layernorm_before`` (``vit.layers.11.layernorm_before`` in transformers 5,
    ``vit.encoder.layer.11.layernorm_before`` before)."""
    if model_type not in _CLASS_TOKEN_MODELS:
        return None
    norm = _CLASS_TOKEN_MODELS[model_type][0]
    names = [name for name, _ in module.named_modules() if name.rsplit(".", 1)[-1] == norm]
    return names[-1] if names else None


def _preprocessing(
    folder: Path, config: Any
) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...], str]:
    """(input size, mean, std, where they came from) for ``Classifier``."""
    channels = int(getattr(config, "num_channels", 3) or 3)
    if channels != 3:
        raise ConfigError(
            f"{folder / CONFIG_FILE}: the model takes {channels}-channel images "
            "(num_channels); camlens feeds it RGB images, 3 channels"
        )
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        side = getattr(config, "image_size", None)
        size = _size(side, folder / CONFIG_FILE) if side is not None else (DEFAULT_SIZE,) * 2
        return size, IMAGENET_MEAN, IMAGENET_STD, f"{CONFIG_FILE} and ImageNet defaults"
    processor = _read_json(path, "its image preprocessing")
    cropped = processor.get("do_center_crop") and processor.get("crop_size") is not None
    given = processor.get("crop_size") if cropped else processor.get("size")
    if given is None:
        given = getattr(config, "image_size", None) or DEFAULT_SIZE
    size = _size(given, path)
    if processor.get("do_normalize", True):
        mean = _per_channel(
            processor.get("image_mean", IMAGENET_MEAN), channels, "image_mean", path
        )
        std = _per_channel(processor.get("image_std", IMAGENET_STD), channels, "image_std", path)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    # camlens scales pixels by 1/255; the model wants x * factor (x itself without rescaling):
    # (x * f - m) / s == (x / 255 - m / (255 f)) / (s / (255 f)).
    factor = (
        float(processor.get("rescale_factor", 1 / 255))
        if processor.get("do_rescale", True)
        else 1.0
    )
    scale = 255.0 * factor
    if not scale > 0 or any(s == 0 for s in std):
        raise ConfigError(f"{path}: rescale_factor and image_std must be non-zero")
    return (
        size,
        tuple(m / scale for m in mean),
        tuple(s / scale for s in std),
        PREPROCESSOR_FILE,
    )


def _size(value: Any, path: Path) -> tuple[int, int]:
    """An image processor's size: ``S``, ``[H, W]``, ``{"height", "width"}``,
    ``{"shortest_edge": S}`` (or ``longest_edge``) read as S x S."""
    if isinstance(value, int) and value > 0:
        return (value, value)
    if isinstance(value, list | tuple) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        for key in ("shortest_edge", "longest_edge"):
            if isinstance(value.get(key), int):
                return (value[key], value[key])
    raise ConfigError(
        f"{path}: cannot read an input size from {value!r}; expected S, [H, W], "
        '{"height": H, "width": W} or {"shortest_edge": S}. Pass input_size= (--input-size)'
    )


def _per_channel(value: Any, channels: int, key: str, path: Path) -> tuple[float, ...]:
    values = [value] * channels if isinstance(value, int | float) else list(value)
    if len(values) != channels or not all(isinstance(v, int | float) for v in values):
        raise ConfigError(f"{path}: {key} must be {channels} numbers, got {value!r}")
    return tuple(float(v) for v in values)
