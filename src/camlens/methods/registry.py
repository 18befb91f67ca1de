"""The method registry: names -> classes, and building methods for a classifier."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from camlens.errors import ConfigError
from camlens.methods.attention import (
    AttentionMethod,
    AttentionRollout,
    GradientRollout,
    has_attention,
)
from camlens.methods.base import CAMMethod
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
)
from camlens.methods.guided import FullGrad, GuidedBackprop, GuidedGradCAM
from camlens.methods.perturbation import AblationCAM, ScoreCAM
from camlens.methods.projection import KPCACAM, EigenCAM, EigenGradCAM
from camlens.methods.rise import DRISE
from camlens.methods.statistical import FEM
from camlens.models import Classifier

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
        GradCAMElementWise,
        EigenGradCAM,
        FinerCAM,
        ShapleyCAM,
        FEM,
        KPCACAM,
        GuidedBackprop,
        GuidedGradCAM,
        FullGrad,
        DRISE,
        AttentionRollout,
        GradientRollout,
        RandomCAM,
    )
}

ALIASES: dict[str, str] = {
    "gradcampp": "gradcam++",
    "gradcamplusplus": "gradcam++",
    "attentionrollout": "rollout",
    "gradientrollout": "gradrollout",
}


def methods_for(module: nn.Module) -> list[str]:
    """The registered methods that can explain ``module``: all of them, but the attention
    methods (``rollout``, ``gradrollout``) only for a model with self-attention layers. For
    "every method" choices (a comparison of all methods) that must not fail on a CNN.

    Example:
        >>> from torch import nn
        >>> "rollout" in methods_for(nn.Sequential(nn.Conv2d(3, 4, 3)))
        False
    """
    attention = has_attention(module)
    return [
        name for name, cls in METHODS.items() if attention or not issubclass(cls, AttentionMethod)
    ]


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


def make_method(
    classifier: Classifier, method: str, layer: str | None = None, **options: Any
) -> CAMMethod:
    """Instantiate method ``method`` for ``classifier`` (reuse it across batches).

    ``options`` are keyword arguments of the method's class (``max_channels``, ``batch_size``,
    ``smooth``, ``seed``...); an option the method does not take is a ``ConfigError``.
    """
    cls = check_method(method, options)
    instance = cls(
        classifier.module,
        layer=layer or classifier.layer,
        output=classifier.output,
        labels=classifier.labels,
        **options,
    )
    instance.preprocess = classifier.preprocess  # for a Similarity target's reference image
    return instance


def check_method(method: str, options: Mapping[str, Any] | None = None) -> type[CAMMethod]:
    """The class of method ``method``, after checking that it takes every option in
    ``options`` (before any model is loaded).

    Raises:
        ConfigError: an unknown method, or an option it does not take.

    Example:
        >>> check_method("cam", {"max_channels": 8})
        Traceback (most recent call last):
        camlens.errors.ConfigError: method 'cam' does not take the option(s) max_channels ...
    """
    cls = get_method(method)
    refused = sorted(set(options or {}) - set(options_for(cls, options or {})))
    if refused:
        eigen = ", ".join(name for name, klass in METHODS.items() if klass.eigen_smooth_applies)
        no_aug = ", ".join(name for name, klass in METHODS.items() if not klass.aug_smooth_applies)
        raise ConfigError(
            f"method {cls.name!r} does not take the option(s) {', '.join(refused)} (smooth: "
            "gradient methods; max_channels and batch_size: scorecam, ablationcam; "
            f"eigen_smooth: {eigen}; aug_smooth: every method but {no_aug})"
        )
    return cls


def options_for(method: str | type[CAMMethod], options: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``options`` that method ``method`` takes: ``smooth`` and ``smooth_sigma``
    reach gradient methods only, a true ``eigen_smooth`` / ``aug_smooth`` the methods where it
    applies (``eigen_smooth_applies``, ``aug_smooth_applies``), every other option the methods
    whose class accepts it (e.g. ``max_channels``: Score-CAM and Ablation-CAM). For runs of
    several methods with one set of command-line options.

    Example:
        >>> options_for("cam", {"smooth": 8, "max_channels": 64})
        {}
        >>> options_for("scorecam", {"smooth": 8, "max_channels": 64})
        {'max_channels': 64}
        >>> options_for("gradcam", {"smooth": 8, "max_channels": 64})
        {'smooth': 8}
        >>> options_for("hirescam", {"eigen_smooth": True, "aug_smooth": True})
        {'aug_smooth': True}
    """
    cls = get_method(method) if isinstance(method, str) else method
    accepted = {
        name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for name, parameter in inspect.signature(vars(klass)["__init__"]).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    if not cls.needs_gradients:
        accepted -= {"smooth", "smooth_sigma"}
    refused_if_set = {
        name
        for name, applies in (
            ("eigen_smooth", cls.eigen_smooth_applies),
            ("aug_smooth", cls.aug_smooth_applies),
        )
        if not applies
    }
    return {
        key: value
        for key, value in options.items()
        if key in accepted and not (key in refused_if_set and value)
    }
