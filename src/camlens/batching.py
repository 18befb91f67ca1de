"""Cutting work into batches: the one chunker of the batch loops (foundation: imports only
``camlens.errors``). Tensors are cut with ``Tensor.split``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

from camlens.errors import ConfigError

__all__ = ["chunks"]

T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter); a ``size`` below 1 is a
    ``ConfigError``.

    Example:
        >>> list(chunks("abcde", 2))
        [['a', 'b'], ['c', 'd'], ['e']]
    """
    if size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {size}")
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
