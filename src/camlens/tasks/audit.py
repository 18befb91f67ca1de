"""The audit's map pass as a task: every image's map on the audit grid, folded into the
statistics the shortcut search needs.

Per image (``process``): decode, run the method for the image's audited class (its folder's
class, or the predicted class), and keep one record: ``input``, ``status``, ``error``,
``class`` (the audited class), ``predicted`` (top-1), ``size`` (original ``[width, height]``),
``layer``, ``feature_size`` (``[h, w]`` of the raw maps), and ``arrays``: ``map``, the
normalised map on the ``grid x grid`` audit grid (float32), and ``thumb``, the image at
64 x 64 in [0, 1] (float16, for the classes' mean images; 8-bit pictures lose nothing to it);
unless the pattern search is off, ``regions``, the map's small hot regions (R, 5) float32
(``x0, y0, x1, y1`` as fractions and the peak, ``camlens.shortcuts.moving.hot_regions``), and
``region_features``, the feature layer's vector at each region's peak (R, C) float16.
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
from camlens.errors import ConfigError
from camlens.hooks import LayerCapture, get_layer
from camlens.io.annotations import Annotation
from camlens.localize import normalize_maps
from camlens.methods import make_method
from camlens.models import Classifier
from camlens.pipeline import Item, OutputFolder, model_for_actors
from camlens.shortcuts.core import THUMB_SIDE, AuditFold, AuditSettings, AuditSummary
from camlens.shortcuts.moving import hot_regions, region_features
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
        regions=_regions(records),
    )


def _regions(records: Sequence[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Each record's hot regions and their features (None when a record has none stored:
    the pattern search was off)."""
    regions = []
    for record in records:
        arrays = record["arrays"]
        if "regions" not in arrays:
            return None
        regions.append(
            (
                np.asarray(arrays["regions"], dtype=np.float64),
                np.asarray(arrays["region_features"], dtype=np.float32),
            )
        )
    return regions


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
            result, activations = self._run(x, target)
            maps = normalize_maps(result.raw[:, :1].float(), (self.grid, self.grid))[:, 0].cpu()
            regions = self._regions(maps, activations)
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
                        **(regions[row] if regions is not None else {}),
                    },
                }
        return [records[index] for index, _ in batch]

    def _run(self, x: torch.Tensor, target: Any) -> tuple[Any, torch.Tensor | None]:
        """The method's result and, for the pattern search, the feature layer's output of the
        same forward pass (its first call: the clean input's, also for methods that run more);
        None when the search is off or the method has no single feature layer (attention
        rollout reads attention): such an audit has no moving patterns."""
        head = None if self.task.search.patterns.mode == "off" else self._feature_head(x)
        if head is None:
            return self.method.run(x, target), None
        layer = get_layer(self.classifier.module, head.feature_layer)
        with LayerCapture(layer, call=head.call_index, layout=head.layout) as capture:
            result = self.method.run(x, target)
        try:
            activation = capture.activation.detach()
        except ConfigError:  # the layer did not run on this call
            return result, None
        return result, activation if activation.ndim == 4 else None

    def _feature_head(self, x: torch.Tensor) -> Any:
        """The head of the layer the maps come from, or None when it is not one layer."""
        try:
            head = self.method.resolve_heads(x)[-1]
            get_layer(self.classifier.module, head.feature_layer)
        except ConfigError:
            return None
        return head

    def _regions(
        self, maps: torch.Tensor, activations: torch.Tensor | None
    ) -> list[dict[str, np.ndarray]] | None:
        """Per image, its small hot regions and their feature vectors (see the module
        docstring); None when the pattern search is off."""
        if activations is None:
            return None
        found = [hot_regions(m, **self._region_options) for m in maps.numpy()]
        cells = [(i, r, c) for i, regions in enumerate(found) for _, _, (r, c) in regions]
        features = region_features(activations, cells, self.grid).numpy().astype(np.float16)
        out, start = [], 0
        for regions in found:
            boxes = np.array([[*box, peak] for box, peak, _ in regions], dtype=np.float32)
            out.append(
                {
                    "regions": boxes.reshape(-1, 5),
                    "region_features": features[start : start + len(regions)],
                }
            )
            start += len(regions)
        return out

    @property
    def _region_options(self) -> dict[str, Any]:
        p = self.task.search.patterns
        return {
            "level": p.level,
            "floor": p.floor,
            "max_area": p.max_area,
            "max_regions": p.max_regions,
        }


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
