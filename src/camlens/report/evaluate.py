"""The evaluation report: ``report.html`` with a methods x metrics table, curves and a gallery.

Written next to ``metrics.json`` by ``camlens evaluate``. Like the explain gallery, the page
is static HTML and CSS (no JavaScript, nothing remote); figures are PNG files beside it:

* ``curves/deletion.png``, ``curves/insertion.png``: mean deletion / insertion curves;
* ``curves/thresholds.png``: box accuracy (IoU >= 0.5) against the map threshold, whose
  maximum is MaxBoxAcc;
* ``curves/road.png`` and ``curves/sanity.png`` when ROAD or the sanity check ran;
* ``gallery/<method>/*.png``: the worst-localised images of each method, the map of the
  annotated class with the ground-truth boxes (green) and the map's box at the best
  threshold (white).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from camlens.evaluation import HIGHER_IS_BETTER, METRICS
from camlens.localize import box_from_map
from camlens.methods import CAMMethod
from camlens.models import Classifier
from camlens.render import overlay, save_figure
from camlens.report.html import render_template
from camlens.writers import write_png, write_text

__all__ = ["worst_localized", "write_evaluation_report"]

TEMPLATE_NAME = "evaluate.html.j2"
_GT_COLOR = (0, 220, 0)
_FIGSIZE = (6.0, 4.0)


def write_evaluation_report(
    out_dir: str | os.PathLike,
    result: Mapping[str, Any],
    *,
    classifier: Classifier | None = None,
    annotations: Sequence[Any] | None = None,
    gallery: int = 6,
    methods: Mapping[str, CAMMethod] | None = None,
    title: str = "camlens evaluate",
) -> Path:
    """Write ``report.html`` and its figures into ``out_dir``; return the page's path.

    Parameters:
        out_dir: output folder (created).
        result: what ``camlens.evaluate`` returned.
        classifier: the evaluated model; needed to draw the gallery (maps are recomputed for
            the few images shown). Without it, the gallery is left out.
        annotations: the evaluated ``Annotation`` list, for the ground-truth boxes.
        gallery: how many worst-localised images to show per method.
        methods: the method instances used by the evaluation, by name (reused for the
            gallery; otherwise new ones are made).
        title: page title.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _write_curves(out_dir, result)
    galleries = {}
    if classifier is not None and annotations is not None and gallery > 0:
        galleries = _write_galleries(
            out_dir, result, classifier, annotations, gallery, dict(methods or {})
        )
    html = _render(result, figures, galleries, title)
    return write_text(out_dir / "report.html", html)


def worst_localized(records: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """The ``n`` records with the lowest IoU at the best threshold, then the lowest energy
    share (ties: input order).

    Example:
        >>> worst_localized([{"iou": 0.9, "energy_pointing_game": 0.5},
        ...                  {"iou": 0.1, "energy_pointing_game": 0.2}], 1)
        [{'iou': 0.1, 'energy_pointing_game': 0.2}]
    """
    ranked = sorted(
        enumerate(records),
        key=lambda item: (item[1].get("iou", 1.0), item[1].get("energy_pointing_game", 1.0)),
    )
    return [record for _, record in ranked[:n]]


# --- table -----------------------------------------------------------------------------------


def _table(result: Mapping[str, Any]) -> dict[str, Any]:
    """Rows: metrics (those with a value for some method); columns: methods."""
    methods = result.get("methods", {})
    keys = [
        key for key in METRICS if any(values.get(key) is not None for values in methods.values())
    ]
    rows = []
    for key in keys:
        values = [methods[name].get(key) for name in methods]
        best = _best(values, HIGHER_IS_BETTER[key])
        rows.append(
            {
                "key": key,
                "arrow": "\u2191" if HIGHER_IS_BETTER[key] else "\u2193",
                "help": METRICS[key],
                "cells": [
                    {"text": _format(v), "best": best is not None and _close(v, best)}
                    for v in values
                ],
            }
        )
    return {"methods": list(methods), "rows": rows}


def _best(values: Sequence[Any], higher: bool) -> float | None:
    """The best value as shown (3 decimals), or None when there is nothing to single out
    (one value, or a tie at the shown precision)."""
    numbers = [round(float(v), 3) for v in values if isinstance(v, (int, float))]
    if len(numbers) < 2:
        return None
    best = max(numbers) if higher else min(numbers)
    return None if all(_close(v, best) for v in numbers) else best


def _close(value: Any, best: float) -> bool:
    return isinstance(value, (int, float)) and round(float(value), 3) == best


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:.3f}"
    return str(value)


