"""Map methods, one small class each; ``METHODS`` maps the names used by ``method=``."""

from __future__ import annotations

from camlens.methods.attention import (
    AttentionCapture,
    AttentionMethod,
    AttentionRollout,
    GradientRollout,
    find_attention,
    has_attention,
)
from camlens.methods.base import CAMMethod, MethodResult, Step, volume_methods
from camlens.methods.baseline import RandomCAM
from camlens.methods.cam import CAM
from camlens.methods.contrastive import FinerCAM, ShapleyCAM
from camlens.methods.gradient import (
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
    fuse_maps,
)
from camlens.methods.guided import FullGrad, GuidedBackprop, GuidedGradCAM
from camlens.methods.perturbation import AblationCAM, PerturbationMethod, ScoreCAM
from camlens.methods.projection import KPCACAM, EigenCAM, EigenGradCAM
from camlens.methods.registry import (
    ALIASES,
    METHODS,
    check_method,
    get_method,
    make_method,
    methods_for,
    options_for,
)
from camlens.methods.rise import DRISE
from camlens.methods.statistical import FEM

__all__ = [
    "ALIASES",
    "CAM",
    "DRISE",
    "FEM",
    "KPCACAM",
    "METHODS",
    "AblationCAM",
    "AttentionCapture",
    "AttentionMethod",
    "AttentionRollout",
    "CAMMethod",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientRollout",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "LayerCAM",
    "MethodResult",
    "PerturbationMethod",
    "RandomCAM",
    "ScoreCAM",
    "ShapleyCAM",
    "Step",
    "XGradCAM",
    "check_method",
    "find_attention",
    "fuse_maps",
    "get_method",
    "has_attention",
    "make_method",
    "methods_for",
    "options_for",
    "volume_methods",
]
