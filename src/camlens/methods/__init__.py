"""Map methods, one small class each; ``METHODS`` maps the names used by ``method=``."""

from __future__ import annotations

from camlens.methods.base import CAMMethod, MethodResult, Step
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
from camlens.methods.registry import (
    ALIASES,
    METHODS,
    check_method,
    get_method,
    make_method,
    options_for,
)

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
    "Step",
    "XGradCAM",
    "check_method",
    "fuse_maps",
    "get_method",
    "make_method",
    "options_for",
]
