"""Which torch device a job may use: checked before any work, with a message that helps."""

from __future__ import annotations

import torch

from camlens.errors import ConfigError


def check_device(name: str | torch.device | None) -> torch.device | None:
    """The device called ``name`` (None stays None), after checking that it exists here.

    Raises:
        ConfigError: not a device name (``banana``), or a device this machine lacks
            (``cuda`` without a CUDA GPU, ``cuda:3`` with two GPUs, ``mps`` off Apple).

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("banana")
        Traceback (most recent call last):
        camlens.errors.ConfigError: unknown device 'banana'; use cpu, cuda, cuda:N or mps
    """
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(name)!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device {str(name)!r}: this machine has no CUDA GPU that torch can use "
                "(torch.cuda.is_available() is False); use the device cpu"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {str(name)!r}: this machine has {count} CUDA GPU(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(name)!r}: MPS (Apple GPUs) is not available here")
    return device
