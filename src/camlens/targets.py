"""What to explain: turn a target request into class indices, shape (N, K)."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from camlens.errors import ConfigError
from camlens.io import ImageLoadError, load_image

Target = str | int | Sequence[Any] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

_TOPK = re.compile(r"^top(\d+)$", re.IGNORECASE)

#: The target that explains every class a multi-label model predicts.
POSITIVE = "positive"


@dataclass(frozen=True)
class Positive:
    """Every class whose sigmoid probability is at least ``threshold`` (multi-label models):
    the target ``"positive"``.

    Images have different numbers of positive classes, but targets are one (N, K) tensor:
    K is the largest number of positives in the batch, each row lists its positives (highest
    probability first) and is padded with repeats of its last one. A padded column is a
    repeat of a class already in its row; ``distinct_targets`` marks the columns to show (the
    explain records and overlays skip the repeats). An image without any class at or above
    the threshold explains its top-1 class (its record says so: ``"positive": false``).

    Attributes:
        threshold: the sigmoid probability a class needs (in (0, 1); default 0.5).

    Example:
        >>> Positive(0.5)(torch.tensor([[2.0, -1.0, 1.0], [-3.0, 0.5, -2.0], [-1.0, -2.0, -3.0]]))
        tensor([[0, 2],
                [1, 1],
                [0, 0]])
    """

    threshold: float = 0.5

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().sigmoid()
        order = probs.argsort(dim=1, descending=True, stable=True)
        counts = (probs >= self.threshold).sum(dim=1).clamp(min=1)  # none: the top-1
        k = int(counts.max())
        columns = torch.arange(k, device=logits.device).expand(logits.shape[0], k)
        return order.gather(1, torch.minimum(columns, (counts - 1)[:, None]))


def distinct_targets(targets: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: True where a target is the first of its class in its row (False for the
    padding of ``Positive`` targets, which repeats a row's last class).

    Example:
        >>> distinct_targets(torch.tensor([[0, 2], [1, 1]]))
        tensor([[ True,  True],
                [ True, False]])
    """
    same = targets[:, :, None] == targets[:, None, :]
    earlier = torch.ones_like(same[0], dtype=torch.bool).tril(diagonal=-1)
    return ~(same & earlier).any(dim=2)


def resolve_targets(
    target: Target, logits: torch.Tensor, labels: Sequence[str] | None = None
) -> torch.Tensor:
    """Return the classes to explain as a long tensor of shape (N, K).

    Parameters:
        target: ``"top1"``, ``"top5"`` or any ``"topK"`` (highest logits, best first);
            ``"positive"`` (multi-label models: every class with a sigmoid probability of at
            least 0.5, see ``Positive`` for another threshold); a class id (``285``); a class
            name (``"Egyptian cat"``, case-insensitive); a per-image list of ids or names (one
            per image, or one list of K per image); a tensor (N,) or (N, K); or a callable
            ``logits -> tensor``.
        logits: (N, classes) scores of the batch.
        labels: class names, needed for names.

    Raises:
        ConfigError: unknown name, id out of range, or a list of the wrong length.

    Example:
        >>> resolve_targets("top2", torch.tensor([[0.1, 3.0, 2.0]]))
        tensor([[1, 2]])
    """
    n, n_classes = logits.shape
    if isinstance(target, Similarity):  # not a class: a score of its own
        return target.target_ids(logits)
    if isinstance(target, str) and target.strip().lower() == POSITIVE:
        target = Positive()
    if callable(target) and not isinstance(target, torch.Tensor):
        target = target(logits)
    if isinstance(target, str) and (match := _TOPK.match(target.strip())):
        k = int(match.group(1))
        if not 1 <= k <= n_classes:
            raise ConfigError(f"target {target!r}: K must be between 1 and {n_classes}")
        return logits.topk(k, dim=1).indices
    if isinstance(target, torch.Tensor):
        ids = target.to(device=logits.device, dtype=torch.long)
        ids = ids.expand(n) if ids.ndim == 0 else ids
        ids = ids[:, None] if ids.ndim == 1 else ids
    elif isinstance(target, (str, int)):
        ids = torch.full((n, 1), _class_id(target, labels, n_classes), device=logits.device)
    elif isinstance(target, Sequence):
        ids = _per_image(target, labels, n, n_classes).to(logits.device)
    else:
        raise ConfigError(f"cannot use {type(target).__name__} as a target; see resolve_targets")
    if ids.ndim != 2 or ids.shape[0] != n:
        raise ConfigError(f"targets must have one row per image ({n}), got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_classes):
        raise ConfigError(f"class ids must be in 0..{n_classes - 1}, got {ids.tolist()}")
    return ids


def _per_image(
    target: Sequence[Any], labels: Sequence[str] | None, n: int, n_classes: int
) -> torch.Tensor:
    if len(target) != n:
        raise ConfigError(
            f"a per-image target list needs one entry per image: got {len(target)} for {n} images"
        )
    rows = [
        [_class_id(t, labels, n_classes) for t in (item if _is_list(item) else [item])]
        for item in target
    ]
    if len({len(r) for r in rows}) > 1:
        raise ConfigError("every image must have the same number of targets")
    return torch.tensor(rows, dtype=torch.long)


def _is_list(item: Any) -> bool:
    return isinstance(item, Sequence) and not isinstance(item, str)


def _class_id(target: Any, labels: Sequence[str] | None, n_classes: int) -> int:
    if isinstance(target, bool):
        raise ConfigError(f"target {target!r} is not a class id or name")
    if isinstance(target, int) or (isinstance(target, str) and target.strip().isdigit()):
        value = int(target)
        if not 0 <= value < n_classes:
            raise ConfigError(f"class id {value} is out of range 0..{n_classes - 1}")
        return value
    if isinstance(target, str):
        return class_index(target, labels)
    raise ConfigError(f"target {target!r} is not a class id or name")


def class_index(name: str, labels: Sequence[str] | None) -> int:
    """Index of the class called ``name`` (case-insensitive); a clear error with the classes
    meant most likely otherwise (see :func:`similar_classes`).

    Example:
        >>> class_index("Tabby", ["Egyptian cat", "tabby"])
        1
    """
    if not labels:
        raise ConfigError(f"class name {name!r} given, but the model has no class names")
    lowered = [label.lower() for label in labels]
    key = name.strip().lower()
    if key in lowered:
        return lowered.index(key)
    close = similar_classes(name, labels)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"no class is called {name!r}.{hint}")


