"""Numbers as reports and summary sentences print them (one place, so they agree)."""

from __future__ import annotations

__all__ = ["percent", "two_decimals"]


def percent(value: float | None) -> str:
    """A fraction as a whole percentage; ``None`` (not measured) as ``"n/a"``.

    Example:
        >>> percent(0.873), percent(None)
        ('87 %', 'n/a')
    """
    return "n/a" if value is None else f"{round(100 * value)} %"


def two_decimals(value: float | None) -> str:
    """Two decimals, without a minus sign on values that round to zero; ``None`` as ``"n/a"``.

    Example:
        >>> two_decimals(-0.001), two_decimals(0.7387)
        ('0.00', '0.74')
    """
    return "n/a" if value is None else f"{round(value, 2) + 0.0:.2f}"
