"""A static HTML gallery of a run's results, one card per input.

The page is plain HTML and CSS: no JavaScript, no CDN, no remote resource, so it opens offline
straight from disk. Images are referenced by paths relative to the output folder, and every
value taken from a record is HTML-escaped (Jinja2 autoescaping) and, in ``src``/``href``
attributes, percent-encoded as well.

Records follow the ``results.jsonl`` contract::

    {"input": "path/of/input.jpg", "status": "ok" | "error", "error": str | None,
     "predictions": [{"class": int, "label": str, "prob": float}, ...],
     "maps": [{"class": int, "label": str, "score": float,
               "overlay": "overlays/0001_cat_c285.png", "box": [x0, y0, x1, y1]}, ...],
     "raw": "raw/0001_cat.npz", ...}

Detector and segmenter records (``"task": "detection"`` / ``"segmentation"``) hold their maps
in ``"detections"`` / ``"segments"`` instead of ``"maps"``, entries of the same shape (see
``camlens.tasks.dense``). Extra keys are ignored; missing optional keys are tolerated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from camlens.pipeline import OutputFolder, as_output_folder
from camlens.report.html import render_template
from camlens.writers import write_text

__all__ = ["render_gallery", "write_gallery"]

TEMPLATE_NAME = "gallery.html.j2"


def render_gallery(
    records: Iterable[Mapping[str, Any]],
    *,
    title: str = "camlens results",
    subtitle: str | None = None,
    figures: Mapping[str, str] | None = None,
) -> str:
    """Render the gallery page for a run's records as an HTML string.

    Parameters
    ----------
    records : iterable of dict
        One record per input, in the ``results.jsonl`` format (see the module docstring).
    title : str, optional
        Page title and heading (default ``"camlens results"``).
    subtitle : str, optional
        A line under the heading, e.g. the model and method.
    figures : dict of str to str, optional
        Maps a record's ``input`` to the path (relative to the output folder) of its top-k
        figure. The figure is shown above the record's single overlays, which then fold into a
        "individual maps" section.

    Returns
    -------
    str
        A complete, self-contained HTML document.

    Examples
    --------
    >>> html = render_gallery([{"input": "cat.jpg", "status": "error", "error": "bad JPEG"}])
    >>> "1 input, 0 ok, 1 failed" in html, "bad JPEG" in html
    (True, True)
    """
    figures = dict(figures or {})
    cards = [_card(record, figures) for record in records]
    n_ok = sum(card["ok"] for card in cards)
    n_failed = len(cards) - n_ok
    summary = f"{len(cards)} input{'' if len(cards) == 1 else 's'}, {n_ok} ok, {n_failed} failed"
    return render_template(
        TEMPLATE_NAME, title=title, subtitle=subtitle, summary=summary, cards=cards
    )


def write_gallery(
    out_dir: OutputFolder | str | os.PathLike,
    records: Iterable[Mapping[str, Any]],
    *,
    title: str = "camlens results",
    subtitle: str | None = None,
    figures: Mapping[str, str] | None = None,
) -> Path:
    """Write the gallery to ``out_dir/index.html``, atomically.

    Parameters
    ----------
    out_dir : OutputFolder, str or os.PathLike
        The run's output folder; image paths in ``records`` and ``figures`` are relative to it.
    records, title, subtitle, figures
        As for :func:`render_gallery`.

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.

    Examples
    --------
    >>> records = [{"input": "cat.jpg", "status": "error", "error": "bad JPEG"}]
    >>> write_gallery("out", records, subtitle="resnet50, CAM")
    PosixPath('out/index.html')
    """
    html = render_gallery(records, title=title, subtitle=subtitle, figures=figures)
    return write_text(as_output_folder(out_dir).path("index.html"), html)


def _card(record: Mapping[str, Any], figures: Mapping[str, str]) -> dict[str, Any]:
    """Turn one record into the plain values the template shows."""
    name = str(record.get("input", "(unnamed input)"))
    status = str(record.get("status", "error"))
    ok = status == "ok"
    card: dict[str, Any] = {"name": name, "ok": ok, "status": status}
    if not ok:
        error = record.get("error")
        card["error"] = str(error) if error else f"failed (status {status!r}, no error message)"
        return card
    figure = record.get("figure") or figures.get(name)
    card["figure"] = _rel_src(figure) if figure else None
    entries = record.get("maps") or record.get("detections") or record.get("segments") or []
    card["maps"] = [_map_view(m) for m in entries]
    card["predictions"] = [
        _prediction_view(rank, p) for rank, p in enumerate(record.get("predictions") or [], 1)
    ]
    raw = record.get("raw")
    card["raw"] = _rel_src(raw) if raw else None
    card["raw_name"] = str(raw) if raw else None
    return card


def _map_view(entry: Mapping[str, Any]) -> dict[str, Any]:
    label = str(entry.get("label", "?"))
    caption = f"{label} ({entry.get('class', '?')}) score {_number(entry.get('score'))}"
    box = entry.get("box")
    if box is not None:
        caption += f", box [{', '.join(_number(v, '.1f') for v in box)}]"
    overlay = entry.get("overlay")
    return {"src": _rel_src(overlay) if overlay else None, "caption": caption}


def _prediction_view(rank: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    prob = _as_float(entry.get("prob"))
    return {
        "rank": rank,
        "label": str(entry.get("label", "?")),
        "class": str(entry.get("class", "?")),
        "percent": "n/a" if prob is None else f"{100.0 * prob:.1f}%",
        "bar": 0.0 if prob is None else round(min(max(100.0 * prob, 0.0), 100.0), 1),
    }


def _rel_src(path: str | os.PathLike) -> str:
    """A path relative to the output folder as a URL: ``/`` separators, percent-encoded.

    Encoding keeps ``#``, ``?`` and spaces in file names from breaking the URL and turns a
    ``scheme:`` prefix into a plain relative path, so nothing is ever fetched remotely.
    """
    text = os.fspath(path).replace("\\", "/")
    if text.startswith("//"):  # protocol-relative would mean another host
        text = "/" + text.lstrip("/")
    return quote(text, safe="/")


def _as_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _number(value: Any, fmt: str = ".4g") -> str:
    """Format a score or coordinate: whole numbers without decimals, others with ``fmt``."""
    number = _as_float(value)
    if number is None:
        return "n/a" if value is None else str(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return format(number, fmt)
