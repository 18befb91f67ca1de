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

Everything is drawn from the summary, the records (each stores the raw maps of its explained
classes) and the image files: the report never runs the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from camlens.io import ImageLoadError, load_image
from camlens.localize import box_from_map, normalize_maps
from camlens.metrics.registry import HIGHER_IS_BETTER, METRICS
from camlens.pipeline import OutputFolder, as_output_folder
from camlens.render import overlay, save_figure
from camlens.report.html import render_template
from camlens.writers import safe_name, write_png, write_text

__all__ = ["REPORT_FILE", "curve_steps_note", "worst_localized", "write_evaluation_report"]

TEMPLATE_NAME = "evaluate.html.j2"
#: The report's page in the output folder.
REPORT_FILE = "report.html"
_GT_COLOR = (0, 220, 0)
_FIGSIZE = (6.0, 4.0)


def write_evaluation_report(
    out: OutputFolder | str | os.PathLike,
    result: Mapping[str, Any],
    records: Iterable[Mapping[str, Any]] | None = None,
    *,
    annotations: Sequence[Any] | None = None,
    gallery: int = 6,
    title: str = "camlens evaluate",
) -> Path:
    """Write ``report.html`` and its figures into ``out``; return the page's path.

    Everything is drawn from what the evaluation stored: the summary, the records (with the
    raw maps of their explained classes, ``arrays``), the annotation boxes and the image
    files. No model runs here.

    Parameters:
        out: the output folder (an ``OutputFolder``, or a path: created, files recorded).
        result: what ``camlens.evaluate`` returned (``metrics.json``).
        records: the evaluation's records in input order, with their arrays (e.g.
            ``folder.log("evaluation.jsonl").records()``); without them, no gallery.
        annotations: the evaluated ``Annotation`` list, for the ground-truth boxes drawn in
            the gallery (without them, the maps are drawn alone).
        gallery: how many worst-localised images to show per method.
        title: page title.
    """
    if not isinstance(out, OutputFolder):
        Path(out).mkdir(parents=True, exist_ok=True)
    folder = as_output_folder(out)
    figures = _write_curves(folder, result)
    galleries = {}
    if records is not None and gallery > 0:
        galleries = _write_galleries(folder, result, records, annotations or [], gallery)
    html = _render(result, figures, galleries, title)
    return write_text(folder.path(REPORT_FILE), html)


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


def _write_curves(folder: OutputFolder, result: Mapping[str, Any]) -> list[dict[str, str]]:
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
            figures.append(_save(folder, f"curves/{key}.png", figure, heading))
    boxacc = {m: c["boxacc"] for m, c in curves.items() if c.get("boxacc")}
    if boxacc:
        heading = "Box accuracy (IoU >= 0.5) by map threshold; the peak is MaxBoxAcc"
        figure = _line_figure(
            {m: (c["thresholds"], c["0.5"]) for m, c in boxacc.items()},
            heading,
            "map threshold (fraction of the maximum)",
            "box accuracy",
        )
        figures.append(_save(folder, "curves/thresholds.png", figure, heading))
    road = {m: c["road"] for m, c in curves.items() if c.get("road")}
    if road:
        heading = "ROAD: probability after removal (MoRF solid, LeRF dashed)"
        figure = _road_figure(road, heading)
        figures.append(_save(folder, "curves/road.png", figure, heading))
    sanity = {m: s for m, s in result.get("sanity", {}).items() if s}
    if sanity:
        heading = "Sanity check: similarity to the trained model's maps (lower is better)"
        figures.append(_save(folder, "curves/sanity.png", _sanity_figure(sanity), heading))
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


def curve_steps_note(result: Mapping[str, Any]) -> str | None:
    """``"deletion/insertion: N steps (N + 1 points per curve)"``, N read from the stored
    mean curves (the steps the run used), or from ``settings.steps`` when no curve is
    stored; ``None`` when neither deletion nor insertion was measured.

    Example:
        >>> curve_steps_note({"curves": {"cam": {"deletion": [1.0, 0.5, 0.0]}}})
        'deletion/insertion: 2 steps (3 points per curve)'
    """
    lengths = {
        len(series[key])
        for series in result.get("curves", {}).values()
        for key in ("deletion", "insertion")
        if series.get(key)
    }
    if lengths:
        steps = max(lengths) - 1
    elif any(key in result.get("metrics", ()) for key in ("deletion_auc", "insertion_auc")):
        steps = result.get("settings", {}).get("steps")
        if steps is None:
            return None
    else:
        return None
    return f"deletion/insertion: {steps} steps ({steps + 1} points per curve)"


def _save(folder: OutputFolder, relative: str, figure: Figure, caption: str) -> dict[str, str]:
    save_figure(figure, folder.path(relative))
    return {"src": relative, "caption": caption}


# --- gallery ---------------------------------------------------------------------------------


def _write_galleries(
    folder: OutputFolder,
    result: Mapping[str, Any],
    records: Iterable[Mapping[str, Any]],
    annotations: Sequence[Any],
    n: int,
) -> dict[str, list[dict[str, str]]]:
    """Each method's ``n`` worst-localised instances: the stored map of the annotated class
    over the photo, its box at MaxBoxAcc's best threshold (white), the ground truth (green)."""
    worst = {
        method: worst_localized(rows, n) for method, rows in result.get("per_image", {}).items()
    }
    maps = _stored_maps(records, worst)
    boxes = {str(a.image): a for a in annotations}
    galleries = {}
    for method, rows in worst.items():
        cards = []
        for i, row in enumerate(rows):
            raw = maps.get((method, row["image"], row["label"]))
            if raw is None:
                continue
            try:
                image = load_image(row["image"])
            except ImageLoadError:
                continue
            width, height = image.size
            heat = normalize_maps(torch.from_numpy(raw)[None, None], (height, width))[0, 0]
            heat = heat.numpy()
            picture = overlay(image, heat, box=box_from_map(heat, row["iou_threshold_map"]))
            if row["image"] in boxes:
                _draw_boxes(picture, boxes[row["image"]].boxes_for(row["label"]))
            stem = safe_name(Path(row["image"]).stem, 50)
            relative = f"gallery/{_safe(method)}/{i:02d}_{stem}_c{row['class']}.png"
            write_png(folder.path(relative), picture)
            cards.append({"src": relative, "caption": _caption(row)})
        if cards:
            galleries[method] = cards
    return galleries


def _stored_maps(
    records: Iterable[Mapping[str, Any]], worst: Mapping[str, Sequence[Mapping[str, Any]]]
) -> dict[tuple[str, str, Any], np.ndarray]:
    """The raw maps of the rows in ``worst``, from the records' arrays: ``(method, image,
    label) -> (h, w)``. Reads the records once and keeps only those maps."""
    wanted = {
        (method, row["image"], row["label"]) for method, rows in worst.items() for row in rows
    }
    images = {image for _, image, _ in wanted}
    found: dict[tuple[str, str, Any], np.ndarray] = {}
    for record in records:
        if record.get("status") != "ok" or record.get("image") not in images:
            continue
        arrays = record.get("arrays")
        if not isinstance(arrays, Mapping):
            continue
        for method, values in record.get("methods", {}).items():
            if method not in arrays:
                continue
            for column, instance in enumerate(values["instances"], start=1):
                key = (method, record["image"], instance["label"])
                if key in wanted and key not in found and column < len(arrays[method]):
                    found[key] = np.asarray(arrays[method][column], dtype=np.float32)
    return found


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
    return safe_name(name.replace("+", "p"), fallback="method")


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
        curve_note=curve_steps_note(result),
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
