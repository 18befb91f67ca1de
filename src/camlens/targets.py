"""What to explain: turn a target request into class indices, shape (N, K)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from camlens.errors import ConfigError

Target = str | int | Sequence[Any] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

_TOPK = re.compile(r"^top(\d+)$", re.IGNORECASE)


def resolve_targets(
    target: Target, logits: torch.Tensor, labels: Sequence[str] | None = None
) -> torch.Tensor:
    """Return the classes to explain as a long tensor of shape (N, K).

    Parameters:
        target: ``"top1"``, ``"top5"`` or any ``"topK"`` (highest logits, best first); a class
            id (``285``); a class name (``"Egyptian cat"``, case-insensitive); a per-image list
            of ids or names (one per image, or one list of K per image); a tensor (N,) or
            (N, K); or a callable ``logits -> tensor``.
        logits: (N, classes) scores of the batch.
        labels: class names, needed for names.

    Raises:
        ConfigError: unknown name, id out of range, or a list of the wrong length.

    Example:
        >>> resolve_targets("top2", torch.tensor([[0.1, 3.0, 2.0]]))
        tensor([[1, 2]])
    """
    n, n_classes = logits.shape
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
            _TOPK.match(target.strip()) or target.strip().isdigit()
        ):
            class_index(target, labels)
        return
    resolve_targets(target, torch.zeros(1, len(labels)), labels)


def describe_target(target: Target) -> Any:
    """A JSON-ready description of a target (for a run's settings).

    Example:
        >>> describe_target("top5"), describe_target(torch.tensor([3, 4]))
        ('top5', [3, 4])
    """
    if isinstance(target, torch.Tensor):
        return target.tolist()
    if isinstance(target, (str, int)):
        return target
    if callable(target):
        return (
            f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
        )
    return [describe_target(item) for item in target]
