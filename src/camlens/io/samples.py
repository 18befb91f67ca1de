"""Bundled sample photographs (from scikit-image's data, shipped inside its wheel)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from camlens.writers import write_png

SAMPLES: dict[str, Callable[[], np.ndarray]] = {
    "chelsea": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "astronaut": skimage.data.astronaut,
    "rocket": skimage.data.rocket,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
}


def sample_image(name: str) -> Image.Image:
    """One bundled sample photograph as an RGB PIL image (see ``SAMPLES`` for the names)."""
    if name not in SAMPLES:
        raise KeyError(f"no sample called {name!r}; choose one of {', '.join(SAMPLES)}")
    return Image.fromarray(SAMPLES[name]()).convert("RGB")


def write_samples(
    folder: str | os.PathLike | Callable[[str], Path], names: list[str] | None = None
) -> list[Path]:
    """Write the sample photographs as PNG files into ``folder``; return their paths.

    ``folder`` may also be a function from a file name to the path to write it to (an output
    folder that records what it writes).

    Example:
        >>> [p.name for p in write_samples("samples", ["chelsea"])]
        ['chelsea.png']
    """
    destination = folder if callable(folder) else (lambda name: Path(folder) / name)
    return [write_png(destination(f"{name}.png"), sample_image(name)) for name in names or SAMPLES]
