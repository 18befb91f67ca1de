"""Models: the ``Classifier`` type and the registry behind ``load_model``."""

from camlens.models.classifier import (
    DEFAULT_THRESHOLD_PROB,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    check_threshold_prob,
    class_probabilities,
)
from camlens.models.efficientnet_lite import imagenet_labels
from camlens.models.registry import DEFAULT_MODEL, available_models, load_model

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_THRESHOLD_PROB",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Classifier",
    "available_models",
    "check_threshold_prob",
    "class_probabilities",
    "imagenet_labels",
    "load_model",
]
