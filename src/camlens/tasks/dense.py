"""The explain task for detectors and segmenters: a map per detection or per class region.

Per input (``process``, one image at a time: ``camlens.dense.explain_dense``): decode and
preprocess it as the model wants, fix its targets on the clean pass, run the method, then

* detection: ``overlays/<n>_<name>_d<k>.png`` per detection (its map, its box drawn), and a
  record ``task: "detection"`` with ``detections``: per detection ``class``, ``label``,
  ``score``, ``box`` ([x0, y0, x1, y1] in the image's pixels), ``map`` (the overlay),
  ``map_box`` (Zhou's box of the map, image pixels), ``peak`` ([x, y] of the map's maximum)
  and ``peak_in_box``;
* segmentation: ``overlays/<n>_<name>_c<class>.png`` per class (its map, the region's outline
  in white), and a record ``task: "segmentation"`` with ``segments``: per class ``class``,
  ``label``, ``score`` (its logits summed over the region), ``pixels`` and ``fraction`` (the
  region's size at the model's input, and as a fraction of the image), ``mean_prob``,
  ``region`` (``"predicted"`` or ``"mask"``), ``map``, ``map_box``;

and ``raw/<n>_<name>.npz`` (``raw`` (K, h, w), ``scores`` (K,), ``classes`` (K,), and for
detections ``boxes`` (K, 4) in input pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from camlens.defaults import DEFAULT_MAX_PIXELS
from camlens.dense import DEFAULT_SCORE_THRESHOLD, DenseExplanation, explain_dense
from camlens.errors import ConfigError
from camlens.io import ImageLoadError, load_image
from camlens.metrics.localization import pointing_game
from camlens.models.dense import DEFAULT_IOU_THRESHOLD
from camlens.pipeline import Item, OutputFolder
from camlens.tasks.common import (
    FileWritingTask,
    Loaded,
    load_input,
    method_settings,
    output_stem,
    worker_model,
)
from camlens.tasks.explain import Style, error_record
from camlens.writers import write_npz, write_png

__all__ = ["DenseExplainTask", "read_region"]


def read_region(path: str) -> np.ndarray:
    """A region mask file (``--region``) as (H, W) bool: pixels brighter than half are in.

    Raises:
        ConfigError: the file cannot be read as an image (``camlens.io.ImageLoadError``'s
            message).
    """
    try:
        image = load_image(path)
    except ImageLoadError as error:
        raise ConfigError(f"--region {path}: {error}") from error
    return np.asarray(image.convert("L")) > 127


@dataclass(frozen=True)
class DenseExplainTask(FileWritingTask):
    """Explain every input of a detector or segmenter (see the module docstring).

    Attributes:
        model: the ``Classifier`` (or a ``load_model`` spec, for Ray actors).
        task: ``"detection"`` or ``"segmentation"``.
        method, layer, method_options: as in ``camlens.dense.explain_dense``.
        style: colormap, opacity, box threshold (of ``map_box``) and overlay size.
        score_threshold, iou_threshold: detection: which detections, and how they match.
        region: segmentation: a mask file applied to every input (resized to it), or None.
        classes: segmentation: the classes to explain, or None (every predicted class).
        max_pixels: the pixel budget of an input.
    """

    model: Any
    task: str = "detection"
    method: str = "gradcam"
    layer: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    style: Style = field(default_factory=Style)
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    region: str | None = None
    classes: tuple[str, ...] | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    name: ClassVar[str] = "explain-dense"
    records_file: ClassVar[str] = "results.jsonl"
    parts_dir: ClassVar[str] = "parts"
    target: ClassVar[str] = "objects"

    def settings(self) -> dict[str, Any]:
        return {
            **method_settings(self),
            "task": self.task,
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
            "region": self.region,
            "classes": None if self.classes is None else list(self.classes),
            "max_pixels": self.max_pixels,
        }

    def start(self, folder: OutputFolder | None) -> _DenseWorker:
        return _DenseWorker(self, self.require_folder(folder))


class _DenseWorker:
    """The model, made once; batches of paths in, records (and files) out."""

    def __init__(self, task: DenseExplainTask, folder: OutputFolder) -> None:
        self.task = task
        self.folder = folder
        self.classifier = worker_model(task.model)
        self.region = None if task.region is None else read_region(task.region)

    def load(self, item: Item) -> Loaded:
        index, source = item
        return load_input(
            self.classifier,
            index,
            source,
            max_pixels=self.task.max_pixels,
            display_side=self.task.style.overlay_size or None,
        )

    def process(self, batch: Sequence[Item], loaded: Sequence[Loaded]) -> list[dict[str, Any]]:
        records = []
        for item in loaded:
            if item.error is not None:
                records.append(error_record(item.source, item.error))
                continue
            explanation = explain_dense(
                self.classifier,
                item.tensor,
                task=self.task.task,
                method=self.task.method,
                layer=self.task.layer,
                method_options=self.task.method_options,
                score_threshold=self.task.score_threshold,
                iou_threshold=self.task.iou_threshold,
                region=self.region,
                classes=self.task.classes,
                image=item.image,
                source=item.source,
                size=item.size,
            )
            stem = output_stem(item.index, item.source)
            records.append(write_dense_outputs(explanation, stem, self.folder, self.task.style))
        return records


def write_dense_outputs(
    explanation: DenseExplanation, stem: str, folder: OutputFolder, style: Style
) -> dict[str, Any]:
    """Write one image's overlays and raw maps into ``folder``; return its record."""
    overlays = explanation.image_overlays(0, colormap=style.colormap, alpha=style.alpha)
    map_boxes = [
        explanation.original_box(0, b) for b in explanation.image_boxes(0, style.threshold)
    ]
    detection = explanation.task == "detection"
    boxes = explanation.object_boxes(0)
    entries = []
    for k, found in enumerate(explanation.objects):
        suffix = f"d{k}" if detection else f"c{found['class']}"
        relative = f"overlays/{stem}_{suffix}.png"
        write_png(folder.path(relative), overlays[k])
        entry = dict(found)
        entry.update(overlay=relative, map=relative)
        entry["map_box"] = None if map_boxes[k] is None else list(map_boxes[k])
        if detection:
            entry["box"] = list(boxes[k])
            entry.update(_peak(explanation, k, boxes[k]))
        else:
            height, width = explanation.input_size
            entry["fraction"] = round(found["pixels"] / (height * width), 6)
        entries.append(entry)
    raw_path = f"raw/{stem}.npz"
    arrays = {
        "raw": explanation.raw[0].numpy(),
        "scores": explanation.scores[0].numpy(),
        "classes": np.array([o["class"] for o in explanation.objects], dtype=np.int64),
    }
    if detection:
        arrays["boxes"] = np.array([o["box"] for o in explanation.objects], dtype=np.float32)
    write_npz(folder.path(raw_path), **arrays)
    width, height = explanation.original_size(0)
    return {
        "input": explanation.source(0),
        "status": "ok",
        "error": None,
        "task": explanation.task,
        "detections" if detection else "segments": entries,
        "raw": raw_path,
        "method": explanation.method,
        "layer": explanation.layer,
        "size": [width, height],
    }


def _peak(explanation: DenseExplanation, k: int, box: Sequence[int]) -> dict[str, Any]:
    """The map's maximum in the image's pixels, and whether it lies inside the detection's
    ``box`` (image pixels, right and bottom edges exclusive)."""
    heat = explanation.heatmap(0, k, original=True)
    if not float(heat.max()) > 0:
        return {"peak": None, "peak_in_box": False}
    row, column = np.unravel_index(int(np.argmax(heat)), heat.shape)
    inside = pointing_game(heat, [box], tolerance=0.0)  # the peak pixel's centre in the box
    return {"peak": [int(column), int(row)], "peak_in_box": bool(inside)}