# --- curves ----------------------------------------------------------------------------------


def _write_curves(out_dir: Path, result: Mapping[str, Any]) -> list[dict[str, str]]:
    curves = result.get("curves", {})
    figures = []
    specs = [
        ("deletion", "Deletion (lower area is better)", "fraction of pixels removed"),
        ("insertion", "Insertion (higher area is better)", "fraction of pixels inserted"),
    ]
    score = result.get("settings", {}).get("score", "prob")
    ylabel = "class probability" if score == "prob" else "class logit"
    for key, heading, xlabel in specs:
        series = {m: c[key] for m, c in curves.items() if c.get(key)}
        if series:
            figure = _line_figure(
                {m: (np.linspace(0, 1, len(v)), v) for m, v in series.items()},
                heading,
                xlabel,
                ylabel,
                areas=True,
            )
            figures.append(_save(out_dir, f"curves/{key}.png", figure, heading))
    boxacc = {m: c["boxacc"] for m, c in curves.items() if c.get("boxacc")}
    if boxacc:
        heading = "Box accuracy (IoU >= 0.5) by map threshold; the peak is MaxBoxAcc"
        figure = _line_figure(
            {m: (c["thresholds"], c["0.5"]) for m, c in boxacc.items()},
            heading,
            "map threshold (fraction of the maximum)",
            "box accuracy",
        )
        figures.append(_save(out_dir, "curves/thresholds.png", figure, heading))
    road = {m: c["road"] for m, c in curves.items() if c.get("road")}
    if road:
        heading = "ROAD: probability after removal (MoRF solid, LeRF dashed)"
        figure = _road_figure(road, heading)
        figures.append(_save(out_dir, "curves/road.png", figure, heading))
    sanity = {m: s for m, s in result.get("sanity", {}).items() if s}
    if sanity:
        heading = "Sanity check: similarity to the trained model's maps (lower is better)"
        figures.append(_save(out_dir, "curves/sanity.png", _sanity_figure(sanity), heading))
    return figures


