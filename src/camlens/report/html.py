"""The HTML side of every report: one Jinja2 environment over ``report/templates``.

Templates are autoescaped, undefined names are errors, and two number filters are available:
``pct`` (:func:`camlens.formatting.percent`) and ``num``
(:func:`camlens.formatting.two_decimals`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2

from camlens.formatting import percent, two_decimals

__all__ = ["TEMPLATE_DIR", "render_template"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def render_template(name: str, **context: Any) -> str:
    """Render the template ``name`` of ``TEMPLATE_DIR`` with ``context``.

    Example:
        >>> html = render_template("gallery.html.j2", title="<cats>", subtitle="", summary="",
        ...                        cards=[])
        >>> "<title>&lt;cats&gt;</title>" in html  # autoescaped
        True
        >>> render_template("gallery.html.j2", title="cats")
        Traceback (most recent call last):
        jinja2.exceptions.UndefinedError: 'subtitle' is undefined
    """
    return _environment().get_template(name).render(**context)


@functools.cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["pct"] = percent
    environment.filters["num"] = two_decimals
    return environment
