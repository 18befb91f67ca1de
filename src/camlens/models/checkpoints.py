"""Read model files without running code from them: state dicts, TorchScript, pickled modules.

What each file kind holds and how camlens reads it:

- ``.safetensors``: tensors only, read with ``safetensors.torch.load_file``.
- ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` state dicts: read with
  ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
- TorchScript archives (``torch.jit.save``): compiled graphs plus tensors; ``torch.jit.load``
  does not unpickle Python objects, so no code from the file runs in Python.
- Anything else ``torch.save`` wrote (a whole ``nn.Module``, custom classes): reading it runs
  code named by the file. It is refused unless the caller passes ``trust_model=True``.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camlens.errors import ConfigError

StateDict = dict[str, torch.Tensor]

# Keys under which training scripts commonly nest the weights (Lightning, many repositories).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")

TORCHSCRIPT_NOT_HOOKABLE = (
    "{name} is a TorchScript model: its compiled code cannot be hooked, so camlens cannot "
    "read its feature maps. If you know its architecture, explain it with "
    "--model torchvision:<name> (or timm:<name>) --weights {path} (Python: "
    "load_model('torchvision:<name>', weights=...)): camlens reads the weights from the "
    "TorchScript file."
)


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (it holds ``code/`` and ``constants.pkl``).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                       nn.Linear(4, 2))
        >>> torch.jit.script(model).save("model.ts")
        >>> torch.save(model.state_dict(), "weights.pt")
        >>> is_torchscript("model.ts"), is_torchscript("weights.pt")
        (True, False)
    """
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        entries = {name.split("/")[1] for name in archive.namelist() if name.count("/") >= 1}
    return "constants.pkl" in entries and "code" in entries


def read_state_dict(path: str | os.PathLike, *, trust_model: bool = False) -> StateDict:
    """Read the weights (name -> tensor) stored in ``path``, on the CPU.

    Parameters:
        path: a ``.safetensors`` file, a ``torch.save``'d state dict (also nested under a key
            such as ``"state_dict"``, as training scripts often do), or a TorchScript archive.
        trust_model: allow files that can only be read by running code from them (a pickled
            module or custom classes). Only for files from a source you trust.

    Returns:
        A dict from parameter and buffer names to tensors.

    Raises:
        ConfigError: the file cannot be read, holds no tensors, or needs ``trust_model``.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=3)
        >>> torch.save({"epoch": 9, "state_dict": model.state_dict()}, "checkpoint.pt")
        >>> read_state_dict("checkpoint.pt")["fc.weight"].shape  # found under "state_dict"
        torch.Size([3, 512])
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if is_torchscript(path):
        return dict(_load_torchscript(path).state_dict())
    content = _torch_load(path, trust_model=trust_model)
    if isinstance(content, nn.Module):  # only reachable with trust_model=True
        return dict(content.state_dict())
    state = _find_state_dict(content)
    if state is None:
        raise ConfigError(
            f"{path} holds no state dict (a mapping from parameter names to tensors); "
            f"found {_describe(content)}. Save weights with torch.save(model.state_dict(), path)"
        )
    return state


def load_model_file(path: str | os.PathLike, *, trust_model: bool = False) -> nn.Module:
    """Load a whole model (architecture and weights) from one file.

    Parameters:
        path: a TorchScript archive, or (with ``trust_model=True``) a module saved with
            ``torch.save(model)``.
        trust_model: allow running code from the file (unpickling a saved module).

    Returns:
        The module, on the CPU.

    Raises:
        ConfigError: the file holds only weights (say which architecture they belong to with
            ``load_model("torchvision:<name>", weights=path)``), holds no model, or needs
            ``trust_model``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                       nn.Linear(4, 2))
        >>> torch.jit.script(model).save("model.ts")
        >>> load_model_file("model.ts")(torch.zeros(1, 3, 8, 8)).shape
        torch.Size([1, 2])
        >>> torch.save(model, "whole.pt")  # a pickled module: reading it runs code
        >>> load_model_file("whole.pt")
        Traceback (most recent call last):
        camlens.errors.ConfigError: whole.pt holds pickled Python objects ...
        >>> type(load_model_file("whole.pt", trust_model=True)).__name__
        'Sequential'
    """
    path = Path(path)
    if is_torchscript(path):
        return _load_torchscript(path)
    if path.suffix == ".safetensors":
        raise ConfigError(_weights_only_message(path, _read_safetensors(path)))
    content = _torch_load(path, trust_model=trust_model)
    if isinstance(content, nn.Module):
        return content
    state = _find_state_dict(content)
    if state is not None:
        raise ConfigError(_weights_only_message(path, state))
    raise ConfigError(f"{path} holds no model; found {_describe(content)}")


def output_layer(module: nn.Module) -> str | None:
    """Qualified name of the last linear layer (the classifier of most CNNs), or None."""
    names = [name for name, sub in module.named_modules() if _is_linear(sub)]
    return names[-1] if names else None


def count_classes(module: nn.Module) -> int | None:
    """Number of outputs of the last linear layer (None when the model has none)."""
    name = output_layer(module)
    # named_modules, not get_submodule: TorchScript modules support only the former.
    return None if name is None else int(dict(module.named_modules())[name].weight.shape[0])


def checkpoint_classes(
    state: Mapping[str, torch.Tensor], build: Callable[..., nn.Module]
) -> int | None:
    """Number of classes a state dict was trained for, read from its final linear layer.

    ``build()`` makes the architecture with its default head; it runs on the meta device
    (no memory, no initialisation) when the architecture allows it. The state dict's tensor
    for that head's ``weight`` has one row per class.
    """
    try:
        with torch.device("meta"):
            probe = build()
    except (NotImplementedError, RuntimeError):  # builders that compute with tensors (RegNet)
        probe = build()
    head = output_layer(probe)
    state = _strip_shared_prefix(dict(state), set(probe.state_dict()))
    weight = state.get(f"{head}.weight") if head is not None else None
    return int(weight.shape[0]) if weight is not None else None


def replace_output_layer(module: nn.Module, num_classes: int) -> None:
    """Give ``module`` a new, randomly initialised final linear layer with ``num_classes``."""
    name = output_layer(module)
    if name is None:
        raise ConfigError(
            f"{type(module).__name__} has no linear output layer to resize to {num_classes} classes"
        )
    old = module.get_submodule(name)
    parent_name, _, leaf = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(parent, leaf, new.to(device=old.weight.device, dtype=old.weight.dtype))


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Copy ``state`` into ``module``; every name and shape must match.

    A prefix shared by all of the checkpoint's names (``"module."`` from DataParallel,
    ``"model."`` from Lightning) is removed when that makes the names match.

    Raises:
        ConfigError: names or shapes differ; the message lists them, and ``source`` says
            which file and architecture were combined.
    """
    expected = module.state_dict()
    state = _strip_shared_prefix(dict(state), set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:4])}"
        + (f" and {len(items) - 4} more" if len(items) > 4 else "")
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("different shapes", resized),
        )
        if items
    ]
    if problems:
        raise ConfigError(
            f"the weights do not fit {source}: {'; '.join(problems)}. "
            "Check that --model names the architecture the weights were trained with"
        )
    module.load_state_dict(state, strict=True)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"cannot read {path} as safetensors: {error}") from error


