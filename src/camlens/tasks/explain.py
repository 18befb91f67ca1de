"""The explain task: every input's maps as overlays and raw maps, and its record.

Per input (``process``): decode, run the method on the batch, write the overlay of every
explained class (``overlays/<n>_<name>_c<class>.png``), the raw maps (``raw/<n>_<name>.npz``)
and, on request, a figure with all maps side by side (``figures/<n>_<name>.png``); the record
is one line of ``results.jsonl`` (see the README's contract). ``fold`` counts the records; the
gallery (``index.html``) is drawn from the records by ``camlens.report.gallery``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from camlens.defaults import DEFAULT_MAX_PIXELS, DEFAULT_OVERLAY_SIZE
from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.io.medical import dicom_uid, is_dicom_path
from camlens.methods import make_method
from camlens.models import Classifier
from camlens.pipeline import Item, OutputFolder
from camlens.render import colorize, gradient_picture, save_figure, topk_figure
from camlens.targets import NOT_A_CLASS, Target, bind_target, check_target
from camlens.tasks.common import (
    FileWritingTask,
    Loaded,
    load_input,
    method_settings,
    output_stem,
    worker_model,
)
from camlens.writers import write_npz, write_png

__all__ = ["ExplainTask", "Style", "error_record", "output_threads", "write_image_outputs"]

#: Figures are drawn by one thread at a time (matplotlib is not thread-safe).
_MATPLOTLIB = threading.Lock()


@dataclass(frozen=True)
class Style:
    """How overlays look: matplotlib colormap, opacity, the box threshold, and the longest
    side of an overlay (``overlay_size``; 0: the original size; boxes stay in original pixels).

    Example:
        >>> Style(colormap="inferno").check().colormap
        'inferno'
    """

    colormap: str = "jet"
    alpha: float = 0.5
    threshold: float = 0.2
    overlay_size: int = DEFAULT_OVERLAY_SIZE

    def check(self) -> Style:
        """This style, after checking it (an unknown colormap is a ``ConfigError``)."""
        colorize(torch.zeros(1, 1).numpy(), self.colormap)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"the box threshold must be in [0, 1), got {self.threshold}")
        if self.overlay_size < 0:
            raise ConfigError(f"overlay_size must be >= 0 (0: original), got {self.overlay_size}")
        return self


@dataclass(frozen=True)
class ExplainTask(FileWritingTask):
    """Explain every input (see the module docstring).

    Attributes:
        model: the ``Classifier`` (or a ``load_model`` spec, for Ray actors).
        method, target, layer, method_options: as in ``camlens.explain``.
        style: how overlays look.
        figures: also write one figure per input with all its maps side by side.
        max_pixels: the pixel budget of an input (larger ones are error records).
        window: ``(center, width)``, the grey-level window of 16-bit images and DICOM files
            (overrides a DICOM file's own; ``None``: the file's, else the image's min..max).
        keep_uid: a DICOM input's record gets its ``"sop_instance_uid"`` (off by default: the
            record names the file only, and no patient or private tag is ever written).
    """

    model: Classifier | str
    method: str = "cam"
    target: Target = "top1"
    layer: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    style: Style = field(default_factory=Style)
    figures: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    window: tuple[float, float] | None = None
    keep_uid: bool = False

    name: ClassVar[str] = "explain"
    records_file: ClassVar[str] = "results.jsonl"
    parts_dir: ClassVar[str] = "parts"

    def settings(self) -> dict[str, Any]:
        return {
            **method_settings(self),
            "figures": self.figures,
            "max_pixels": self.max_pixels,
            # only when set, so that the settings of earlier runs still match on --resume
            **({"window": list(self.window)} if self.window is not None else {}),
            **({"keep_uid": True} if self.keep_uid else {}),
        }

    def start(self, folder: OutputFolder | None) -> _ExplainWorker:
        return _ExplainWorker(self, self.require_folder(folder))


@dataclass
class _Computed:
    """A batch after the model (``_ExplainWorker.compute``), before its files are written."""

    batch: Sequence[Item]
    loaded: Sequence[Loaded]
    good: list[Loaded]
    explanation: Explanation | None = None
    pictures: torch.Tensor | None = None
    heats: list[np.ndarray] = field(default_factory=list)


class _ExplainWorker:
    """The model and the method, made once; batches of paths in, records (and files) out."""

    def __init__(self, task: ExplainTask, folder: OutputFolder) -> None:
        self.task = task
        self.folder = folder
        self.classifier = worker_model(task.model)
        self.method = make_method(self.classifier, task.method, task.layer, **task.method_options)
        check_target(task.target, self.classifier.labels)
        self.target = bind_target(
            task.target,
            multilabel=self.classifier.multilabel,
            threshold_prob=self.classifier.threshold_prob,
        )

    def load(self, item: Item) -> Loaded:
        index, source = item
        return load_input(
            self.classifier,
            index,
            source,
            max_pixels=self.task.max_pixels,
            display_side=self.task.style.overlay_size or None,
            window=self.task.window,
        )

    def process(self, batch: Sequence[Item], loaded: Sequence[Loaded]) -> list[dict[str, Any]]:
        return self.finish(self.compute(batch, loaded))

    def compute(self, batch: Sequence[Item], loaded: Sequence[Loaded]) -> _Computed:
        """The model's part of a batch: the maps, and every torch computation the files need
        (torch work stays in the engine's thread; ``finish`` gets arrays)."""
        good = [item for item in loaded if item.error is None]
        if not good:
            return _Computed(batch, loaded, good)
        x = torch.cat([item.tensor for item in good])
        explanation = Explanation.from_result(
            self.method.run(x, self.target),
            self.method.name,
            tuple(x.shape[2:]),
            self.classifier.labels,
            images=[item.image for item in good],
            sources=[item.source for item in good],
            sizes=[item.size for item in good],
            multilabel=self.classifier.multilabel,
            threshold_prob=self.classifier.threshold_prob,
        )
        pictures = getattr(self.method, "picture_gradients", lambda: None)()
        heats = [explanation.display_maps(i) for i in range(len(good))]
        explanation.maps  # noqa: B018 (computed here, in torch's thread, for the boxes)
        return _Computed(batch, loaded, good, explanation, pictures, heats)

    def finish(self, computed: _Computed) -> list[dict[str, Any]]:
        """Write the batch's overlays, raw maps (and figures) and return its records."""
        records = {
            item.index: error_record(item.source, item.error)
            for item in computed.loaded
            if item.error
        }
        good, explanation = computed.good, computed.explanation

        def write(i: int) -> dict[str, Any]:
            return write_image_outputs(
                explanation,
                i,
                output_stem(good[i].index, good[i].source),
                self.folder,
                self.task.style,
                figures=self.task.figures,
                guided=None if computed.pictures is None else computed.pictures[i],
                heat=computed.heats[i],
            )

        # Colour mapping, PNG and npz encoding release the GIL: the batch's images are
        # written in parallel (the records wait for all their files).
        threads = output_threads(len(good))
        if threads <= 1:
            written = [write(i) for i in range(len(good))]
        else:
            with ThreadPoolExecutor(threads) as pool:
                written = list(pool.map(write, range(len(good))))
        for item, record in zip(good, written, strict=True):
            records[item.index] = self._medical_fields(item, record)
        return [records[index] for index, _ in computed.batch]

    def _medical_fields(self, item: Loaded, record: dict[str, Any]) -> dict[str, Any]:
        """The record of a DICOM or 16-bit input: the grey-level window applied (``"window"``:
        ``[center, width]``; absent for 8-bit and colour images and DICOM VOI LUTs) and, with
        ``keep_uid``, a DICOM file's ``"sop_instance_uid"``. Nothing else of a DICOM file's
        header reaches the record."""
        window = item.image.info.get("window") if item.image is not None else None
        if isinstance(window, tuple):  # set by camlens' decoders (a PNG's text chunk is a str)
            record["window"] = [round(float(value), 6) for value in window]
        if self.task.keep_uid and is_dicom_path(item.source):
            record["sop_instance_uid"] = dicom_uid(item.source)
        return record


def output_threads(n_images: int) -> int:
    """Threads that write a batch's outputs: one per core (at most 4), at most one per image."""
    return max(1, min(n_images, 4, len(os.sched_getaffinity(0))))


def write_image_outputs(
    explanation: Explanation,
    i: int,
    stem: str,
    folder: OutputFolder,
    style: Style,
    *,
    figures: bool = False,
    guided: torch.Tensor | None = None,
    heat: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write image ``i``'s overlays, raw maps (and figure) into ``folder``; return its record.

    ``guided`` (K, C, H, W): the input gradients of the guided methods (``guidedbackprop``,
    ``guidedgradcam``), written per class as ``guided/<stem>_c<class>.png`` beside the
    overlay, at the overlay's size (the record's map gets ``"guided"``). ``heat``: the maps at
    the overlay's size (``explanation.display_maps(i)``), when the caller has them.

    Example:
        >>> import camlens
        >>> explanation = camlens.explain("efficientnet_lite0", "cat.jpg")
        >>> folder = OutputFolder("out")
        >>> folder.prepare(resume=False, overwrite=False)  # False: a fresh folder
        False
        >>> record = write_image_outputs(explanation, 0, "00000_cat", folder, Style())
        >>> record["input"], record["raw"], record["maps"][0]["overlay"]
        ('cat.jpg', 'raw/00000_cat.npz', 'overlays/00000_cat_c285.png')
        >>> record["maps"][0]["label"], record["maps"][0]["box"]  # the box in the photo's pixels
        ('Egyptian cat', [0, 0, 415, 300])
    """
    probs = explanation.probs[i]
    predictions = explanation.predictions(i)
    input_boxes = explanation.image_boxes(i, style.threshold)  # once, for record and overlay
    boxes = [explanation.original_box(i, box) for box in input_boxes]
    overlays = explanation.image_overlays(
        i,
        colormap=style.colormap,
        alpha=style.alpha,
        threshold=style.threshold,
        heat=heat,
        boxes=input_boxes,
    )
    maps = []
    for k in explanation.explained(i):  # not the repeats that pad "positive" targets
        class_id, image = int(explanation.targets[i, k]), overlays[k]
        if class_id == NOT_A_CLASS:  # a similarity target: its own label and score
            maps.append(_target_map(explanation, i, k, stem, folder, image, boxes[k]))
            continue
        relative = f"overlays/{stem}_c{class_id}.png"
        write_png(folder.path(relative), image)
        entry = {
            "class": class_id,
            "label": explanation.label(class_id),
            "score": round(float(explanation.scores[i, k]), 6),
            "prob": round(float(probs[class_id]), 6),
            "overlay": relative,
            "box": list(boxes[k]) if boxes[k] is not None else None,
        }
        if explanation.multilabel:  # False: no class reached the threshold (top-1 explained)
            entry["positive"] = bool(probs[class_id] >= explanation.threshold_prob)
        if guided is not None:
            entry["guided"] = f"guided/{stem}_c{class_id}.png"
            picture = gradient_picture(guided[k].float().numpy(), size=image.size)
            write_png(folder.path(entry["guided"]), picture)
        maps.append(entry)
    raw_path = f"raw/{stem}.npz"
    write_npz(
        folder.path(raw_path),
        raw=explanation.raw[i].numpy(),
        targets=explanation.targets[i].numpy(),
        logits=explanation.logits[i].numpy(),
    )
    width, height = explanation.original_size(i)
    record = {
        "input": explanation.source(i),
        "status": "ok",
        "error": None,
        "predictions": predictions,
        "maps": maps,
        "raw": raw_path,
        "method": explanation.method,
        "layer": explanation.layer,
        "size": [width, height],
        "identity_error": explanation.identity_error,
    }
    if figures:
        shown = [overlays[k] for k in explanation.explained(i)]
        record["figure"] = _write_figure(explanation, i, shown, maps, stem, folder)
    return record


def _write_figure(
    explanation: Explanation,
    i: int,
    overlays: list[Image.Image],
    maps: list[dict[str, Any]],
    stem: str,
    folder: OutputFolder,
) -> str:
    titles = [
        f"{m['label']}\np={m['prob']:.2f}" if m["prob"] is not None else _target_title(m)
        for m in maps
    ]
    relative = f"figures/{stem}.png"
    with _MATPLOTLIB:  # matplotlib is not thread-safe
        figure = topk_figure(explanation.display_image(i), overlays, titles)
        save_figure(figure, folder.path(relative))
    return relative


def _target_map(
    explanation: Explanation,
    i: int,
    k: int,
    stem: str,
    folder: OutputFolder,
    image: Image.Image,
    box: Any,
) -> dict[str, Any]:
    """Write the overlay of image ``i``'s target ``k`` that is not a class (a similarity:
    ``overlays/<stem>_similar<k>.png``) and return its map entry: ``class`` null, ``label``
    the target's (``"similar:ref.png"``), ``score`` its score (the cosine similarity),
    ``prob`` null."""
    relative = f"overlays/{stem}_similar{k}.png"
    write_png(folder.path(relative), image)
    return {
        "class": None,
        "label": explanation.target_label(i, k),
        "score": round(float(explanation.scores[i, k]), 6),
        "prob": None,
        "overlay": relative,
        "box": list(box) if box is not None else None,
    }


def _target_title(entry: dict[str, Any]) -> str:
    """A figure title for a target that is not a class: its label and score."""
    return f"{entry['label']}\ns={entry['score']:.2f}"


def error_record(source: str, message: str | None) -> dict[str, Any]:
    """The record of an input that could not be processed."""
    return {
        "input": source,
        "status": "error",
        "error": message,
        "predictions": [],
        "maps": [],
        "raw": None,
    }
