"""A model's identity for a run's settings: its name and digests of its weights and labels."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from camlens.models.classifier import Classifier


def model_fingerprint(classifier: Classifier) -> dict[str, Any]:
    """``{"model", "model_sha256", "labels_sha256"}``: a resume must find the same model (the
    same name is not enough: a folder may have been trained again).

    Example:
        >>> from camlens.models import load_model
        >>> sorted(model_fingerprint(load_model("efficientnet_lite0")))
        ['labels_sha256', 'model', 'model_sha256']
    """
    weights = hashlib.sha256()
    for name, tensor in classifier.module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        weights.update(f"{name} {flat.dtype} {tuple(tensor.shape)}".encode())
        weights.update(flat.view(torch.uint8).numpy().tobytes())  # any dtype, bfloat16 too
    labels = hashlib.sha256(json.dumps(list(classifier.labels)).encode("utf-8"))
    return {
        "model": classifier.name,
        "model_sha256": weights.hexdigest(),
        "labels_sha256": labels.hexdigest(),
    }
