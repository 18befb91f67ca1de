"""Exceptions shared by every part of camlens.

``ConfigError`` is a usage or configuration mistake (unknown model, method, layer or class,
a model without a CAM head): the command line turns it into exit code 2. Bad *inputs* are not
configuration errors; they become per-input error records (see ``camlens.io.ImageLoadError``).
"""

from __future__ import annotations


class CamlensError(Exception):
    """Base class of camlens' own errors."""


class ConfigError(CamlensError, ValueError):
    """The request cannot work as configured; the message says what to change."""
