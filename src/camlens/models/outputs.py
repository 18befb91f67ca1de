"""Pick the logits out of whatever a model returns (a tensor, a tuple, a dict)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from camlens.errors import ConfigError

OutputSpec = str | int | Callable[[Any], torch.Tensor] | None


def select_logits(output: Any, spec: OutputSpec = None) -> torch.Tensor:
    """Return the (N, classes) logits from a model's output.

    Parameters:
        output: what ``module(x)`` returned.
        spec: ``None`` picks automatically (the tensor itself; the first 2-D tensor of a
            tuple/list; the ``"logits"`` entry of a dict, else its first 2-D tensor);
            an ``int`` indexes a tuple/list; a ``str`` is a dict key; a callable receives the
            output and returns the logits.

    Example:
        >>> select_logits({"logits": torch.zeros(2, 10), "aux": torch.zeros(2, 3)}).shape
        torch.Size([2, 10])
    """
    if callable(spec):
        logits = spec(output)
    elif spec is not None:
        try:
            logits = output[spec]
        except (KeyError, IndexError, TypeError) as error:
            raise ConfigError(
                f"cannot select {spec!r} from the model's output ({_describe(output)})"
            ) from error
    else:
        logits = _auto_select(output)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ConfigError(
            f"the selected model output must be a (N, classes) tensor, got {_describe(logits)}; "
            "pass output=<key, index or function> to choose the logits"
        )
    return logits


def _auto_select(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        values: Sequence[Any] = list(output.values())
    elif isinstance(output, Sequence):
        values = output
    else:
        return output
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim == 2:
            return value
    raise ConfigError(
        f"cannot find the logits in the model's output ({_describe(output)}); "
        "pass output=<key, index or function>"
    )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"dict with keys {list(value)}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return f"{type(value).__name__} of {len(value)} items"
    return type(value).__name__
