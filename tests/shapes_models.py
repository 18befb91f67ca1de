"""Small CAM models trained on generated shapes: the end-to-end evidence of several tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from camlens.data.shapes import ShapesConfig, make_shapes_dataset
from camlens.training import TrainConfig, train_classifier


def train_shapes_model(root: Path, *, n: int, epochs: int, **shapes: Any) -> dict[str, Any]:
    """Generate ``n`` shapes of 32 px into ``root/data`` (``shapes``: further ``ShapesConfig``
    fields, e.g. a shortcut) and train the ``simple`` CAM network on them into ``root/model``
    (seed 0, ``epochs`` epochs); return the data set's ``dataset.json`` content."""
    info = make_shapes_dataset(root / "data", ShapesConfig(n=n, size=32, seed=0, **shapes))
    train_classifier(
        root / "data" / "images",
        root / "model",
        TrainConfig(epochs=epochs, image_size=32, seed=0),
        progress=False,
    )
    return info
