"""Stream an audit's images through the model: maps on the grid, predictions, thumbnails.

``MapComputer`` turns a batch of decoded inputs into a ``MapBatch``: each image's normalised
map of its audited class (its folder's class, or the predicted class) resized to the audit
grid, the prediction, and a small thumbnail for the mean image. Nothing at the input size
leaves this module, so the audit's memory does not depend on the image size beyond one batch.
The local engine decodes the next batch in threads while the current one runs; the Ray engine
(``camlens.audit.ray_maps``) runs ``MapComputer`` in actors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from camlens.api import make_method
from camlens.explanation import normalize_maps
from camlens.models import Classifier
from camlens.runner import Loaded, chunks, load_input, prefetched

__all__ = ["AuditItem", "MapBatch", "MapComputer", "local_map_batches"]

#: ``(index, source, class)``: class is the audited class index, or None (use the prediction).
AuditItem = tuple[int, str, int | None]


@dataclass
class MapBatch:
    """Maps of one batch of images (only those that could be read).

    Attributes:
        indices, sources: position in the audit and file of each image.
        maps: (n, G, G) normalised maps of the audited classes on the grid.
        classes: (n,) audited class of each image.
        predicted: (n,) the model's top-1 class.
        thumbs: (n, 3, S, S) images in [0, 1] (for mean images).
        sizes: ``(width, height)`` of each original image.
        errors: ``(index, source, message)`` of the inputs that could not be read.
        layer: the explained layer.
        feature_size: (h, w) of the raw maps (how sharp the maps can be).
    """

    indices: list[int]
    sources: list[str]
    maps: torch.Tensor
    classes: torch.Tensor
    predicted: torch.Tensor
    thumbs: torch.Tensor
    sizes: list[tuple[int, int]]
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    layer: str = ""
    feature_size: tuple[int, int] = (0, 0)


class MapComputer:
    """The model and method, loaded once; batches of inputs in, ``MapBatch`` out.

    Parameters:
        classifier: the model.
        method: a method name (``camlens.METHODS``).
        layer: the feature layer (default: the model's, else found automatically).
        grid: side of the audit grid.
        thumb_side: side of the thumbnails.
    """

    def __init__(
        self,
        classifier: Classifier,
        method: str = "cam",
        layer: str | None = None,
        *,
        grid: int = 32,
        thumb_side: int = 64,
    ) -> None:
        self.classifier = classifier
        self.method = make_method(classifier, method, layer)
        self.grid = grid
        self.thumb_side = thumb_side
        self._mean = torch.tensor(classifier.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(classifier.std, dtype=torch.float32).view(1, -1, 1, 1)

    def load(self, item: AuditItem) -> Loaded:
        """Decode and preprocess one input (errors become ``Loaded.error``)."""
        index, source, _ = item
        return load_input(self.classifier, index, source)

    def compute(self, loaded: Sequence[Loaded], classes: Sequence[int | None]) -> MapBatch:
        """Maps for decoded inputs; ``classes[i]`` is the audited class of ``loaded[i]``
        (None: its predicted class)."""
        errors = [(item.index, item.source, item.error or "") for item in loaded if item.error]
        good = [(item, cls) for item, cls in zip(loaded, classes, strict=True) if not item.error]
        if not good:
            return self._empty(errors)
        x = torch.cat([item.tensor for item, _ in good])
        known = [cls for _, cls in good]
        target = "top1" if known[0] is None else torch.tensor(known)  # one source per audit
        result = self.method.run(x, target)
        maps = normalize_maps(result.raw[:, :1].float(), (self.grid, self.grid))[:, 0].cpu()
        images = (x.float().cpu() * self._std + self._mean).clamp(0, 1)
        thumbs = F.interpolate(
            images, size=(self.thumb_side, self.thumb_side), mode="bilinear", antialias=True
        )
        return MapBatch(
            indices=[item.index for item, _ in good],
            sources=[item.source for item, _ in good],
            maps=maps,
            classes=result.targets[:, 0].cpu(),
            predicted=result.logits.float().argmax(dim=1).cpu(),
            thumbs=thumbs.clamp(0, 1),
            sizes=[item.image.size for item, _ in good],
            errors=errors,
            layer=result.layer,
            feature_size=(int(result.raw.shape[-2]), int(result.raw.shape[-1])),
        )

    def compute_items(self, items: Sequence[AuditItem]) -> MapBatch:
        """Decode and compute ``items`` (used by the Ray actors)."""
        return self.compute([self.load(item) for item in items], [item[2] for item in items])

    def _empty(self, errors: list[tuple[int, str, str]]) -> MapBatch:
        g, s = self.grid, self.thumb_side
        return MapBatch(
            [],
            [],
            torch.zeros((0, g, g)),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
            torch.zeros((0, 3, s, s)),
            [],
            errors,
        )


def local_map_batches(
    computer: MapComputer, items: Sequence[AuditItem], batch_size: int
) -> Iterator[MapBatch]:
    """``MapBatch`` per ``batch_size`` items, decoding the next batch in threads meanwhile."""
    for chunk, loaded in prefetched(chunks(items, batch_size), computer.load):
        yield computer.compute(loaded, [cls for _, _, cls in chunk])
