"""camlens: see where a convolutional network looks.

Public API::

    model = camlens.load_model("efficientnet_lite0")
    result = camlens.explain(model, ["cat.jpg"], method="cam", target="top5")
    result.raw, result.maps, result.boxes(), result.save("out/")
"""

from importlib.metadata import PackageNotFoundError, version

from camlens.api import explain, make_method
from camlens.errors import CamlensError, ConfigError
from camlens.evaluation import evaluate
from camlens.explanation import Explanation, normalize_maps
from camlens.methods import (
    CAM,
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
)
from camlens.models import Classifier, available_models, load_model

try:
    __version__ = version("camlens")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "CAM",
    "METHODS",
    "AblationCAM",
    "CAMMethod",
    "CamlensError",
    "Classifier",
    "ConfigError",
    "EigenCAM",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "RandomCAM",
    "ScoreCAM",
    "XGradCAM",
    "__version__",
    "available_models",
    "evaluate",
    "explain",
    "get_method",
    "load_model",
    "make_method",
    "normalize_maps",
]