def _line_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    areas: bool = False,
) -> Figure:
    figure = Figure(figsize=_FIGSIZE, layout="constrained")
    ax = figure.add_subplot()
    for name, (xs, ys) in series.items():
        label = name
        if areas:
            ys_arr = np.asarray(ys, dtype=float)
            area = (ys_arr.sum() - (ys_arr[0] + ys_arr[-1]) / 2) / max(len(ys_arr) - 1, 1)
            label = f"{name} (AUC {area:.3f})"
        ax.plot(xs, ys, label=label, linewidth=1.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def _road_figure(road: Mapping[str, Mapping[str, Any]], title: str) -> Figure:
    figure = Figure(figsize=_FIGSIZE, layout="constrained")
    ax = figure.add_subplot()
    for index, (name, values) in enumerate(road.items()):
        color = f"C{index}"
        ax.plot(values["fractions"], values["morf"], color=color, label=f"{name} MoRF")
        ax.plot(values["fractions"], values["lerf"], color=color, ls="--", label=f"{name} LeRF")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("class probability")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def _sanity_figure(sanity: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    figure = Figure(figsize=_FIGSIZE, layout="constrained")
    ax = figure.add_subplot()
    for index, (name, stages) in enumerate(sanity.items()):
        steps = np.arange(len(stages))
        rho = [np.nan if s["spearman"] is None else s["spearman"] for s in stages]
        ssim = [np.nan if s["ssim"] is None else s["ssim"] for s in stages]
        ax.plot(steps, rho, marker="o", color=f"C{index}", label=f"{name} Spearman")
        ax.plot(steps, ssim, marker="s", ls="--", color=f"C{index}", label=f"{name} SSIM")
    stages = next(iter(sanity.values()))
    ax.set_xticks(np.arange(len(stages)), [s["stage"] for s in stages], rotation=90, fontsize=6)
    ax.set_xlabel("randomised down to (cumulative, from the logits)")
    ax.set_ylabel("similarity")
    ax.axhline(0, color="gray", lw=0.8)
    ax.grid(alpha=0.3)
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=6, loc="lower left", ncols=2)
    return figure


def _save(out_dir: Path, relative: str, figure: Figure, caption: str) -> dict[str, str]:
    save_figure(figure, out_dir / relative)
    return {"src": relative, "caption": caption}


# --- gallery ---------------------------------------------------------------------------------


def _write_galleries(
    out_dir: Path,
    result: Mapping[str, Any],
    classifier: Classifier,
    annotations: Sequence[Any],
    n: int,
    instances: dict[str, CAMMethod],
) -> dict[str, list[dict[str, str]]]:
    from camlens.api import explain, make_method

    by_image = {str(a.image): a for a in annotations}
    galleries = {}
    for method, records in result.get("per_image", {}).items():
        worst = [r for r in worst_localized(records, n) if r["image"] in by_image]
        if not worst:
            continue
        instance = instances.get(method) or make_method(classifier, method)
        explanation = explain(
            classifier,
            [r["image"] for r in worst],
            method=instance,
            target=[r["class"] for r in worst],
        )
        cards = []
        for i, record in enumerate(worst):
            annotation = by_image[record["image"]]
            heat = explanation.heatmap(i, 0, original=True)
            box = box_from_map(heat, record["iou_threshold_map"])
            image = overlay(explanation.images[i], heat, box=box)
            _draw_boxes(image, annotation.boxes_for(record["label"]))
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(record["image"]).stem)[:50]
            relative = f"gallery/{_safe(method)}/{i:02d}_{stem}_c{record['class']}.png"
            write_png(out_dir / relative, image)
            cards.append({"src": relative, "caption": _caption(record)})
        galleries[method] = cards
    return galleries


def _draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]]) -> None:
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 150))
    for x0, y0, x1, y1 in boxes:
        draw.rectangle(
            (round(x0), round(y0), round(x1) - 1, round(y1) - 1), outline=_GT_COLOR, width=width
        )


def _caption(record: Mapping[str, Any]) -> str:
    label = record.get("label") or record.get("predicted_label")
    parts = [
        f"{record['name']}: {label}",
        f"IoU {record['iou']:.2f} at threshold {record['iou_threshold_map']:.2f}",
        f"energy in boxes {record['energy_pointing_game']:.2f}",
        f"peak {'on' if record['pointing_game'] else 'off'} the object",
        f"predicted {record['predicted_label']}",
    ]
    return " · ".join(parts)


def _safe(name: str) -> str:
    """A folder name for a method: ``gradcam++`` -> ``gradcampp``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name.replace("+", "p")) or "method"


# --- page ------------------------------------------------------------------------------------


def _render(
    result: Mapping[str, Any],
    figures: list[dict[str, str]],
    galleries: Mapping[str, list[dict[str, str]]],
    title: str,
) -> str:
    table = _table(result)
    glossary = [{"key": row["key"], "help": row["help"]} for row in table["rows"]]
    summary = (
        f"{result.get('n_images', 0)} images, {result.get('n_instances', 0)} annotated "
        f"classes, {result.get('n_failed', 0)} failed"
    )
    sanity = {
        method: [
            {
                "stage": s["stage"],
                "spearman": _format(s["spearman"]),
                "ssim": _format(s["ssim"]),
            }
            for s in stages
        ]
        for method, stages in result.get("sanity", {}).items()
        if stages
    }
    return render_template(
        TEMPLATE_NAME,
        title=title,
        subtitle=f"model {result.get('model', '?')} · annotations {result.get('annotations', '?')}",
        summary=summary,
        table=table,
        figures=figures,
        galleries=galleries,
        sanity=sanity,
        glossary=glossary,
        errors=result.get("errors", []),
        settings={k: v for k, v in result.get("settings", {}).items() if k != "map_thresholds"},
    )
