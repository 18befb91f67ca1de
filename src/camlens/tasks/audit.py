"""The audit's map pass as a task: every image's map on the audit grid, folded into the
statistics the shortcut search needs.

Per image (``process``): decode, run the method for the image's audited class (its folder's
class, or the predicted class), and keep one record: ``input``, ``status``, ``error``,
``class`` (the audited class), ``predicted`` (top-1), ``size`` (original ``[width, height]``),
``layer``, ``feature_size`` (``[h, w]`` of the raw maps), and ``arrays``: ``map``, the
normalised map on the ``grid x grid`` audit grid (float32), and ``thumb``, the image at
64 x 64 in [0, 1] (float16, for the classes' mean images; 8-bit pictures lose nothing to it).
Nothing at the input size leaves ``process``. With an output folder the arrays go to
``maps/part-<first index>.npz`` beside ``maps.jsonl`` (about 28 kB per image, mostly the
thumbnail); a killed audit resumes after its last complete batch.

``fold`` (pure, no model): the statistics, hotspots and SpRAy clusters of
``camlens.shortcuts.core.AuditFold``, an ``AuditSummary``. The records are folded as they are
stored (float32 maps, float16 thumbnails), whether or not there is an output folder, and in
groups of a fixed size whatever the batch size, so the result depends on neither.

The counterfactual tests that confirm a hotspot run the model, so they come after the fold
(``camlens.shortcuts.counterfactuals``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from camlens.defaults import DEFAULT_MAX_PIXELS
from camlens.io.annotations import Annotation
from camlens.localize import normalize_maps
from camlens.methods import make_method
from camlens.models import Classifier
from camlens.pipeline import Item, OutputFolder, model_for_actors
from camlens.shortcuts.core import THUMB_SIDE, AuditFold, AuditSettings, AuditSummary
from camlens.tasks.common import Loaded, load_input, model_settings, worker_model

__all__ = ["FOLD_GROUP", "AuditInput", "AuditTask", "AuditWorker", "error_record"]

#: ``(source, class)``: an image file and its audited class (None: the predicted class).
AuditInput = tuple[str, int | None]

#: Images folded together (a fixed number, so the result does not depend on the batch size).
FOLD_GROUP = 64


@dataclass(frozen=True)
class AuditTask:
    """The audit's map pass (see the module docstring).

    Attributes:
        model: the ``Classifier`` (or a ``load_model`` spec, for Ray actors).
        method, layer, method_options: the map method, as in ``camlens.explain``.
        search: the audit's settings (the grid; the fold's parameters).
        seed: seeds the SpRAy samples and clustering.
        labels: the model's class names (for the fold; default: the model's).
        annotations: boxes or masks for the fold (never sent to Ray actors).
        audited: the classes to search (None: all).
        described: further settings a resume must match (the data folder, how classes were
            found, the annotations' file...), recorded with the task's own.
        max_pixels: the pixel budget of an image (larger ones are error records).
    """

    model: Classifier | str
    method: str = "cam"
    layer: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    search: AuditSettings = field(default_factory=AuditSettings)
    seed: int = 0
    labels: tuple[str, ...] = ()
    annotations: tuple[Annotation, ...] = ()
    audited: frozenset[int] | None = None
    described: dict[str, Any] = field(default_factory=dict)
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    name: ClassVar[str] = "audit-maps"
    records_file: ClassVar[str] = "maps.jsonl"
    parts_dir: ClassVar[str] = "maps"

    def settings(self) -> dict[str, Any]:
        return {
            **model_settings(self.model),
            "method": self.method,
            "method_options": self.method_options,
            "layer": self.layer,
            **self.described,
            "seed": self.seed,
            **asdict(self.search),
            "max_pixels": self.max_pixels,
        }

    def describe(self, item: AuditInput) -> Any:
        source, cls = item
        return [str(source), cls]

    def start(self, folder: OutputFolder | None) -> AuditWorker:
        return AuditWorker(self)

    def for_actors(self) -> AuditTask:
        model = model_for_actors(self.model) if isinstance(self.model, Classifier) else self.model
        return replace(self, model=model, annotations=())

    def class_names(self) -> list[str]:
        """The model's class names."""
        if self.labels:
            return list(self.labels)
        if isinstance(self.model, Classifier):
            return list(self.model.labels)
        raise ValueError("AuditTask.fold needs the class names: give labels=")

    def fold(self, records: Iterable[dict[str, Any]]) -> AuditSummary:
        """The statistics, hotspots and SpRAy clusters of the map pass; pure, no model."""
        fold = AuditFold(
            self.search,
            self.class_names(),
            seed=self.seed,
            annotations=self.annotations,
            audited=self.audited,
            layer=self.layer,
        )
        with fold:
            group: list[tuple[int, dict[str, Any]]] = []
            for index, record in enumerate(records):
                if record.get("status") != "ok":
                    fold.add_error(record["input"], record.get("error"))
                    continue
                group.append((index, record))
                if len(group) == FOLD_GROUP:
                    _fold_group(fold, group)
                    group = []
            _fold_group(fold, group)
            return fold.finish()


def _fold_group(fold: AuditFold, group: Sequence[tuple[int, dict[str, Any]]]) -> None:
    if not group:
        return
    records = [record for _, record in group]
    last = records[-1]
    fold.add(
        [index for index, _ in group],
        [record["input"] for record in records],
        np.stack([np.asarray(record["arrays"]["map"], dtype=np.float32) for record in records]),
        [int(record["class"]) for record in records],
        [int(record["predicted"]) for record in records],
        [tuple(record["size"]) for record in records],
        np.stack([np.asarray(record["arrays"]["thumb"], dtype=np.float32) for record in records]),
        layer=last.get("layer"),
        feature_size=last.get("feature_size"),
    )


class AuditWorker:
    """The model and the method, made once; batches of images in, one record per image out.

    Example:
        >>> import camlens
        >>> worker = AuditTask(camlens.load_model("runs/shapes")).start(None)
        >>> batch = [(0, ("shapes/images/square/square_0000.png", 1)), (1, ("missing.png", 1))]
        >>> records = worker.process(batch, [worker.load(item) for item in batch])
        >>> [r["status"] for r in records], records[0]["class"], records[0]["feature_size"]
        (['ok', 'error'], 1, [8, 8])
        >>> records[0]["arrays"]["map"].shape, records[0]["arrays"]["thumb"].shape  # grid, thumb
        ((32, 32), (3, 64, 64))
    """

    def __init__(self, task: AuditTask) -> None:
        self.task = task
        self.classifier = worker_model(task.model)
        self.method = make_method(self.classifier, task.method, task.layer, **task.method_options)
        self.grid = task.search.grid
        self._mean = torch.tensor(self.classifier.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.classifier.std, dtype=torch.float32).view(1, -1, 1, 1)

    def load(self, item: Item) -> Loaded:
        index, (source, _) = item
        return load_input(self.classifier, index, source, max_pixels=self.task.max_pixels)

    def process(self, batch: Sequence[Item], loaded: Sequence[Loaded]) -> list[dict[str, Any]]:
        records = {
            item.index: error_record(item.source, item.error) for item in loaded if item.error
        }
        good = [
            (item, cls)
            for (_, (_, cls)), item in zip(batch, loaded, strict=True)
            if item.error is None
        ]
        if good:
            x = torch.cat([item.tensor for item, _ in good])
            known = [cls for _, cls in good]
            target = "top1" if known[0] is None else torch.tensor(known)  # one source per audit
            result = self.method.run(x, target)
            maps = normalize_maps(result.raw[:, :1].float(), (self.grid, self.grid))[:, 0].cpu()
            images = (x.float().cpu() * self._std + self._mean).clamp(0, 1)
            thumbs = F.interpolate(
                images, size=(THUMB_SIDE, THUMB_SIDE), mode="bilinear", antialias=True
            ).clamp(0, 1)
            classes = result.targets[:, 0].cpu().tolist()
            predicted = result.logits.float().argmax(dim=1).cpu().tolist()
            feature_size = [int(result.raw.shape[-2]), int(result.raw.shape[-1])]
            for row, (item, _) in enumerate(good):
                width, height = item.image.size
                records[item.index] = {
                    "input": item.source,
                    "status": "ok",
                    "error": None,
                    "class": int(classes[row]),
                    "predicted": int(predicted[row]),
                    "size": [int(width), int(height)],
                    "layer": result.layer,
                    "feature_size": feature_size,
                    "arrays": {
                        "map": maps[row].numpy().astype(np.float32),
                        "thumb": thumbs[row].numpy().astype(np.float16),
                    },
                }
        return [records[index] for index, _ in batch]


def error_record(source: str, message: str | None) -> dict[str, Any]:
    """The record of an image that could not be read."""
    return {
        "input": source,
        "status": "error",
        "error": message,
        "class": None,
        "predicted": None,
        "size": None,
        "layer": None,
        "feature_size": None,
    }
