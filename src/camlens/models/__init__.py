"""Models: the ``Classifier`` type and the registry behind ``load_model``."""

from camlens.models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from camlens.models.efficientnet_lite import imagenet_labels
from camlens.models.registry import DEFAULT_MODEL, available_models, load_model

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Classifier",
    "available_models",
    "imagenet_labels",
    "load_model",
]