def _load_torchscript(path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still loads
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as error:
            raise ConfigError(f"cannot read TorchScript file {path}: {error}") from error


def _torch_load(path: Path, *, trust_model: bool) -> Any:
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol N": torch's note on a plain pickle, not for users.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=not trust_model)
    except pickle.UnpicklingError as error:
        # The weights-only unpickler names the class it refused to import ("GLOBAL x.y.Z");
        # a plain pickle (pickle.dump, not torch.save) may fail before it gets to one, so its
        # opcodes are read (never run) for the names it would import.
        if not trust_model:
            found = re.search(r"GLOBAL ([\w.]+)", str(error))
            names = [found.group(1)] if found else _pickled_globals(path)
            if names:
                raise ConfigError(_needs_trust_message(path, f"GLOBAL {names[0]}")) from error
        raise ConfigError(_unreadable_message(path, "not a PyTorch file, or damaged")) from error
    except Exception as error:  # torch.load raises many types on damaged or foreign files
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        raise ConfigError(_unreadable_message(path, reason)) from error


def _pickled_globals(path: Path, max_ops: int = 100_000) -> list[str]:
    """The ``module.name`` globals a plain pickle file would import when loaded (read from its
    opcodes with ``pickletools``, nothing is run); [] for a file that is not a pickle."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as file:
            for count, (opcode, argument, _) in enumerate(pickletools.genops(file)):
                if opcode.name == "GLOBAL" and isinstance(argument, str):
                    names.append(argument.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(argument, str):
                    strings.append(argument)
                if names or count >= max_ops:
                    break
    except (OSError, ValueError, EOFError, UnicodeDecodeError):  # not (or no longer) a pickle
        pass
    return names


def _unreadable_message(path: Path, reason: str) -> str:
    return (
        f"cannot read {path} as a PyTorch file ({reason}). Expected a state dict saved with "
        "torch.save(model.state_dict(), path), a .safetensors file or a TorchScript archive"
    )


def _needs_trust_message(path: Path, torch_message: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    what = f" (it refers to {found.group(1)})" if found else ""
    return (
        f"{path} holds pickled Python objects{what}, such as a whole model saved with "
        "torch.save(model). Loading it runs code from the file, and that code can do anything "
        "your user account can. Only if you trust where the file came from, pass --trust-model "
        "(Python: trust_model=True). Safer: save the weights alone with "
        "torch.save(model.state_dict(), 'weights.pt') and load them with "
        "--model torchvision:<name> --weights weights.pt"
    )


def _weights_only_message(path: Path, state: StateDict) -> str:
    return (
        f"{path} holds only weights ({len(state)} tensors), not an architecture: name the "
        f"architecture and pass the file as weights, e.g. --model torchvision:resnet18 "
        f"--weights {path} (Python: load_model('torchvision:resnet18', weights='{path}'))"
    )


def _find_state_dict(content: Any) -> StateDict | None:
    if _is_state_dict(content):
        return dict(content)
    if isinstance(content, Mapping):
        for key in _NESTED_KEYS:
            if _is_state_dict(content.get(key)):
                return dict(content[key])
    return None


def _is_state_dict(content: Any) -> bool:
    return (
        isinstance(content, Mapping)
        and len(content) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items())
    )


def _strip_shared_prefix(state: StateDict, expected: set[str]) -> StateDict:
    if set(state) == expected or not state:
        return state
    first = next(iter(state))
    prefix = first.split(".", 1)[0] + "."
    if "." in first and all(k.startswith(prefix) for k in state):
        stripped = {k[len(prefix) :]: v for k, v in state.items()}
        if set(stripped) == expected:
            return stripped
    return state


def _is_linear(module: nn.Module) -> bool:
    # Loaded TorchScript submodules are not nn.Linear instances but keep the class name.
    return isinstance(module, nn.Linear) or getattr(module, "original_name", None) == "Linear"


def _describe(content: Any) -> str:
    if isinstance(content, Mapping):
        keys = ", ".join(repr(k) for k in list(content)[:5])
        return f"a {type(content).__name__} with keys {keys}"
    return f"a {type(content).__name__}"
