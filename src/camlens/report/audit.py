"""The audit report: ``report.html`` beside ``audit.json``, readable in a minute.

The page opens with the plain-language verdict, then the flags table, one section per flag
with the counterfactual numbers and before/after examples, and one section per audited class
(classes left out by ``classes=`` or with too few images are only listed by name). Static HTML
and CSS (no JavaScript, nothing remote); the figures are PNG files beside it:

* ``figures/classes/<class>_mean.png``: the class's mean map over its mean image, with the
  hotspots outlined (red: confirmed, white: not confirmed);
* ``figures/classes/<class>_frequency.png``: how often each place is among the most
  activated pixels (black 0 % .. white 100 % of the class's images);
* ``figures/clusters/<class>_<k>.png`` and ``..._ex<j>.png``: SpRAy clusters: mean map and
  exemplars (the image with its stored grid map over it);
* ``figures/flags/<n>_paste_<j>_before.png`` / ``_after.png`` and ``..._erase_...``: the
  counterfactual examples;
* ``figures/worst/<class>_<j>.png``: with annotations, the images whose map lies most
  outside the object (the image with its stored grid map over it);
* ``figures/patterns/<class>_<k>_exemplar.png`` and ``..._at<j>.png``: a moving pattern's
  exemplar (its region cut from the original image; the flag's ``exemplar``) and images
  where it was found, its box outlined.

Everything is drawn from the result, the fold's summary (``camlens.shortcuts.AuditSummary``:
statistics, clusters, the counterfactual examples) and the map pass's stored records (the grid
map of every image); the model is never run again, only image files are read. The figure
paths are also written into the result (``classes[label]["figures"]``, ``flags[i]["figures"]``)
so that ``audit.json`` points to them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from camlens.formatting import percent
from camlens.io import ImageLoadError, load_image
from camlens.pipeline import OutputFolder, as_output_folder
from camlens.render import colorize, overlay
from camlens.report.html import render_template
from camlens.shortcuts.confirm import Confirmation
from camlens.shortcuts.core import AuditSummary, ClassFinding, describe_place
from camlens.shortcuts.find import ClassMapStats
from camlens.shortcuts.moving import Pattern
from camlens.writers import safe_name, write_png, write_text

__all__ = ["write_audit_report"]

TEMPLATE_NAME = "audit.html.j2"
_SIDE = 192
_THUMB = 128
_CONFIRMED = (230, 30, 30)
_CANDIDATE = (255, 255, 255)
_LOCATIONS_SHOWN = 6


def write_audit_report(
    out: OutputFolder | str | os.PathLike,
    result: dict[str, Any],
    summary: AuditSummary,
    records: Iterable[Mapping[str, Any]] = (),
    *,
    title: str = "camlens audit",
) -> Path:
    """Write ``report.html`` and its figures; add the figure paths to ``result``.

    Parameters:
        out: the output folder (an ``OutputFolder``, or a path: files are recorded in its
            manifest but never refused).
        result: what ``camlens.audit`` computed (the content of ``audit.json``).
        summary: the fold's summary of the run, its hotspots' confirmations filled in
            (statistics, clusters, counterfactual examples).
        records: the map pass's records with their arrays (``"input"``, ``arrays["map"]``):
            the exemplars and worst images are drawn with their stored grid maps. Only the
            records of those images are kept while reading.
        title: page title.

    Returns:
        The path of ``report.html``.

    Example (what ``camlens.audit`` does: the map pass, the counterfactuals, then the report
    from the stored records; the model is not run again):
        >>> import camlens, os
        >>> from camlens.io.imagefolder import scan_image_folder
        >>> from camlens.pipeline import RunOptions, run
        >>> from camlens.shortcuts import AuditSettings, build_result
        >>> from camlens.shortcuts.counterfactuals import confirm_findings
        >>> from camlens.tasks.audit import AuditTask
        >>> model, settings = camlens.load_model("runs/shapes"), AuditSettings()
        >>> data = scan_image_folder("shapes/images")
        >>> images = list(zip(map(str, data.paths), data.targets))
        >>> folder = OutputFolder("audit_out")
        >>> task, options = AuditTask(model, search=settings), RunOptions(progress=False)
        >>> summary = run(task, images, "audit_out", options, folder=folder).summary
        >>> confirm_findings(model, summary, settings)
        >>> result = build_result(summary, model=model.name, method="cam", data="shapes/images",
        ...                       labels_from="folders", n_found=len(images), annotations=None,
        ...                       settings=settings, seed=0)
        >>> records = folder.log(AuditTask.records_file, AuditTask.parts_dir).records()
        >>> write_audit_report(folder, result, summary, records)
        PosixPath('audit_out/report.html')
        >>> sorted(os.listdir("audit_out/figures")), sorted(result["classes"]["square"]["figures"])
        (['classes', 'clusters', 'flags'], ['frequency', 'mean_map'])
    """
    folder = as_output_folder(out)
    labels = list(summary.labels)
    maps = _stored_maps(records, _wanted_sources(result, summary))
    classes, others = [], []
    for label, entry in result["classes"].items():
        if not entry["audited"]:
            others.append(f"{label} ({entry['n_images']})")
            continue
        cls = entry["index"]
        stats = summary.accumulator.stats[cls]
        finding = summary.findings.get(cls)
        figures = _class_figures(folder, label, stats, entry)
        entry["figures"] = figures
        card = {"label": label, "entry": entry, "figures": figures, "clusters": [], "worst": []}
        if finding is not None and finding.spray is not None:
            card["clusters"] = _cluster_figures(folder, label, finding, maps)
        if entry.get("annotations"):
            card["worst"] = _worst_figures(folder, label, entry["annotations"], maps)
        classes.append(card)
    flags = []
    for number, flag in enumerate(result["flags"]):
        cls = labels.index(flag["class"])
        confirmation = _confirmation_of(summary.findings.get(cls), flag)
        figures = _flag_figures(folder, number, flag, confirmation, labels)
        flag["figures"] = {
            key: [{k: v for k, v in ex.items() if k != "caption"} for ex in examples]
            for key, examples in figures.items()
        }
        card = {"flag": flag, "examples": figures, "place": _place(flag["box"]), "pattern": None}
        if flag["kind"] == "moving-pattern":
            card["pattern"] = _pattern_figures(folder, flag)
            card["place"] = "at varying places"
        flags.append(card)
    html = _render(result, classes, others, flags, title)
    return write_text(folder.path("report.html"), html)


# --- the stored maps ---------------------------------------------------------------------------


def _wanted_sources(result: Mapping[str, Any], summary: AuditSummary) -> set[str]:
    """The images the report shows with their maps: cluster exemplars and worst images."""
    wanted: set[str] = set()
    for entry in result["classes"].values():
        if not entry["audited"]:
            continue
        finding = summary.findings.get(entry["index"])
        if finding is not None and finding.spray is not None:
            for cluster in finding.spray.clusters:
                wanted.update(finding.spray_sources[i] for i in cluster.exemplars)
        wanted.update(w["image"] for w in entry.get("annotations", {}).get("worst", []))
    return wanted


def _stored_maps(records: Iterable[Mapping[str, Any]], wanted: set[str]) -> dict[str, np.ndarray]:
    """The stored grid map of every wanted image, read from the map pass's records."""
    maps: dict[str, np.ndarray] = {}
    if not wanted:
        return maps
    for record in records:
        source = record.get("input")
        arrays = record.get("arrays")
        if source in wanted and isinstance(arrays, Mapping) and "map" in arrays:
            maps[source] = np.asarray(arrays["map"], dtype=np.float32)
    return maps


