"""The result of explaining a batch, and its post-processing.

The heat-map contract, the same everywhere in camlens:

* ``raw``: (N, K, h, w) float32 at the feature layer's resolution, signed and un-normalised,
  exactly what the method computed (for CAM: ``mean(raw) + b = logit``).
* ``maps``: (N, K, H, W) float32 in [0, 1] at the model's input resolution:
  ``relu(raw)``, upsampled bilinearly, divided by its maximum (all zeros when the map has no
  positive value).
* overlays and boxes for the original image use the same normalisation at the original size.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camlens.localize import Box, box3d_from_map, box_from_map, normalize_maps, scale_box
from camlens.methods import MethodResult
from camlens.models import DEFAULT_THRESHOLD_PROB, class_probabilities
from camlens.render import overlay
from camlens.targets import distinct_targets


@dataclass
class Explanation:
    """Maps for a batch of images and the predictions they explain.

    Attributes:
        raw: (N, K, h, w) float32, signed, un-normalised, at feature-map resolution;
            (N, K, d, h, w) for volumes (a Conv3d model's input (N, C, D, H, W)).
        targets: (N, K) long, explained classes (K = 1 for top1, 5 for top5).
        logits: (N, classes) the model's scores.
        method: the method's name (``"cam"``, ``"gradcam"``...).
        layer: qualified name of the layer the maps come from.
        input_size: (H, W) of the model input; (D, H, W) for volumes (``is_volume``).
        labels: class names.
        images: the original images (for overlays and original-pixel boxes), or None.
        identity_error: CAM only: max |mean(M_c) + b_c - y_c| over the batch.
        sources: the inputs' names (their paths), or None; ``save`` names files after them.
        sizes: (width, height) of each original image when ``images`` hold smaller copies for
            display (large photos); None: the sizes of ``images``.
        multilabel: the model is multi-label: ``probs`` are per-class sigmoids and
            ``predictions`` lists every class at or above ``threshold_prob``.
        threshold_prob: the multi-label threshold.
        target_labels: names of the K targets when they are not classes (a
            ``camlens.targets.Similarity``: ``("similar:ref.png",)``, whose ``targets`` are -1,
            ``NOT_A_CLASS``); None for class targets. See ``target_label``.
        target_scores: (N, K) scores of such targets (the cosine similarity); see ``scores``.
    """

    raw: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    method: str
    layer: str
    input_size: tuple[int, ...]
    labels: list[str] = field(default_factory=list)
    images: list[Image.Image] | None = None
    identity_error: float | None = None
    sources: list[str] | None = None
    sizes: list[tuple[int, int]] | None = None
    multilabel: bool = False
    threshold_prob: float = DEFAULT_THRESHOLD_PROB
    target_labels: list[str] | None = None
    target_scores: torch.Tensor | None = None

    @classmethod
    def from_result(
        cls,
        result: MethodResult,
        method: str,
        input_size: tuple[int, ...],
        labels: Sequence[str],
        *,
        images: list[Image.Image] | None = None,
        sources: list[str] | None = None,
        sizes: list[tuple[int, int]] | None = None,
        multilabel: bool = False,
        threshold_prob: float = DEFAULT_THRESHOLD_PROB,
    ) -> Explanation:
        """The Explanation of one method call (tensors moved to the CPU); ``multilabel`` and
        ``threshold_prob`` as the model's (``Classifier.multilabel``, ``.threshold_prob``).

        Example:
            >>> from torch import nn
            >>> from camlens.methods import CAM
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
            >>> method, x = CAM(model), torch.rand(1, 3, 16, 16)
            >>> Explanation.from_result(method.run(x, "top1"), method.name, (16, 16), ["cat", "dog"])
            Explanation(method='cam', layer='1', n=1, k=1, raw=16x16, input=16x16, targets=[[1]])
        """
        return cls(
            raw=result.raw.cpu(),
            targets=result.targets.cpu(),
            logits=result.logits.float().cpu(),
            method=method,
            layer=result.layer,
            input_size=tuple(int(side) for side in input_size),
            labels=list(labels),
            images=images,
            identity_error=result.identity_error,
            sources=sources,
            sizes=sizes,
            multilabel=multilabel,
            threshold_prob=threshold_prob,
            target_labels=None if result.target_labels is None else list(result.target_labels),
            target_scores=None if result.scores is None else result.scores.float().cpu(),
        )

    def __repr__(self) -> str:
        n, k, *grid = self.raw.shape
        targets = str(self.targets[:3].tolist())
        if len(self) > 3:
            targets = targets[:-1] + ", ...]"
        raw, size = "x".join(map(str, grid)), "x".join(map(str, self.input_size))
        return (
            f"Explanation(method={self.method!r}, layer={self.layer!r}, n={n}, k={k}, "
            f"raw={raw}, input={size}, targets={targets})"
        )

    def _repr_html_(self) -> str:
        """Notebooks show the overlays (the first four images, every target), not tensors."""
        if self.is_volume:  # no 2-D overlay: the text
            return f"<div><code>{html.escape(repr(self))}</code></div>"
        cells = []
        for i in range(min(len(self), 4)):
            for k, image in enumerate(self.image_overlays(i)):
                thumbnail = image.copy()
                thumbnail.thumbnail((192, 192))
                buffer = io.BytesIO()
                thumbnail.save(buffer, format="PNG")
                data = base64.b64encode(buffer.getvalue()).decode("ascii")
                class_id = int(self.targets[i, k])
                caption = html.escape(f"{i}: {self.target_label(i, k)} ({class_id})")
                cells.append(
                    f'<figure style="display:inline-block;margin:4px"><img '
                    f'src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'
                )
        return f"<div><code>{html.escape(repr(self))}</code><br>{''.join(cells)}</div>"

    def __len__(self) -> int:
        return self.raw.shape[0]

    @property
    def is_volume(self) -> bool:
        """The maps are 3-D: (N, K, D, H, W) ``maps`` of a Conv3d model's volumes."""
        return len(self.input_size) == 3

    @property
    def probs(self) -> torch.Tensor:
        """(N, classes) probabilities: softmax of the logits, or per-class sigmoids for a
        multi-label model (``camlens.models.class_probabilities``)."""
        return class_probabilities(self.logits, self.multilabel)

    def predictions(self, i: int, top: int = 5) -> list[dict]:
        """Image ``i``'s predictions, most probable first, as ``{"class", "label", "prob"}``:
        the ``top`` classes by softmax probability, or, for a multi-label model, every class
        whose sigmoid probability is at least ``threshold_prob`` (possibly none).

        Example:
            >>> result = Explanation(torch.zeros(1, 1, 2, 2), torch.tensor([[0]]),
            ...     torch.tensor([[2.0, -1.0, 0.5]]), "cam", "4", (8, 8), ["a", "b", "c"],
            ...     multilabel=True)
            >>> [(p["label"], p["prob"]) for p in result.predictions(0)]
            [('a', 0.880797), ('c', 0.622459)]
        """
        probs = self.probs[i]
        order = probs.argsort(descending=True, stable=True).tolist()
        if self.multilabel:
            chosen = [c for c in order if float(probs[c]) >= self.threshold_prob]
        else:
            chosen = order[: min(top, len(order))]
        return [
            {"class": c, "label": self.label(c), "prob": round(float(probs[c]), 6)} for c in chosen
        ]

    def explained(self, i: int) -> list[int]:
        """The target columns of image ``i`` to show: all but repeats of a class already in
        its row (the padding of the ``"positive"`` target, see ``camlens.targets.Positive``).

        Example:
            >>> result = Explanation(torch.zeros(1, 2, 2, 2), torch.tensor([[1, 1]]),
            ...     torch.zeros(1, 3), "cam", "4", (8, 8))
            >>> result.explained(0)
            [0]
        """
        return distinct_targets(self.targets[i : i + 1])[0].nonzero().flatten().tolist()

    @property
    def scores(self) -> torch.Tensor:
        """(N, K) logit of each explained class; for targets that are not classes their own
        scores (``target_scores``: a similarity target's cosine similarity)."""
        if self.target_scores is not None:
            return self.target_scores.float()
        return self.logits.gather(1, self.targets).float()

    def target_label(self, i: int, k: int) -> str:
        """The name of image ``i``'s target ``k``: its class's name, or the target's own
        (``"similar:ref.png"``) when it is not a class.

        Example:
            >>> result = Explanation(torch.zeros(1, 1, 2, 2), torch.tensor([[-1]]),
            ...     torch.zeros(1, 3), "gradcam", "4", (8, 8), target_labels=["similar:b.png"])
            >>> result.target_label(0, 0)
            'similar:b.png'
        """
        if self.target_labels is not None:
            return self.target_labels[k]
        return self.label(int(self.targets[i, k]))

    @functools.cached_property
    def maps(self) -> torch.Tensor:
        """(N, K, H, W) float32 in [0, 1] at input resolution (see the module docstring);
        (N, K, D, H, W) for volumes."""
        return normalize_maps(self.raw, self.input_size)

    def source(self, i: int) -> str:
        """The name of input ``i``: its path, else ``image<i>``."""
        return self.sources[i] if self.sources is not None else f"image{i}"

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    def original_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image ``i``'s original (the input size when unknown)."""
        if self.sizes is not None:
            return tuple(self.sizes[i])
        if self.images is not None:
            return self.images[i].size
        return (self.input_size[1], self.input_size[0])

    def heatmap(self, i: int, k: int = 0, *, original: bool = False) -> np.ndarray:
        """Map ``k`` of image ``i`` as an (H, W) array in [0, 1], at input or original size."""
        if not original:
            return self.maps[i, k].numpy()
        width, height = self.original_size(i)
        return normalize_maps(self.raw[i : i + 1, k : k + 1], (height, width))[0, 0].numpy()

    def boxes(self, threshold: float = 0.2, *, original: bool = False) -> list[list[Box | None]]:
        """Zhou's boxes per image and target, in input pixels or original-image pixels.

        Computed on ``maps`` (input resolution) and, with ``original=True``, scaled to the
        original image. ``None`` where a map has no positive value.
        """
        return [self.image_boxes(i, threshold, original=original) for i in range(len(self))]

    def image_boxes(
        self, i: int, threshold: float = 0.2, *, original: bool = False
    ) -> list[Box | None]:
        """Zhou's boxes of image ``i``, one per target (see ``boxes``). For volumes the 3-D
        boxes ``(x0, y0, z0, x1, y1, z1)`` in input voxels (``localize.box3d_from_map``;
        ``original`` does not apply: the in-memory input is the model's)."""
        find = box3d_from_map if self.is_volume else box_from_map
        boxes = [find(self.maps[i, k].numpy(), threshold) for k in range(self.targets.shape[1])]
        return (
            [self.original_box(i, box) for box in boxes]
            if original and not self.is_volume
            else boxes
        )

    def original_box(self, i: int, box: Box | None) -> Box | None:
        """A box in input pixels (``image_boxes(i)``) in image ``i``'s original pixels."""
        if box is None:
            return None
        return scale_box(box, (self.input_size[1], self.input_size[0]), self.original_size(i))

    def overlays(
        self, *, colormap: str = "jet", alpha: float = 0.5, threshold: float | None = 0.2
    ) -> list[list[Image.Image]]:
        """Heat-map overlays on the original images (input-size gray images when unknown),
        with Zhou's box drawn when ``threshold`` is not None."""
        return [
            self.image_overlays(i, colormap=colormap, alpha=alpha, threshold=threshold)
            for i in range(len(self))
        ]

    def image_overlays(
        self,
        i: int,
        *,
        colormap: str = "jet",
        alpha: float = 0.5,
        threshold: float | None = 0.2,
        heat: np.ndarray | None = None,
        boxes: Sequence[Box | None] | None = None,
    ) -> list[Image.Image]:
        """Overlays of image ``i``, one per target (see ``overlays``), at the size of
        ``display_image(i)``: the original, or the smaller copy ``images`` holds when the
        originals' sizes are in ``sizes``. ``heat``: ``display_maps(i)``, and ``boxes``:
        ``image_boxes(i, threshold)`` (input pixels), when the caller has them already."""
        image = self.display_image(i)
        width, height = image.size
        heat = self.display_maps(i) if heat is None else heat
        drawn: list[Box | None] = [None] * heat.shape[0]
        if threshold is not None:
            input_wh = (self.input_size[1], self.input_size[0])
            found = self.image_boxes(i, threshold) if boxes is None else boxes
            drawn = [
                scale_box(box, input_wh, (width, height)) if box is not None else None
                for box in found
            ]
        return [
            overlay(image, heat[k], colormap=colormap, alpha=alpha, box=drawn[k])
            for k in range(heat.shape[0])
        ]

    def display_maps(self, i: int) -> np.ndarray:
        """Image ``i``'s maps at the size of ``display_image(i)``: (K, H, W) float32 in [0, 1]
        (``relu(raw)`` upsampled and divided by its maximum, as ``maps``)."""
        width, height = self.display_image(i).size
        return normalize_maps(self.raw[i : i + 1], (height, width))[0].numpy()

    def display_image(self, i: int) -> Image.Image:
        """The original image ``i``, or a neutral gray image of the input size."""
        if self.is_volume:
            raise ValueError(
                "a volume's maps have no 2-D overlay: draw a slice montage with "
                "camlens.render.montage(volume, explanation.maps[i, k].numpy()), or write "
                "montages and NIfTI maps with camlens.run_explain"
            )
        if self.images is not None:
            return self.images[i]
        return Image.new("RGB", (self.input_size[1], self.input_size[0]), (128, 128, 128))

    def save(
        self,
        directory: str | Path,
        *,
        names: list[str] | None = None,
        overwrite: bool = False,
        colormap: str = "jet",
        alpha: float = 0.5,
        threshold: float = 0.2,
    ) -> list[dict]:
        """Write the files ``camlens explain`` writes: overlays, raw maps, ``results.jsonl``
        and ``index.html``, under the same names and with the same folder rules (a non-empty
        ``directory`` is refused unless ``overwrite=True``, which removes only what camlens
        wrote there).

        Parameters:
            directory: the output folder (created).
            names: the inputs' names for the records and file names (default: the paths the
                images were read from, else ``image0``, ``image1``...).
            overwrite: replace camlens' earlier outputs in ``directory``.
            colormap, alpha, threshold: how the overlays look, and the box threshold.

        Returns:
            The records (the lines of ``results.jsonl``).
        """
        # The explain task's writer and the gallery live above this module; the one import
        # against the layer order (declared in pyproject's import-linter contract).
        from camlens.api.explaining import save_explanation

        return save_explanation(
            self, directory, names=names, overwrite=overwrite, colormap=colormap, alpha=alpha,
            threshold=threshold,
        )  # fmt: skip