def similar_classes(name: str, labels: Sequence[str], n: int = 5) -> list[str]:
    """Up to ``n`` class names a user typing ``name`` may mean: those that contain it as a
    word (``cat`` -> ``Egyptian cat``, ``tiger cat``), then those that contain it, then the
    closest spellings.

    Example:
        >>> similar_classes("cat", ["crate", "Egyptian cat", "tiger cat", "catamaran", "castle"])
        ['Egyptian cat', 'tiger cat', 'catamaran', 'crate', 'castle']
    """
    key = name.strip().lower()
    lowered = [label.lower() for label in labels]
    words = [i for i, label in enumerate(lowered) if key in re.split(r"[^a-z0-9]+", label)]
    parts = [i for i, label in enumerate(lowered) if key in label and i not in words]
    spelled = [
        lowered.index(c)
        for c in difflib.get_close_matches(key, lowered, n=n, cutoff=0.6)
        if lowered.index(c) not in words + parts
    ]
    return [labels[i] for i in [*words, *parts, *spelled][:n]]


def check_target(target: Target, labels: Sequence[str] | None) -> None:
    """Check a target that does not depend on the images (``"topK"``, a class name or id)
    before any work, against the model's class names.

    Raises:
        ConfigError: an unknown class name (with close names), an id or K out of range.

    Example:
        >>> check_target("Egyptian cta", ["Egyptian cat", "tabby"])
        Traceback (most recent call last):
        camlens.errors.ConfigError: no class is called 'Egyptian cta'. Did you mean: Egyptian cat?
    """
    if not isinstance(target, (str, int)) or isinstance(target, bool):
        return
    if not labels:
        if isinstance(target, str) and not (
            _TOPK.match(target.strip())
            or target.strip().isdigit()
            or target.strip().lower() == POSITIVE
        ):
            class_index(target, labels)
        return
    resolve_targets(target, torch.zeros(1, len(labels)), labels)