def _map_overlay(source: str, grid_map: np.ndarray | None, side: int) -> Image.Image | None:
    """The image file ``source`` at thumbnail size, its grid map over it (None when the file
    cannot be read any more or its map is not stored)."""
    if grid_map is None:
        return None
    try:
        image = load_image(source)
    except ImageLoadError:
        return None
    picture = _thumbnail(image, side)
    heat = _resize_map(grid_map, picture.size)
    return overlay(picture, heat, alpha=0.5)


# --- figures -------------------------------------------------------------------------------


def _class_figures(
    folder: OutputFolder, label: str, stats: ClassMapStats, entry: Mapping[str, Any]
) -> dict[str, str]:
    stem = f"figures/classes/{_file_name(label)}"
    mean_image = Image.fromarray(np.rint(stats.mean_image * 255).astype(np.uint8))
    mean_image = mean_image.resize((_SIDE, _SIDE), Image.BILINEAR)
    mean_map = stats.mean_map
    peak = float(mean_map.max())
    heat = _resize_map(mean_map / peak if peak > 0 else mean_map, (_SIDE, _SIDE))
    picture = overlay(mean_image, heat, alpha=0.5)
    frequency = Image.fromarray(
        colorize(_resize_map(stats.frequency, (_SIDE, _SIDE), nearest=True), "gray")
    )
    for hotspot in entry.get("hotspots", []):
        color = _CONFIRMED if hotspot.get("confirmed") else _CANDIDATE
        _outline(picture, hotspot["box"], color)
        _outline(
            frequency, hotspot["box"], _CONFIRMED if hotspot.get("confirmed") else (0, 160, 255)
        )
    write_png(folder.path(f"{stem}_mean.png"), picture)
    write_png(folder.path(f"{stem}_frequency.png"), frequency)
    return {"mean_map": f"{stem}_mean.png", "frequency": f"{stem}_frequency.png"}


