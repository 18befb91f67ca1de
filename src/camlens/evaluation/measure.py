"""Per-image records: a batch of annotated images in, one small JSON record per image out
(localisation and faithfulness values); and the sanity check on the first images."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from camlens.api import make_method
from camlens.errors import ConfigError
from camlens.evaluation.registry import _Settings
from camlens.explanation import normalize_maps
from camlens.io import ImageLoadError, load_image
from camlens.io.annotations import Annotation, load_annotations
from camlens.localize import box_from_map
from camlens.methods import METHODS, CAMMethod, get_method
from camlens.metrics import faithfulness as faith
from camlens.metrics import localization as loc
from camlens.metrics.sanity import cascading_randomization
from camlens.models import Classifier
from camlens.targets import class_index

#: One unit of work: (index in the annotation list, its annotation, its class ids).
WorkItem = tuple[int, Annotation, list[int | None]]


def _annotations(
    annotations: str | os.PathLike | Sequence[Annotation], image_root: str | os.PathLike | None
) -> tuple[list[Annotation], str]:
    if isinstance(annotations, (str, os.PathLike)):
        return load_annotations(annotations, image_root=image_root), str(annotations)
    items = list(annotations)
    if not all(isinstance(item, Annotation) for item in items):
        raise ConfigError("annotations must be a path or a list of camlens Annotation objects")
    return items, "(in memory)"


def make_methods(
    classifier: Classifier, methods: Sequence[str | CAMMethod] | str, layer: str | None = None
) -> list[CAMMethod]:
    """Method instances for ``methods`` (names, instances, a comma-separated string or
    ``"all"``), one per distinct method, in order.

    Example:
        >>> [m.name for m in make_methods(model, "cam, gradcam,cam")]
        ['cam', 'gradcam']
    """
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    items = [n.strip() if isinstance(n, str) else n for n in items]
    items = [n for n in items if not isinstance(n, str) or n]
    if items == ["all"]:
        items = list(METHODS)
    if not items:
        raise ConfigError("no method selected")
    instances: dict[str, CAMMethod] = {}
    for item in items:
        if isinstance(item, CAMMethod):
            instances.setdefault(item.name, item)
            continue
        name = get_method(item).name
        if name not in instances:
            instances[name] = make_method(classifier, name, layer)
    return list(instances.values())


def _class_ids(item: Annotation, classifier: Classifier) -> list[int | None]:
    """Class id of each distinct label of ``item`` (None for unlabelled)."""
    ids = []
    for label in item.classes():
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
                f"{item.source_of(label)}: label {label!r} is not a class of model "
                f"{classifier.name!r}: {error} Labels must be the model's class names or ids."
            ) from None
    return ids


def _targets_fn(ids_per_image: list[list[int | None]]) -> Callable[[torch.Tensor], torch.Tensor]:
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


class _BatchEvaluator:
    """Turns batches of annotated images into records (see the module docstring): load,
    preprocess, run every method once per batch, measure. Used in-process by the local engine
    and by each actor of the Ray engine."""

    def __init__(
        self, classifier: Classifier, methods: Sequence[CAMMethod], settings: _Settings
    ) -> None:
        self.classifier = classifier
        self.methods = list(methods)
        self.settings = settings

    def records(self, batch: Sequence[WorkItem]) -> list[dict[str, Any]]:
        """One record per item of ``batch``, in order."""
        return self.measure(batch, [self.load(work) for work in batch])

    @staticmethod
    def load(work: WorkItem) -> Image.Image | ImageLoadError:
        """The decoded image of one item, or the error that prevented it."""
        try:
            return _load(work[1])
        except ImageLoadError as error:
            return error

    def measure(
        self, batch: Sequence[WorkItem], images: Sequence[Image.Image | ImageLoadError]
    ) -> list[dict[str, Any]]:
        """The records of ``batch`` from its ``images`` (as ``load`` returns them), in order."""
        records: dict[int, dict[str, Any]] = {}
        loaded: list[tuple[WorkItem, Image.Image]] = []
        for work, image in zip(batch, images, strict=True):
            if isinstance(image, ImageLoadError):
                records[work[0]] = _error_record(work[0], work[1], str(image))
            else:
                loaded.append((work, image))
        if loaded:
            x = self.classifier.preprocess([image for _, image in loaded])
            measured = {method.name: self._measure(method, x, loaded) for method in self.methods}
            for row, ((index, item, _), _) in enumerate(loaded):
                records[index] = {
                    "index": index,
                    "image": str(item.image),
                    "status": "ok",
                    "error": None,
                    "methods": {name: values[row] for name, values in measured.items()},
                }
        return [records[index] for index, _, _ in batch]

    def _measure(
        self, method: CAMMethod, x: torch.Tensor, loaded: list[tuple[WorkItem, Image.Image]]
    ) -> list[dict[str, Any]]:
        """Per image of the batch: what the summary needs of ``method``."""
        result = method.run(x, _targets_fn([ids for (_, _, ids), _ in loaded]))
        raw, targets = result.raw.cpu(), result.targets.cpu()
        values = [
            _localize(self.classifier, raw[row], targets[row], item, image.size, self.settings)
            for row, ((_, item, _), image) in enumerate(loaded)
        ]
        maps = normalize_maps(raw[:, :1], tuple(x.shape[-2:]))[:, 0]
        faithful = _faithfulness(self.classifier, x, maps, targets[:, 0], self.settings)
        for key, array in faithful.items():
            for row, value in enumerate(values):
                value[key] = array[row].tolist()
        return values


def _load(item: Annotation) -> Image.Image:
    image = load_image(item.image)
    if item.size is not None and image.size != tuple(item.size):
        raise ImageLoadError(
            f"the image is {image.size[0]}x{image.size[1]} but was "
            f"{item.size[0]}x{item.size[1]} when the annotations were read"
        )
    return image


def _error_record(index: int, item: Annotation, message: str) -> dict[str, Any]:
    return {"index": index, "image": str(item.image), "status": "error", "error": message}


def _localize(
    classifier: Classifier,
    raw: torch.Tensor,
    targets: torch.Tensor,
    item: Annotation,
    size: tuple[int, int],
    settings: _Settings,
) -> dict[str, Any]:
    """One image's localisation values: per annotated class, the IoUs at every map threshold
    and the box, point and energy values; the top-1 hit; the pixel histograms (masks)."""
    width, height = size
    predicted = int(targets[0])
    top_map = normalize_maps(raw[None, :1], (height, width))[0, 0].numpy()
    masks = item.class_masks() if settings.wants("pxap", "mask_iou") else {}
    pixels: loc.PixelPrecisionRecall | None = None
    instances, gt_classes, gt_boxes = [], [], []
    for column, label in enumerate(item.classes(), start=1):
        class_id = int(targets[column])
        boxes = item.boxes_for(label)
        gt_classes += [class_id] * len(boxes)
        gt_boxes += boxes
        heatmap = (
            top_map
            if class_id == predicted
            else normalize_maps(raw[None, column : column + 1], (height, width))[0, 0].numpy()
        )
        mask = item.mask_for(label) if masks else None
        if mask is not None:
            if mask.shape != (height, width):
                raise ConfigError(
                    f"{item.source_of(label)}: mask is {mask.shape[1]}x{mask.shape[0]} but the "
                    f"image is {width}x{height}"
                )
            if pixels is None:
                pixels = loc.PixelPrecisionRecall(settings.thresholds)
            pixels.add(heatmap, mask)
        box = box_from_map(heatmap, settings.threshold)
        ious, ious_all = loc.threshold_ious_both(heatmap, boxes, settings.thresholds)
        instance = {
            "label": label,
            "class": class_id,
            "ious": ious.tolist(),
            "gt_known_loc": box is not None and float(loc.box_iou([box], boxes).max()) >= 0.5,
            "pointing_game": loc.pointing_game(heatmap, boxes, tolerance=settings.tolerance),
            "energy_pointing_game": loc.energy_pointing_game(heatmap, boxes),
        }
        if settings.wants("maxboxacc_v2"):
            instance["ious_all"] = ious_all.tolist()
        instances.append(instance)
    if None in item.classes():
        gt_classes = [predicted if c is None else c for c in gt_classes]
    top_box = box_from_map(top_map, settings.threshold)
    values = {
        "predicted": predicted,
        "predicted_label": classifier.label(predicted),
        "top1_loc": loc.top1_localization(predicted, top_box, gt_classes, gt_boxes),
        "instances": instances,
    }
    if pixels is not None:
        values["pixels"] = {
            "object": pixels.object_hist.astype(np.int64).tolist(),
            "background": pixels.background_hist.astype(np.int64).tolist(),
            "n": pixels.n_images,
        }
    return values


def _faithfulness(
    classifier: Classifier,
    x: torch.Tensor,
    maps: torch.Tensor,
    top1: torch.Tensor,
    settings: _Settings,
) -> dict[str, np.ndarray]:
    """The batch's faithfulness values, one row per image: ``deletion`` and ``insertion``
    curves, ``full`` and ``masked`` scores, ``road_morf`` and ``road_lerf`` scores."""
    common = {"batch_size": settings.batch_size, "score": settings.score}
    values: dict[str, np.ndarray] = {}
    if settings.wants("deletion_auc"):
        values["deletion"] = faith.deletion_curve(
            classifier, x, maps, top1, steps=settings.steps, baseline=settings.deletion_baseline,
            **common,
        )  # fmt: skip
    if settings.wants("insertion_auc"):
        values["insertion"] = faith.insertion_curve(
            classifier, x, maps, top1, steps=settings.steps, baseline=settings.insertion_baseline,
            **common,
        )  # fmt: skip
    if settings.wants("average_drop", "increase_in_confidence", "average_gain"):
        values["full"], values["masked"] = faith.masked_scores(classifier, x, maps, top1, **common)
    if settings.wants("road_morf", "road_lerf", "road_combined"):
        for order in ("morf", "lerf"):
            values[f"road_{order}"] = faith.road_scores(
                classifier, x, maps, top1, order=order, fractions=settings.road_fractions,
                seed=settings.seed, **common,
            )  # fmt: skip
    return values


def _sanity(
    classifier: Classifier,
    items: Sequence[Annotation],
    records: Callable[[], Iterable[dict[str, Any]]],
    instances: Sequence[CAMMethod],
    settings: _Settings,
    n_images: int,
    layer: str | None,
    stages: int | Sequence[str] | None,
) -> dict[str, list[dict]]:
    """Cascading randomisation of every method on the first ``n_images`` readable images (run
    here, whatever the engine: it re-initialises copies of the model)."""
    if not settings.wants("sanity_spearman", "sanity_ssim"):
        return {}
    images = []
    for record in records():
        if len(images) >= n_images:
            break
        if record["status"] == "ok":
            images.append(load_image(items[record["index"]].image))
    if not images:
        return {}
    x = classifier.preprocess(images)
    return {
        method.name: [
            stage.as_dict()
            for stage in cascading_randomization(
                classifier, x, method.name, layer=layer, stages=stages, seed=settings.seed
            )
        ]
        for method in instances
    }
