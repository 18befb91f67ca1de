"""``camlens.train``: a CAM-ready classifier trained on an ImageFolder data set."""

from __future__ import annotations

import os
from dataclasses import fields, replace
from typing import Any

from camlens.errors import ConfigError
from camlens.training import TrainConfig, TrainResult, train_classifier


def train(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> TrainResult:
    """Train a classifier that ends in GAP + one linear layer (CAM is exact on it) and write it
    to ``out_dir``; load it back with ``camlens.load_model(out_dir)``.

    Parameters:
        data: an ImageFolder (one subfolder of images per class).
        out_dir: the model folder (``model.safetensors``, ``config.json``, ``metrics.json``...).
        config: a ``TrainConfig``; keyword ``settings`` (``epochs=8``, ``backbone="simple"``...)
            change single fields of it.
        resume: continue an interrupted run in ``out_dir`` (same settings).
        overwrite: replace a previous run in ``out_dir``.
        progress: progress bars on stderr.

    Returns:
        A ``TrainResult`` (``best_val_accuracy``, ``metrics``, ``n_train``, ``n_val``...).

    Example:
        >>> import camlens
        >>> result = camlens.train("shapes/images", "shapes_model", epochs=2, image_size=32,
        ...                        seed=0, progress=False)  # 60 small shapes: a quick run
        >>> result.n_train, result.n_val, round(result.best_val_accuracy, 2)
        (48, 12, 0.58)
        >>> camlens.load_model("shapes_model").labels
        ['circle', 'square', 'triangle']
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"train() got unknown setting(s) {', '.join(unknown)}; TrainConfig has: "
            f"{', '.join(sorted(known))}"
        )
    config = replace(config or TrainConfig(), **settings)
    return train_classifier(
        data, out_dir, config, resume=resume, overwrite=overwrite, progress=progress
    )