def _cluster_figures(
    folder: OutputFolder, label: str, finding: ClassFinding, maps: Mapping[str, np.ndarray]
) -> list[dict[str, Any]]:
    spray = finding.spray
    cards = []
    for k, cluster in enumerate(spray.clusters):
        stem = f"figures/clusters/{_file_name(label)}_{k}"
        peak = float(cluster.mean_map.max())
        heat = _resize_map(
            cluster.mean_map / peak if peak > 0 else cluster.mean_map, (_THUMB, _THUMB)
        )
        write_png(folder.path(f"{stem}.png"), Image.fromarray(colorize(heat)))
        exemplars = []
        for j, i in enumerate(cluster.exemplars):
            source = finding.spray_sources[i]
            picture = _map_overlay(source, maps.get(source), _THUMB)
            if picture is None:
                continue
            relative = f"{stem}_ex{j}.png"
            write_png(folder.path(relative), picture)
            exemplars.append({"src": relative, "caption": Path(source).name})
        cards.append(
            {
                "index": k + 1,
                "size": cluster.size,
                "fraction": cluster.size / max(spray.n_maps, 1),
                "mean_map": f"{stem}.png",
                "focus": _place(cluster.focus) if cluster.focus else "nowhere in particular",
                "exemplars": exemplars,
            }
        )
    return cards


def _worst_figures(
    folder: OutputFolder,
    label: str,
    annotations: Mapping[str, Any],
    maps: Mapping[str, np.ndarray],
) -> list[dict[str, str]]:
    cards = []
    for j, item in enumerate(annotations.get("worst", [])):
        picture = _map_overlay(item["image"], maps.get(item["image"]), _THUMB)
        if picture is None:
            continue
        relative = f"figures/worst/{_file_name(label)}_{j}.png"
        write_png(folder.path(relative), picture)
        cards.append(
            {
                "src": relative,
                "caption": f"{Path(item['image']).name}: {percent(item['outside_share'])} outside",
            }
        )
    return cards


def _flag_figures(
    folder: OutputFolder,
    number: int,
    flag: Mapping[str, Any],
    confirmation: Confirmation | None,
    labels: list[str],
) -> dict[str, list[dict[str, str]]]:
    if confirmation is None:
        return {}
    stem = f"figures/flags/{number:02d}"
    figures: dict[str, list[dict[str, str]]] = {}
    for test, examples in (
        ("paste", confirmation.paste.examples),
        ("erase", confirmation.erase.examples),
    ):
        figures[test] = []
        for j, example in enumerate(examples):
            before, after = _pair(folder, f"{stem}_{test}_{j}", example)
            was, now = percent(example["before_prob"]), percent(example["after_prob"])
            caption = (
                f"{_name(labels, example['before_class'])} {was} \u2192 "
                f"{_name(labels, example['after_class'])} {now}"
                if test == "paste"
                else f"p({flag['class']}) {was} \u2192 {now}"
            )
            figures[test].append({"before": before, "after": after, "caption": caption})
    return figures


def _pattern_figures(folder: OutputFolder, flag: Mapping[str, Any]) -> dict[str, Any]:
    """A moving pattern's exemplar (its box cut from the original image, enlarged, written to
    the flag's ``exemplar``) and the first images where it was found, the box outlined."""
    stem = flag["exemplar"].removesuffix("_exemplar.png")
    exemplar = None
    try:
        image = load_image(flag["exemplar_image"])
    except ImageLoadError:
        image = None
    if image is not None:
        width, height = image.size
        x0, y0, x1, y1 = flag["box"]
        left, top = round(x0 * width), round(y0 * height)
        crop = image.crop(
            (left, top, max(left + 1, round(x1 * width)), max(top + 1, round(y1 * height)))
        )
        exemplar = flag["exemplar"]
        write_png(folder.path(exemplar), _enlarge(crop, _THUMB))
    places = []
    for j, location in enumerate(flag["locations"][:_LOCATIONS_SHOWN]):
        try:
            picture = _thumbnail(load_image(location["image"]), _THUMB)
        except ImageLoadError:
            continue
        _outline(picture, location["box"], _CONFIRMED if flag["confirmed"] else (0, 160, 255))
        relative = f"{stem}_at{j}.png"
        write_png(folder.path(relative), picture)
        places.append(
            {
                "src": relative,
                "caption": f"{Path(location['image']).name}: {_place(location['box'])}",
            }
        )
    return {"exemplar": exemplar, "locations": places, "n_locations": len(flag["locations"])}


