"""The explain task for 3-D volumes: Conv3d classifiers on NIfTI files and DICOM series.

Per input (``process``): read the volume (:func:`camlens.io.volumes.read_volume`), window it,
resize it to the model's input size (D, H, W) and normalise it
(:func:`camlens.io.volumes.volume_batch`); run the method on the batch; then for every
explained class write

* ``montages/<n>_<name>_c<class>.png``: every k-th axial slice of the windowed volume with
  the map over it (:func:`camlens.render.montage`), labelled with the slice index ``d``;
  axial stacks of known orientation are shown as radiologists read them (anterior up, the
  patient's right on the left: :func:`camlens.io.volumes.radiological_flips`; the record's
  ``montage_view`` says ``"radiological"``), others as stored (``"as stored"``);
* ``maps/<n>_<name>_c<class>.nii.gz``: the map in [0, 1] at the volume's own shape, aligned
  with its affine (:func:`camlens.io.volumes.write_volume_map`);

and ``raw/<n>_<name>.npz`` (the raw maps (K, d, h, w), targets, logits). The record (one line
of ``results.jsonl``) has ``kind: "volume"``, the volume's ``shape`` (D, H, W), the
``model_input`` size, the grey-level ``window`` [low, high] shown and fed to the model, and per
class the 3-D box of the largest
connected component above the threshold, in voxels (``box``: ``[x0, y0, z0, x1, y1, z1]``,
x the column, y the row, z the slice, ends exclusive) and, where the volume has an affine,
in world millimetres (``box_world``: RAS+, ``[xmin, ymin, zmin, xmax, ymax, zmax]``).
The maps cover the whole volume (it is resized, never cropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.io import ImageLoadError
from camlens.io.volumes import (
    Volume,
    radiological_flips,
    read_volume,
    volume_batch,
    volume_window,
    windowed,
    write_volume_map,
)
from camlens.layers import is_volume_model, volume_input_channels
from camlens.localize import box3d_from_map, normalize_maps, world_box
from camlens.methods import make_method
from camlens.models import Classifier
from camlens.pipeline import Item, OutputFolder
from camlens.render import montage
from camlens.targets import Target, bind_target, check_target
from camlens.tasks.common import (
    FileWritingTask,
    method_settings,
    output_stem,
    worker_model,
)
from camlens.tasks.explain import Style, error_record
from camlens.writers import write_npz, write_png

__all__ = ["VIDEO_INPUT_SIZE", "VolumeExplainTask", "default_volume_size"]

#: The input size (D, H, W) torchvision's video classifiers (r3d_18, mc3_18, r2plus1d_18)
#: were trained at: 16 frames of 112 x 112.
VIDEO_INPUT_SIZE: tuple[int, int, int] = (16, 112, 112)


def default_volume_size(classifier: Classifier) -> tuple[int, int, int]:
    """The (D, H, W) a volume is resized to for ``classifier`` when none is given.

    ``classifier.info["volume_size"]`` when set; for a ``torchvision:`` model
    :data:`VIDEO_INPUT_SIZE`; else 16 slices of the classifier's ``input_size``.

    Example:
        >>> from torch import nn
        >>> default_volume_size(Classifier(nn.Conv3d(1, 1, 1), ["a"], input_size=(32, 32)))
        (16, 32, 32)
    """
    size = classifier.info.get("volume_size")
    if size is not None:
        return tuple(int(side) for side in size)  # type: ignore[return-value]
    if classifier.name.startswith("torchvision:"):
        return VIDEO_INPUT_SIZE
    return (16, *(int(side) for side in classifier.input_size))  # type: ignore[return-value]


@dataclass(frozen=True)
class VolumeExplainTask(FileWritingTask):
    """Explain every volume (see the module docstring).

    Attributes:
        model: the ``Classifier`` of a Conv3d network (or a ``load_model`` spec, for Ray).
        method, target, layer, method_options: as in ``camlens.explain``; the method must
            explain volumes (``camlens.methods.base.volume_methods``).
        style: colormap, opacity and the box threshold (``overlay_size`` does not apply).
        size: the model's input (D, H, W); None: :func:`default_volume_size`.
        window: ``(center, width)`` of the grey levels the model and the montage see; None:
            each volume's 0.5th .. 99.5th percentile.
        montage_step: show every this many slices in the montage; None: at most 16 tiles.
    """

    model: Classifier | str
    method: str = "cam"
    target: Target = "top1"
    layer: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    style: Style = field(default_factory=Style)
    size: tuple[int, int, int] | None = None
    window: tuple[float, float] | None = None
    montage_step: int | None = None

    name: ClassVar[str] = "explain-volume"
    records_file: ClassVar[str] = "results.jsonl"
    parts_dir: ClassVar[str] = "parts"

    def settings(self) -> dict[str, Any]:
        return {
            **method_settings(self),
            "kind": "volume",
            "size": None if self.size is None else list(self.size),
            "window": None if self.window is None else list(self.window),
            "montage_step": self.montage_step,
        }

    def start(self, folder: OutputFolder | None) -> _VolumeWorker:
        return _VolumeWorker(self, self.require_folder(folder))


@dataclass
class _LoadedVolume:
    index: int
    source: str
    volume: Volume | None = None
    tensor: torch.Tensor | None = None
    error: str | None = None
    window: tuple[float, float] | None = None  # (center, width), found once per volume


class _VolumeWorker:
    """The model and the method, made once; batches of volume paths in, records out."""

    def __init__(self, task: VolumeExplainTask, folder: OutputFolder) -> None:
        self.task = task
        self.folder = folder
        self.classifier = worker_model(task.model)
        if not is_volume_model(self.classifier.module):
            raise ConfigError(
                f"model {self.classifier.name!r} has no nn.Conv3d layer: it cannot read "
                "volumes; give a 3-D model (e.g. --model torchvision:r3d_18 --weights W.pt)"
            )
        self.channels = volume_input_channels(self.classifier.module)
        self.size = task.size or default_volume_size(self.classifier)
        self.method = make_method(self.classifier, task.method, task.layer, **task.method_options)
        self.method.check_volumes()
        check_target(task.target, self.classifier.labels)
        self.target = bind_target(
            task.target,
            multilabel=self.classifier.multilabel,
            threshold_prob=self.classifier.threshold_prob,
        )

    def load(self, item: Item) -> _LoadedVolume:
        index, source = item
        try:
            volume = read_volume(source)
        except ImageLoadError as error:
            return _LoadedVolume(index, str(source), error=str(error))
        low, high = volume_window(volume.voxels, self.task.window)
        window = ((low + high) / 2, high - low)
        tensor = volume_batch(
            volume,
            self.size,
            channels=self.channels,
            mean=self.classifier.mean,
            std=self.classifier.std,
            window=window,
        )
        return _LoadedVolume(index, str(source), volume, tensor, window=window)

    def process(
        self, batch: Sequence[Item], loaded: Sequence[_LoadedVolume]
    ) -> list[dict[str, Any]]:
        good = [item for item in loaded if item.error is None]
        records = {
            item.index: error_record(item.source, item.error) for item in loaded if item.error
        }
        if good:
            x = torch.cat([item.tensor for item in good]).to(
                device=self.classifier.device, dtype=self.classifier.dtype
            )
            result = self.method.run(x, self.target)
            explanation = Explanation.from_result(
                result,
                self.method.name,
                tuple(x.shape[2:]),
                self.classifier.labels,
                sources=[item.source for item in good],
                multilabel=self.classifier.multilabel,
                threshold_prob=self.classifier.threshold_prob,
            )
            for i, item in enumerate(good):
                records[item.index] = self._outputs(explanation, i, item)
        return [records[index] for index, _ in batch]

    def _outputs(self, explanation: Explanation, i: int, item: _LoadedVolume) -> dict[str, Any]:
        """Write input ``i``'s montages, NIfTI maps and raw maps; return its record."""
        volume, style = item.volume, self.task.style
        stem = output_stem(item.index, item.source)
        maps = normalize_maps(explanation.raw[i : i + 1], volume.shape)[0].numpy()
        flips = radiological_flips(volume.affine)
        shown = _display(windowed(volume.voxels, item.window), flips)
        probs = explanation.probs[i]
        entries = []
        for k in explanation.explained(i):
            class_id = int(explanation.targets[i, k])
            entry = {
                "class": class_id,
                "label": explanation.label(class_id),
                "score": round(float(explanation.scores[i, k]), 6),
                "prob": round(float(probs[class_id]), 6) if class_id >= 0 else None,
            }
            entry.update(self._class_files(volume, shown, maps[k], f"{stem}_c{class_id}", flips))
            entry.update(_boxes(maps[k], volume, style.threshold))
            entries.append(entry)
        raw_path = f"raw/{stem}.npz"
        write_npz(
            self.folder.path(raw_path),
            raw=explanation.raw[i].numpy(),
            targets=explanation.targets[i].numpy(),
            logits=explanation.logits[i].numpy(),
        )
        return {
            "input": item.source,
            "status": "ok",
            "error": None,
            "kind": "volume",
            "predictions": explanation.predictions(i),
            "maps": entries,
            "raw": raw_path,
            "method": explanation.method,
            "layer": explanation.layer,
            "shape": list(volume.shape),
            "model_input": list(self.size),
            "window": [round(v, 4) for v in volume_window(volume.voxels, item.window)],
            "montage_view": "as stored" if flips is None else "radiological",
            "identity_error": explanation.identity_error,
        }

    def _class_files(
        self,
        volume: Volume,
        shown: np.ndarray,
        volume_map: np.ndarray,
        stem: str,
        flips: tuple[bool, bool] | None,
    ) -> dict[str, str]:
        """Write one class's montage PNG (``shown``: the windowed volume, already flipped by
        ``flips`` for display) and NIfTI map; return their paths."""
        style = self.task.style
        picture = montage(
            shown,
            _display(volume_map, flips),
            step=self.task.montage_step,
            colormap=style.colormap,
            alpha=style.alpha,
        )
        montage_path, nifti_path = f"montages/{stem}.png", f"maps/{stem}.nii.gz"
        write_png(self.folder.path(montage_path), picture)
        write_volume_map(self.folder.path(nifti_path), volume_map, volume)
        return {"overlay": montage_path, "montage": montage_path, "nifti": nifti_path}


def _display(values: np.ndarray, flips: tuple[bool, bool] | None) -> np.ndarray:
    """``values`` (D, H, W) with rows and/or columns reversed (a view); as is for None."""
    rows, columns = flips or (False, False)
    return values[:, :: -1 if rows else 1, :: -1 if columns else 1]


def _boxes(volume_map: np.ndarray, volume: Volume, threshold: float) -> dict[str, Any]:
    """The record's ``box`` (voxels) and ``box_world`` (mm, or None) of one map."""
    box = box3d_from_map(volume_map, threshold)
    world = None
    if box is not None and volume.affine is not None:
        world = [round(v, 4) for v in world_box(box, volume.affine)]
    return {"box": None if box is None else list(box), "box_world": world}
