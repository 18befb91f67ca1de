"""Map methods, one small class each; ``METHODS`` maps the names used by ``method=``."""

from __future__ import annotations

from camlens.errors import ConfigError
from camlens.methods.base import CAMMethod, MethodResult
from camlens.methods.baseline import RandomCAM
from camlens.methods.cam import CAM
from camlens.methods.gradient import (
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
    fuse_maps,
)
from camlens.methods.perturbation import AblationCAM, PerturbationMethod, ScoreCAM
from camlens.methods.projection import EigenCAM

METHODS: dict[str, type[CAMMethod]] = {
    cls.name: cls
    for cls in (
        CAM,
        GradCAM,
        GradCAMPlusPlus,
        HiResCAM,
        XGradCAM,
        LayerCAM,
        ScoreCAM,
        AblationCAM,
        EigenCAM,
        RandomCAM,
    )
}

ALIASES: dict[str, str] = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}


def get_method(name: str) -> type[CAMMethod]:
    """The method class registered as ``name`` (case-insensitive; ``-`` and ``_`` ignored).

    Example:
        >>> get_method("Grad-CAM++").name, get_method("gradcampp").name
        ('gradcam++', 'gradcam++')
    """
    key = name.strip().lower().replace("-", "").replace("_", "")
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[key]


__all__ = [
    "ALIASES",
    "CAM",
    "METHODS",
    "AblationCAM",
    "CAMMethod",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "MethodResult",
    "PerturbationMethod",
    "RandomCAM",
    "ScoreCAM",
    "XGradCAM",
    "fuse_maps",
    "get_method",
]