def bind_target(target: Target, *, multilabel: bool, threshold_prob: float = 0.5) -> Target:
    """The target as a model of this kind explains it: ``"positive"`` becomes
    ``Positive(threshold_prob)``; every other target is returned unchanged.

    Parameters:
        target: any target (see ``resolve_targets``).
        multilabel: whether the model is multi-label (``Classifier.multilabel``).
        threshold_prob: its threshold (``Classifier.threshold_prob``).

    Raises:
        ConfigError: ``"positive"`` (or a ``Positive``) for a model that is not multi-label.

    Example:
        >>> bind_target("positive", multilabel=True, threshold_prob=0.3)
        Positive(threshold=0.3)
    """
    wants_positive = isinstance(target, Positive) or (
        isinstance(target, str) and target.strip().lower() == POSITIVE
    )
    if not wants_positive:
        return target
    if not multilabel:
        raise ConfigError(
            "the target 'positive' (every class whose sigmoid probability reaches the "
            "threshold) needs a multi-label model: pass --multilabel (Python: "
            "load_model(..., multilabel=True)), or use a target such as top1 or top5 for a "
            "softmax classifier"
        )
    return target if isinstance(target, Positive) else Positive(threshold_prob)


def describe_target(target: Target) -> Any:
    """A JSON-ready description of a target (for a run's settings).

    Example:
        >>> describe_target("top5"), describe_target(torch.tensor([3, 4]))
        ('top5', [3, 4])
    """
    if isinstance(target, torch.Tensor):
        return target.tolist()
    if isinstance(target, Positive):
        return {POSITIVE: target.threshold}
    if isinstance(target, Similarity):
        return target.describe()
    if isinstance(target, (str, int)):
        return target
    if callable(target):
        return (
            f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
        )
    return [describe_target(item) for item in target]


#: The class id that ``resolve_targets`` gives a target that is not a class (a ``Similarity``):
#: its maps explain another score than a logit, and its label is the target's own.
NOT_A_CLASS = -1

#: How a similarity target is written on the command line: ``--target similar:REF.png``.
SIMILAR_PREFIX = "similar:"


