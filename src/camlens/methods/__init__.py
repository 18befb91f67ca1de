"""Map methods, one small class each; ``METHODS`` maps the names used by ``method=``."""

from __future__ import annotations

from camlens.errors import ConfigError
from camlens.methods.base import CAMMethod, MethodResult
from camlens.methods.cam import CAM
from camlens.methods.gradient import GradCAM

METHODS: dict[str, type[CAMMethod]] = {cls.name: cls for cls in (CAM, GradCAM)}


def get_method(name: str) -> type[CAMMethod]:
    """The method class registered as ``name`` (case-insensitive)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[key]


__all__ = ["CAM", "METHODS", "CAMMethod", "GradCAM", "MethodResult", "get_method"]
