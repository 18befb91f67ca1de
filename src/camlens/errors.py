"""Exceptions shared by every part of camlens.

``spelling`` names an option the way the user gives it (``--resume`` on the command line,
``resume=True`` in Python), so that every message names what exists where it is read.

``ConfigError`` is a usage or configuration mistake (unknown model, method, layer or class,
a model without a CAM head): the command line turns it into exit code 2. Bad *inputs* are not
configuration errors; they become per-input error records (see ``camlens.io.ImageLoadError``).
"""

from __future__ import annotations

from collections.abc import Callable


class CamlensError(Exception):
    """Base class of camlens' own errors."""


class ConfigError(CamlensError, ValueError):
    """The request cannot work as configured; the message says what to change."""


_CLI_SPELLING = {"out_dir": "--out", "ray_address": "--ray-address", "batch_size": "--batch-size"}


def spelling(cli: bool, out_name: str = "out_dir") -> Callable[..., str]:
    """``spell(name, value=True)``: how a message names option ``name``: ``--resume`` on the
    command line, ``resume=True`` in Python, where the output folder is the function's
    ``out_name`` argument.

    Example:
        >>> spelling(True)("out_dir", ""), spelling(False, "out")("out_dir", "")
        ('--out', 'out')
    """

    def spell(name: str, value: object = True) -> str:
        if cli:
            return _CLI_SPELLING.get(name, "--" + name.replace("_", "-"))
        if name == "out_dir":
            name = out_name
        return name if value == "" else f"{name}={value!r}"

    return spell


#: How messages raised from Python name options (``resume=True``).
PYTHON_SPELLING = spelling(cli=False)
