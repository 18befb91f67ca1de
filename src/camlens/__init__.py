"""camlens: see where a convolutional network looks.

Public API (every name is imported on first use, so ``import camlens`` is quick and loads
neither torch nor any plotting, templating or server library)::

    model = camlens.load_model("efficientnet_lite0")
    result = camlens.explain(model, ["cat.jpg"], method="cam", target="top5")
    result.raw, result.maps, result.boxes(), result.save("out/")

    camlens.run_explain(model, ["photos/"], "out", options=camlens.RunOptions(batch_size=32))
    camlens.evaluate(model, "boxes.csv", out_dir="eval_out")
    camlens.audit(model, "data/", out_dir="audit_out")
    camlens.train("data/", "my_model")
    found = camlens.factorize(model, ["cat.jpg", "dog.jpg"], k=5)   # concepts (DFF)
    camlens.concepts(model, ["photos/"], "concepts_out", k=5)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from camlens.errors import CamlensError, ConfigError
from camlens.lazy import lazy_exports
from camlens.version import __version__

#: Public name -> the module that defines it.
_EXPORTS = {
    "explain": "camlens.api",
    "explain_dense": "camlens.api",
    "DenseSettings": "camlens.api",
    "DenseExplanation": "camlens.dense",
    "DRISE": "camlens.methods",
    "run_explain": "camlens.api",
    "evaluate": "camlens.api",
    "audit": "camlens.api",
    "train": "camlens.api",
    "factorize": "camlens.api",
    "concepts": "camlens.api",
    "Explanation": "camlens.explanation",
    "normalize_maps": "camlens.localize",
    "RunOptions": "camlens.pipeline",
    "RunResult": "camlens.pipeline",
    "Classifier": "camlens.models",
    "available_models": "camlens.models",
    "load_model": "camlens.models",
    "METHODS": "camlens.methods",
    "get_method": "camlens.methods",
    "make_method": "camlens.methods",
    "CAMMethod": "camlens.methods",
    "CAM": "camlens.methods",
    "GradCAM": "camlens.methods",
    "GradCAMPlusPlus": "camlens.methods",
    "HiResCAM": "camlens.methods",
    "XGradCAM": "camlens.methods",
    "LayerCAM": "camlens.methods",
    "ScoreCAM": "camlens.methods",
    "AblationCAM": "camlens.methods",
    "EigenCAM": "camlens.methods",
    "RandomCAM": "camlens.methods",
}

__all__ = [
    "CAM",
    "DRISE",
    "METHODS",
    "AblationCAM",
    "CAMMethod",
    "CamlensError",
    "Classifier",
    "ConfigError",
    "DenseExplanation",
    "DenseSettings",
    "EigenCAM",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "RandomCAM",
    "RunOptions",
    "RunResult",
    "ScoreCAM",
    "XGradCAM",
    "__version__",
    "audit",
    "available_models",
    "concepts",
    "evaluate",
    "explain",
    "explain_dense",
    "factorize",
    "get_method",
    "load_model",
    "make_method",
    "normalize_maps",
    "run_explain",
    "train",
]


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)


if TYPE_CHECKING:  # for type checkers and editors; not imported at run time
    from camlens.api import (
        DenseSettings,
        audit,
        concepts,
        evaluate,
        explain,
        explain_dense,
        factorize,
        run_explain,
        train,
    )
    from camlens.dense import DenseExplanation
    from camlens.explanation import Explanation
    from camlens.localize import normalize_maps
    from camlens.methods import (
        CAM,
        DRISE,
        METHODS,
        AblationCAM,
        CAMMethod,
        EigenCAM,
        GradCAM,
        GradCAMPlusPlus,
        HiResCAM,
        LayerCAM,
        RandomCAM,
        ScoreCAM,
        XGradCAM,
        get_method,
        make_method,
    )
    from camlens.models import Classifier, available_models, load_model
    from camlens.pipeline import RunOptions, RunResult
