"""What every task needs: decoding an input for a model, loading the model in a worker, and
the parts that the tasks writing files per input (explain, explain-volume, concepts) share."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image

from camlens.defaults import DEFAULT_MAX_PIXELS
from camlens.errors import ConfigError
from camlens.io import ImageLoadError, load_image
from camlens.models import Classifier, load_model
from camlens.models.fingerprint import model_fingerprint
from camlens.pipeline import OutputFolder, model_for_actors
from camlens.targets import describe_target
from camlens.writers import safe_name


@dataclass
class Loaded:
    """One decoded input (or the reason it could not be decoded)."""

    index: int
    source: str
    image: Image.Image | None = None
    tensor: torch.Tensor | None = None
    error: str | None = None
    size: tuple[int, int] | None = None


def load_input(
    classifier: Classifier,
    index: int,
    source: str | os.PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    display_side: int | None = None,
    window: tuple[float, float] | None = None,
) -> Loaded:
    """Decode and preprocess one input; a bad file becomes a ``Loaded`` with ``error``.

    Parameters:
        classifier: the model (its preprocessing).
        index, source: the input's position and path.
        max_pixels: the pixel budget (``load_image``).
        display_side: keep ``image`` at most this long (the longest side; a JPEG is decoded
            at a reduced scale when it is much larger); ``size`` stays the original's.
        window: ``(center, width)``: the grey-level window of 16-bit images and DICOM files
            (``load_image``).
    """
    try:
        image = load_image(source, max_pixels=max_pixels, needed_side=display_side, window=window)
    except ImageLoadError as error:
        return Loaded(index, str(source), error=str(error))
    size = tuple(image.info.get("original_size", image.size))
    tensor = classifier.preprocess(image)
    if display_side and max(image.size) > display_side:
        scale = display_side / max(image.size)
        shown = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(shown, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return Loaded(index, str(source), image=image, tensor=tensor, size=size)


def worker_model(model: Classifier | str, device: str | None = None) -> Classifier:
    """The model in a worker: the ``Classifier`` itself, or loaded from its spec (a Ray actor
    receives the folder of a trained model and loads it once)."""
    return load_model(model, device=device) if isinstance(model, str) else model


def model_settings(model: Classifier | str) -> dict[str, Any]:
    """The model's part of a task's settings (what a resume must find again): the loaded
    model's fingerprint (``model_fingerprint``), or the spec a worker loads it from."""
    if not isinstance(model, Classifier):
        return {"model": model}
    settings = model_fingerprint(model)
    if model.multilabel:  # the predictions and "positive" targets depend on them
        settings.update(multilabel=True, threshold_prob=model.threshold_prob)
    return settings


def output_stem(index: int, source: str) -> str:
    """File-name stem of input ``index``: its position and its sanitised name.

    Example:
        >>> output_stem(3, "photos/my cat.jpg")
        '00003_my_cat'
    """
    return f"{index:05d}_{safe_name(Path(source).stem)}"


class FileWritingTask:
    """Mixin of the frozen task dataclasses that write files and one record per input
    (``ExplainTask``, ``VolumeExplainTask``, ``ConceptsTask``): their ``model`` field is a
    ``Classifier`` or the spec a worker loads it from."""

    name: str

    def describe(self, item: Any) -> Any:
        """The input as the manifest names it: its path."""
        return str(item)

    def for_actors(self) -> Self:
        """This task with the model as something a Ray actor can load (its folder or spec)."""
        model = self.model  # type: ignore[attr-defined]
        if isinstance(model, Classifier):
            return replace(self, model=model_for_actors(model))  # type: ignore[type-var]
        return self

    def fold(self, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """Counts: ``{"n_ok": ..., "n_error": ...}`` (``count_statuses``)."""
        return count_statuses(records)

    def require_folder(self, folder: OutputFolder | None) -> OutputFolder:
        """``folder``; a task that writes files refuses to run without one."""
        if folder is None:
            raise ConfigError(f"the {self.name} task writes files: give it an output folder")
        return folder


def method_settings(task: Any) -> dict[str, Any]:
    """The settings a task that runs a map method records (what a resume must find again):
    the model's (``model_settings``), the method and its options, the target, the layer and
    the style (``task.model``, ``.method``, ``.method_options``, ``.target``, ``.layer``,
    ``.style``, a dataclass)."""
    return {
        **model_settings(task.model),
        "method": task.method,
        "method_options": task.method_options,
        "target": describe_target(task.target),
        "layer": task.layer,
        "style": asdict(task.style),
    }


def count_statuses(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``{"n_ok": ..., "n_error": ...}``: the records by ``status``.

    Example:
        >>> count_statuses([{"status": "ok"}, {"status": "error"}, {"status": "ok"}])
        {'n_ok': 2, 'n_error': 1}
    """
    counts = {"n_ok": 0, "n_error": 0}
    for record in records:
        counts["n_ok" if record["status"] == "ok" else "n_error"] += 1
    return counts