class Similarity:
    """Explain the cosine similarity of each image's embedding with a reference image's:
    "which regions make this image similar to that one?" (``--target similar:REF.png``).

    ::

        s(x) = cos(e(x), e(r)) = <e(x), e(r)> / (|e(x)| |e(r)|)          one score per image

    ``e`` is the embedding: by default the input of the classifier's final linear layer (the
    pooled features, ``CamHead.classifier``), or the output of ``layer``, averaged over its
    spatial positions when it is 4-D (N, C, h, w) and flattened otherwise (``embed``). ``r``
    is the reference image; a method computes its embedding once (without gradients) and
    reuses it. The score takes the place of the logit ``y_c``: gradient methods differentiate
    ``s`` (Grad-CAM's weights are the spatial means of ``d s / d A_k``), Score-CAM weighs each
    channel by ``s`` of the masked input, Ablation-CAM by the relative drop of ``s`` when the
    channel is zeroed. CAM, which needs a class's linear weights, refuses it, as do the
    methods that compare classes. Explanations name it ``similar:<name>``
    (``Explanation.target_label``); its class id is ``NOT_A_CLASS`` (-1) and its score
    (``Explanation.scores``) is ``s``.

    Parameters:
        reference: the reference image: a path or a PIL image (preprocessed as the explained
            images are: ``preprocess``), or an already preprocessed tensor (C, H, W) or
            (1, C, H, W).
        layer: qualified name of the layer whose output is the embedding (None: the input of
            the classifier's final linear layer). It must come after the explained feature
            layer for gradient methods.
        name: how labels name the reference (default: the path as given; ``"reference"`` for
            an image or a tensor).
        preprocess: turns the path or PIL image into the model's input (1, C, H, W); None: the
            Classifier's preprocessing, which ``camlens.methods.make_method`` gives the method.

    Example:
        >>> from torch import nn
        >>> from camlens.methods import GradCAM
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        >>> x, reference = torch.rand(2, 3, 16, 16), torch.rand(1, 3, 16, 16)
        >>> target = Similarity(reference)
        >>> result = GradCAM(model).run(x, target)  # explains cos(e(x), e(reference))
        >>> target.label, result.targets.tolist(), result.scores.shape
        ('similar:reference', [[-1], [-1]], torch.Size([2, 1]))
    """

    def __init__(
        self,
        reference: Any,
        *,
        layer: str | None = None,
        name: str | None = None,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        if isinstance(reference, torch.Tensor) and not (
            reference.ndim == 3 or (reference.ndim == 4 and reference.shape[0] == 1)
        ):
            raise ConfigError(
                "a similarity reference tensor must be one preprocessed image (C, H, W) or "
                f"(1, C, H, W), got shape {tuple(reference.shape)}; pass one image"
            )
        if layer is not None and (not isinstance(layer, str) or not layer.strip()):
            raise ConfigError(f"Similarity layer must be a layer's qualified name, got {layer!r}")
        self.reference = reference
        self.layer = layer
        self.preprocess = preprocess
        if name is None:
            path = isinstance(reference, (str, os.PathLike))
            name = os.fspath(reference) if path else "reference"
        self.name = str(name)

    @classmethod
    def from_text(cls, text: str) -> Similarity:
        """The target ``similar:REF`` (as ``--target`` takes it), its reference checked.

        Raises:
            ConfigError: no path after ``similar:``, or a file that cannot be read as an image.

        Example:
            >>> Similarity.from_text("similar:missing.png")
            Traceback (most recent call last):
            camlens.errors.ConfigError: similarity reference 'missing.png' cannot be read: ...
        """
        path = text.strip()[len(SIMILAR_PREFIX) :].strip()
        if not text.strip().lower().startswith(SIMILAR_PREFIX) or not path:
            raise ConfigError(
                f"a similarity target is written similar:PATH (an image file), got {text!r}"
            )
        return cls(path).check()

    @property
    def label(self) -> str:
        """``similar:<name>``: how explanations and records name this target."""
        return f"{SIMILAR_PREFIX}{self.name}"

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        layer = f", layer={self.layer!r}" if self.layer is not None else ""
        return f"Similarity({self.name!r}{layer})"

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (a run's settings; a resume must match it)."""
        return {"similar": self.name, "layer": self.layer}

    def check(self) -> Similarity:
        """This target, after checking that a path reference is a readable image.

        Raises:
            ConfigError: naming the path and the reason (missing file, not an image...).
        """
        if isinstance(self.reference, (str, os.PathLike)):
            try:
                load_image(self.reference, max_pixels=None)
            except (ImageLoadError, OSError) as error:
                raise ConfigError(
                    f"similarity reference {os.fspath(self.reference)!r} cannot be read: "
                    f"{error}; give the path of an image file (--target similar:PATH)"
                ) from error
        return self

    def target_ids(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, 1) long ``NOT_A_CLASS``: one target per image, which is not a class."""
        return torch.full((logits.shape[0], 1), NOT_A_CLASS, device=logits.device)

    def reference_input(
        self,
        preprocess: Callable[[Any], torch.Tensor] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The reference as a model input (1, C, H, W) on ``device`` in ``dtype``: a tensor as
        it is, a path or PIL image through ``self.preprocess`` or else ``preprocess``.

        Raises:
            ConfigError: an image reference, but no preprocessing to turn it into an input.
        """
        if isinstance(self.reference, torch.Tensor):
            batch = self.reference if self.reference.ndim == 4 else self.reference[None]
        else:
            preprocess = self.preprocess or preprocess
            if preprocess is None:
                raise ConfigError(
                    f"similarity reference {self.name!r} is an image, but there is no "
                    "preprocessing to turn it into the model's input: give a Classifier "
                    "(camlens.explain, make_method), Similarity(..., preprocess=classifier."
                    "preprocess), or the reference as a preprocessed tensor (1, C, H, W)"
                )
            batch = preprocess(self.reference)
        return batch.detach().to(device=device, dtype=dtype)

    @staticmethod
    def embed(features: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 embeddings of a layer's output: spatially averaged when 4-D
        (N, C, h, w) -> (N, C), flattened otherwise ((N, D) stays as it is).

        Example:
            >>> Similarity.embed(torch.ones(2, 3, 4, 4)).shape, Similarity.embed(torch.ones(2, 5)).shape
            (torch.Size([2, 3]), torch.Size([2, 5]))
        """
        if not isinstance(features, torch.Tensor) or features.ndim < 2:
            raise ConfigError(
                "a similarity embedding must be a tensor with one row per image, got "
                f"{getattr(features, 'shape', type(features))}; choose another layer"
            )
        features = features.float()
        return features.mean(dim=(-2, -1)) if features.ndim == 4 else features.flatten(1)

    @staticmethod
    def score(embedding: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``cos(e(x), e(r))``: (N, D) embeddings and a (1, D) reference -> (N, 1) float32.

        Example:
            >>> Similarity.score(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
            tensor([[1.0000],
                    [0.7071]])
        """
        if embedding.shape[1:] != reference.shape[1:]:
            raise ConfigError(
                f"the image's embedding has shape {tuple(embedding.shape[1:])} but the "
                f"reference's {tuple(reference.shape[1:])}; with a layer whose output size "
                "depends on the input size, give the reference at the images' size"
            )
        cosine = torch.nn.functional.cosine_similarity(
            embedding.float(), reference.float().expand_as(embedding), dim=1, eps=1e-8
        )
        return cosine[:, None]