def _pair(folder: OutputFolder, stem: str, example: Mapping[str, Any]) -> tuple[str, str]:
    before = _enlarge(Image.fromarray(example["before"]), _THUMB)
    after = Image.fromarray(example["after"])
    scale = _THUMB / max(after.size)
    after = _enlarge(after, _THUMB)
    x0, y0, x1, y1 = example["box"]
    draw = ImageDraw.Draw(after)
    draw.rectangle(
        (x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1), outline=_CONFIRMED, width=2
    )
    write_png(folder.path(f"{stem}_before.png"), before)
    write_png(folder.path(f"{stem}_after.png"), after)
    return f"{stem}_before.png", f"{stem}_after.png"


def _confirmation_of(finding: ClassFinding | None, flag: Mapping[str, Any]) -> Confirmation | None:
    if finding is None:
        return None
    if flag["kind"] == "moving-pattern":
        for pattern, confirmation in zip(
            finding.patterns, finding.pattern_confirmations, strict=True
        ):
            if _is_flag_of(pattern, flag):
                return confirmation
        return None
    for hotspot, confirmation in zip(finding.hotspot_records, finding.confirmations, strict=True):
        if hotspot["box"] == flag["box"]:
            return confirmation
    return None


def _is_flag_of(pattern: Pattern, flag: Mapping[str, Any]) -> bool:
    box = [round(v, 4) for v in pattern.boxes[pattern.exemplar]]
    return pattern.sources[pattern.exemplar] == flag["exemplar_image"] and box == flag["box"]


def _resize_map(values: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """A map in [0, 1] resized to ``size`` = (width, height)."""
    image = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    resized = image.resize(size, Image.NEAREST if nearest else Image.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _outline(image: Image.Image, box: Sequence[float], color: tuple[int, int, int]) -> None:
    width, height = image.size
    x0, y0, x1, y1 = box
    ImageDraw.Draw(image).rectangle(
        (x0 * width, y0 * height, x1 * width - 1, y1 * height - 1), outline=color, width=3
    )


def _enlarge(image: Image.Image, side: int) -> Image.Image:
    """Scale up small images (nearest neighbour keeps the pixels visible)."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale >= 2 else Image.BILINEAR)


def _thumbnail(image: Image.Image, side: int) -> Image.Image:
    if max(image.size) <= side:
        return _enlarge(image, side)
    copy = image.copy()
    copy.thumbnail((side, side), Image.BILINEAR)
    return copy


def _place(box: Sequence[float] | None) -> str:
    return describe_place(box) if box else ""


def _file_name(label: str) -> str:
    return safe_name(label, fallback="class")


def _name(labels: list[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)


# --- page ----------------------------------------------------------------------------------


def _render(
    result: Mapping[str, Any],
    classes: list[dict[str, Any]],
    others: list[str],
    flags: list[dict[str, Any]],
    title: str,
) -> str:
    settings = result.get("settings", {})
    subtitle = (
        f"model {result.get('model')} · method {result.get('method')} · data {result.get('data')}"
        f" · classes from {result.get('labels_from')} · {result.get('n_images')} images"
        + (f" ({result.get('n_failed')} unreadable)" if result.get("n_failed") else "")
    )
    return render_template(
        TEMPLATE_NAME,
        title=title,
        subtitle=subtitle,
        summary=result.get("summary", []),
        any_confirmed=any(f["confirmed"] for f in result.get("flags", [])),
        flags=flags,
        classes=classes,
        others=others,
        min_class_images=settings.get("min_class_images"),
        rule=settings.get("rule", {}),
        settings={k: v for k, v in settings.items() if k != "rule"},
        errors=result.get("errors", []),
        seconds=result.get("seconds"),
    )
