"""The evaluate task: how good are a model's heat maps on an annotated data set?

Per batch of annotated images (``process``), every method's maps of the model's top-1 class
and of every annotated class are computed in one call of the method, then the measurements
the chosen metrics need (``camlens.metrics.registry``) are taken:

* per annotated class (an *instance*), on its map at the original image size (boxes are in
  original pixels): IoUs at every map threshold, GT-known localisation, pointing game,
  energy-based pointing game...;
* per image: top-1 localisation, PxAP's pixel histograms (masks);
* per batch, on the top-1 class's map at the model's input size (the decision the model
  made): deletion and insertion curves, the scores on image x map, ROAD.

An image with several annotated classes contributes one instance per class to the
class-wise metrics; top-1 localisation and the faithfulness metrics count each image once.
An annotation without a class (``None``: mask folders without class subfolders) is evaluated
on the model's top-1 class, which then counts as right for top-1 localisation.

Each image becomes one record (one line of ``evaluation.jsonl``)::

    {"index": 3, "image": "a.png", "status": "ok", "error": null,
     "methods": {"cam": {"predicted": 0, "predicted_label": "red", "top1_loc": true,
                         "instances": [{"label": "red", "class": 0, "ious": [...],
                                        "gt_known_loc": true, "pointing_game": true,
                                        "energy_pointing_game": 0.93}],
                         "deletion": [...], "insertion": [...], "full": 0.9, "masked": 0.7}},
     "arrays": {"cam": <raw maps (1 + classes, h, w)>, ...}}

``arrays`` holds, per method, the raw maps at feature resolution of the explained classes
(top-1 first, then the annotated classes in order); the pipeline stores them in part files
beside the records, and the report draws its gallery from them without running the model.
An unreadable image: ``status`` ``"error"``, no ``methods``.

``fold`` sums the records up into the content of ``metrics.json`` (pure: the sanity check,
which re-initialises copies of the model, is a separate step, :func:`sanity_check`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from camlens.defaults import DEFAULT_MAX_PIXELS
from camlens.errors import ConfigError
from camlens.io import ImageLoadError, load_image
from camlens.io.annotations import Annotation, load_annotations
from camlens.localize import normalize_maps
from camlens.methods import (
    METHODS,
    CAMMethod,
    get_method,
    make_method,
    methods_for,
    options_for,
)
from camlens.metrics.faithfulness import auc
from camlens.metrics.registry import (
    MEASUREMENTS,
    REGISTRY,
    BatchView,
    BoxAccuracy,
    ImageView,
    InstanceView,
    MetricSettings,
)
from camlens.metrics.sanity import cascading_randomization
from camlens.models import Classifier
from camlens.pipeline import Item, OutputFolder, model_for_actors
from camlens.targets import class_index
from camlens.tasks.common import model_settings, worker_model

__all__ = [
    "METRICS_FILE",
    "RECORDS_FILE",
    "EvaluateTask",
    "Work",
    "add_sanity",
    "build_methods",
    "class_ids",
    "distinct_methods",
    "load_annotated_image",
    "read_annotations",
    "sanity_check",
]

#: The per-image records of a run with an output folder.
RECORDS_FILE = "evaluation.jsonl"
#: The summary (what ``camlens.evaluate`` returns).
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Work:
    """One input of the task: an annotated image and the class id of each of its distinct
    labels (``None``: unlabelled)."""

    annotation: Annotation
    class_ids: tuple[int | None, ...]


@dataclass(frozen=True)
class EvaluateTask:
    """Measure heat-map methods on annotated images (see the module docstring).

    Attributes:
        model: the ``Classifier`` (or a ``load_model`` spec, for Ray actors).
        methods: method names (canonical) or method instances, one per method.
        metric_settings: the metrics and their settings (``make_settings``).
        layer: feature layer of every method (default: found automatically).
        method_options: keyword arguments of the methods; each method receives those its
            class takes.
        source: the annotations' path, for the summary.
        max_pixels: the pixel budget of an image (larger ones are error records).
    """

    model: Classifier | str
    methods: tuple[str | CAMMethod, ...]
    metric_settings: MetricSettings
    layer: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    source: str = "(in memory)"
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    name: ClassVar[str] = "evaluate"
    records_file: ClassVar[str] = RECORDS_FILE
    parts_dir: ClassVar[str] = "parts"

    @property
    def method_names(self) -> list[str]:
        return [m.name if isinstance(m, CAMMethod) else m for m in self.methods]

    @property
    def model_name(self) -> str:
        return self.model.name if isinstance(self.model, Classifier) else str(self.model)

    def settings(self) -> dict[str, Any]:
        return {
            **model_settings(self.model),
            "methods": self.method_names,
            "method_options": self.method_options,
            "layer": self.layer,
            "metrics": list(self.metric_settings.metrics),
            **self.metric_settings.as_dict(),
            "max_pixels": self.max_pixels,
        }

    def describe(self, item: Work) -> Any:
        a = item.annotation
        return [str(a.image), [list(b) for b in a.boxes], a.labels]

    def start(self, folder: OutputFolder | None) -> _EvaluateWorker:
        return _EvaluateWorker(self)

    def for_actors(self) -> EvaluateTask:
        """The model as its folder when actors can load it and no method instance was given
        (instances travel with the ``Classifier`` they hook)."""
        if not isinstance(self.model, Classifier):
            return self
        if any(isinstance(m, CAMMethod) for m in self.methods):
            return self
        return replace(self, model=model_for_actors(self.model))

    def fold(self, records: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """The content of ``metrics.json`` from the records in input order (read twice: once
        for the statistics, once for the per-image table, which needs MaxBoxAcc's best map
        threshold). ``sanity`` is empty: :func:`add_sanity` fills it in."""
        settings = self.metric_settings
        names = self.method_names
        chosen = [REGISTRY[name] for name in settings.metrics]
        folds = {
            name: {m.name: m.fold(settings) for m in chosen if m.fold is not None} for name in names
        }
        best = {name: BoxAccuracy(settings.thresholds) for name in names}
        errors: list[dict[str, Any]] = []
        n_images = n_instances = 0
        for record in records:
            if record["status"] != "ok":
                errors.append({"image": record["image"], "error": record["error"]})
                continue
            n_images += 1
            for position, name in enumerate(names):
                values = record["methods"][name]
                if position == 0:
                    n_instances += len(values["instances"])
                best[name].add(values)
                for fold in folds[name].values():
                    fold.add(values)
        methods: dict[str, dict[str, Any]] = {}
        curves: dict[str, dict[str, Any]] = {}
        for name in names:
            methods[name] = {
                key: (folds[name][key].value() if key in folds[name] else None)
                for key in settings.metrics
            }
            curves[name] = {}
            for fold in folds[name].values():
                methods[name].update(fold.extras())
                curves[name].update(fold.curves())
        per_image: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        indices = {name: best[name].best_index() for name in names}
        for record in records:
            if record["status"] == "ok":
                for name in names:
                    per_image[name] += _per_image(
                        record, record["methods"][name], indices[name], settings.thresholds
                    )
        return {
            "n_images": n_images,
            "n_instances": n_instances,
            "n_failed": len(errors),
            "model": self.model_name,
            "annotations": self.source,
            "metrics": list(settings.metrics),
            "methods": methods,
            "curves": curves,
            "sanity": {},
            "per_image": per_image,
            "errors": errors,
            "settings": settings.as_dict(),
        }


class _EvaluateWorker:
    """The model and the methods, made once; batches of annotated images in, records out."""

    def __init__(self, task: EvaluateTask) -> None:
        self.task = task
        self.classifier = worker_model(task.model)
        self.methods = build_methods(self.classifier, task.methods, task.layer, task.method_options)
        self.settings = task.metric_settings
        chosen = [MEASUREMENTS[name] for name in self.settings.measurements]
        self.instance_measures = [m.compute for m in chosen if m.scope == "instance"]
        self.image_measures = [m.compute for m in chosen if m.scope == "image"]
        self.batch_measures = [m.compute for m in chosen if m.scope == "batch"]

    def load(self, item: Item) -> Image.Image | ImageLoadError:
        """The decoded image, or the error that prevented it."""
        try:
            return load_annotated_image(item[1].annotation, self.task.max_pixels)
        except ImageLoadError as error:
            return error

    def process(
        self, batch: Sequence[Item], loaded: Sequence[Image.Image | ImageLoadError]
    ) -> list[dict[str, Any]]:
        records: dict[int, dict[str, Any]] = {}
        good: list[tuple[int, Work, Image.Image]] = []
        for (index, work), image in zip(batch, loaded, strict=True):
            if isinstance(image, ImageLoadError):
                records[index] = _error_record(index, work.annotation, str(image))
            else:
                good.append((index, work, image))
        if good:
            x = self.classifier.preprocess([image for _, _, image in good])
            measured = {method.name: self._measure(method, x, good) for method in self.methods}
            for row, (index, work, _) in enumerate(good):
                records[index] = {
                    "index": index,
                    "image": str(work.annotation.image),
                    "status": "ok",
                    "error": None,
                    "methods": {name: values[row] for name, (values, _) in measured.items()},
                    "arrays": {name: maps[row] for name, (_, maps) in measured.items()},
                }
        return [records[index] for index, _ in batch]

    def _measure(
        self, method: CAMMethod, x: torch.Tensor, good: list[tuple[int, Work, Image.Image]]
    ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        """Per image of the batch: the values of ``method`` and its raw maps (top-1 and the
        annotated classes)."""
        result = method.run(x, _targets_fn([work.class_ids for _, work, _ in good]))
        raw, targets = result.raw.cpu(), result.targets.cpu()
        values = [
            self._measure_image(raw[row], targets[row], work.annotation, image.size)
            for row, (_, work, image) in enumerate(good)
        ]
        if self.batch_measures:
            view = BatchView(
                self.classifier,
                x,
                normalize_maps(raw[:, :1], tuple(x.shape[-2:]))[:, 0],
                targets[:, 0],
                self.settings,
            )
            for measure in self.batch_measures:
                for key, array in measure(view).items():
                    for row, value in enumerate(values):
                        value[key] = array[row].tolist()
        maps = [
            raw[row, : 1 + len(work.class_ids)].numpy().astype(np.float32)
            for row, (_, work, _) in enumerate(good)
        ]
        return values, maps

    def _measure_image(
        self,
        raw: torch.Tensor,
        targets: torch.Tensor,
        annotation: Annotation,
        size: tuple[int, int],
    ) -> dict[str, Any]:
        """One image's values: the instance measurements per annotated class, then the image
        measurements."""
        width, height = size
        predicted = int(targets[0])
        top_map = normalize_maps(raw[None, :1], (height, width))[0, 0].numpy()
        instances = []
        for column, label in enumerate(annotation.classes(), start=1):
            class_id = int(targets[column])
            heatmap = (
                top_map
                if class_id == predicted
                else normalize_maps(raw[None, column : column + 1], (height, width))[0, 0].numpy()
            )
            instances.append(
                InstanceView(label, class_id, heatmap, annotation.boxes_for(label), self.settings)
            )
        view = ImageView(annotation, predicted, top_map, instances, self.settings)
        values: dict[str, Any] = {
            "predicted": predicted,
            "predicted_label": self.classifier.label(predicted),
        }
        for measure in self.image_measures:
            values.update(measure(view))
        entries = []
        for instance in instances:
            entry: dict[str, Any] = {"label": instance.label, "class": instance.class_id}
            for measure in self.instance_measures:
                entry.update(measure(instance))
            entries.append(entry)
        values["instances"] = entries
        return values


def _targets_fn(
    ids_per_image: list[tuple[int | None, ...]],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Target columns: [top-1, annotated class 1, ...], unlabelled or padding -> top-1."""
    width = max(len(ids) for ids in ids_per_image)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        top1 = logits.argmax(dim=1).tolist()
        rows = []
        for ids, best in zip(ids_per_image, top1, strict=True):
            row = [best] + [best if c is None else c for c in ids]
            rows.append(row + [best] * (width + 1 - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    return pick


def _error_record(index: int, annotation: Annotation, message: str) -> dict[str, Any]:
    return {"index": index, "image": str(annotation.image), "status": "error", "error": message}


def _per_image(
    record: dict[str, Any], values: dict[str, Any], best_index: int, thresholds: np.ndarray
) -> list[dict[str, Any]]:
    """The ``per_image`` rows of one image for one method: one per annotated class, with the
    IoU at MaxBoxAcc's best map threshold and the image's deletion/insertion areas."""
    faithful = {
        f"{key}_auc": float(auc(np.asarray(values[key]))[0])
        for key in ("deletion", "insertion")
        if key in values
    }
    return [
        {
            "image": record["image"],
            "name": Path(record["image"]).name,
            "label": instance["label"],
            "class": instance["class"],
            "predicted": values["predicted"],
            "predicted_label": values["predicted_label"],
            "iou": float(instance["ious"][best_index]),
            "iou_threshold_map": float(thresholds[best_index]),
            "gt_known_loc": instance["gt_known_loc"],
            "pointing_game": instance["pointing_game"],
            "energy_pointing_game": instance["energy_pointing_game"],
            **faithful,
        }
        for instance in values["instances"]
    ]


# --- inputs and methods ------------------------------------------------------------------------


def read_annotations(
    annotations: str | os.PathLike | Sequence[Annotation], image_root: str | os.PathLike | None
) -> tuple[list[Annotation], str]:
    """The annotations (read from a path, or given) and how the summary names their source."""
    if isinstance(annotations, (str, os.PathLike)):
        return load_annotations(annotations, image_root=image_root), str(annotations)
    items = list(annotations)
    if not all(isinstance(item, Annotation) for item in items):
        raise ConfigError("annotations must be a path or a list of camlens Annotation objects")
    return items, "(in memory)"


def class_ids(annotation: Annotation, classifier: Classifier) -> tuple[int | None, ...]:
    """The class id of each distinct label of ``annotation`` (None for unlabelled).

    Raises:
        ConfigError: a label that is neither a class name of the model nor a class id.
    """
    ids: list[int | None] = []
    for label in annotation.classes():
        if label is None:
            ids.append(None)
            continue
        text = label.strip()
        if text.isdigit() and int(text) < max(len(classifier.labels), 1):
            ids.append(int(text))
            continue
        try:
            ids.append(class_index(text, classifier.labels))
        except ConfigError as error:
            raise ConfigError(
                f"{annotation.source_of(label)}: label {label!r} is not a class of model "
                f"{classifier.name!r}: {error} Labels must be the model's class names or ids."
            ) from None
    return tuple(ids)


def load_annotated_image(
    annotation: Annotation, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """The image of ``annotation``; an ``ImageLoadError`` when it cannot be read (or is over
    the pixel budget) or its size changed since the annotations were read."""
    image = load_image(annotation.image, max_pixels=max_pixels)
    if annotation.size is not None and image.size != tuple(annotation.size):
        raise ImageLoadError(
            f"the image is {image.size[0]}x{image.size[1]} but was "
            f"{annotation.size[0]}x{annotation.size[1]} when the annotations were read"
        )
    return image


def build_methods(
    classifier: Classifier,
    methods: Sequence[str | CAMMethod] | str,
    layer: str | None = None,
    options: dict[str, Any] | None = None,
) -> list[CAMMethod]:
    """Method instances for ``methods`` (names, instances, a comma-separated string or
    ``"all"``), one per distinct method, in order. Each method made here receives the
    ``options`` its class takes (``camlens.methods.options_for``: ``smooth``: gradient
    methods; ``eigen_smooth``: channel-weighted ones; ``max_channels``: Score-CAM and
    Ablation-CAM); an option that none of them takes is a ``ConfigError``. Instances are used
    as they are.

    Example:
        >>> from camlens.models import load_model
        >>> model = load_model("efficientnet_lite0")
        >>> [m.name for m in build_methods(model, "cam,scorecam", options={"max_channels": 8})]
        ['cam', 'scorecam']
    """
    options = dict(options or {})
    used: set[str] = set()
    instances = []
    for item in distinct_methods(methods, classifier.module):
        if isinstance(item, CAMMethod):
            instances.append(item)
            continue
        taken = options_for(get_method(item), options)
        used.update(taken)
        instances.append(make_method(classifier, item, layer, **taken))
    unused = [k for k in options if k not in used]
    if unused:
        raise ConfigError(
            f"none of the methods {', '.join(m.name for m in instances)} takes the option(s) "
            f"{', '.join(unused)}"
        )
    return instances


def distinct_methods(
    methods: Sequence[str | CAMMethod] | str, module: nn.Module | None = None
) -> list[str | CAMMethod]:
    """The distinct methods of ``methods`` (names, instances, a comma-separated string or
    ``"all"``: every registered method, or with ``module`` every one that can explain it,
    ``camlens.methods.methods_for``) in order: canonical names, or the instances.

    Example:
        >>> distinct_methods("cam, Grad-CAM,cam")
        ['cam', 'gradcam']
    """
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    items = [n.strip() if isinstance(n, str) else n for n in items]
    items = [n for n in items if not isinstance(n, str) or n]
    if items == ["all"]:
        items = list(METHODS) if module is None else methods_for(module)
    if not items:
        raise ConfigError("no method selected")
    chosen: dict[str, str | CAMMethod] = {}
    for item in items:
        name = item.name if isinstance(item, CAMMethod) else get_method(item).name
        chosen.setdefault(name, item if isinstance(item, CAMMethod) else name)
    return list(chosen.values())


# --- the sanity step ---------------------------------------------------------------------------


def sanity_check(
    classifier: Classifier,
    annotations: Sequence[Annotation],
    methods: Sequence[str],
    settings: MetricSettings,
    *,
    n_images: int = 8,
    layer: str | None = None,
    stages: int | Sequence[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Adebayo's cascading randomisation of every method on the first ``n_images`` readable
    images (those with an ok record), when a sanity metric was chosen; ``{}`` otherwise. It
    re-initialises copies of the model, so it runs in this process, after the pipeline."""
    if not any(REGISTRY[name].sanity is not None for name in settings.metrics):
        return {}
    images = []
    for annotation in annotations:
        if len(images) >= n_images:
            break
        try:
            images.append(load_annotated_image(annotation))
        except ImageLoadError:
            continue
    if not images:
        return {}
    x = classifier.preprocess(images)
    return {
        name: [
            stage.as_dict()
            for stage in cascading_randomization(
                classifier, x, name, layer=layer, stages=stages, seed=settings.seed
            )
        ]
        for name in methods
    }


def add_sanity(summary: dict[str, Any], sanity: dict[str, list[dict[str, Any]]]) -> None:
    """Put the sanity step's result into a summary made by ``EvaluateTask.fold``: its stages,
    and the sanity metrics' values (from the registry's entries)."""
    summary["sanity"] = sanity
    for name, values in summary["methods"].items():
        stages = sanity.get(name)
        if not stages:
            continue
        for key in values:
            metric = REGISTRY.get(key)
            if metric is not None and metric.sanity is not None:
                values[key] = metric.sanity(stages)
