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
  exemplar overlays;
* ``figures/flags/<n>_paste_<j>_before.png`` / ``_after.png`` and ``..._erase_...``: the
  counterfactual examples;
* ``figures/worst/<class>_<j>.png``: with annotations, the images whose map lies most
  outside the object.

The figure paths are also written into the result (``classes[label]["figures"]``,
``flags[i]["figures"]``) so that ``audit.json`` points to them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from camlens.formatting import percent
from camlens.render import colorize, overlay
from camlens.report.html import render_template
from camlens.writers import write_png, write_text

__all__ = ["write_audit_report"]

TEMPLATE_NAME = "audit.html.j2"
_SIDE = 192
_THUMB = 128
_CONFIRMED = (230, 30, 30)
_CANDIDATE = (255, 255, 255)


def write_audit_report(
    out_dir: str | os.PathLike,
    result: dict[str, Any],
    artifacts: Any,
    *,
    title: str = "camlens audit",
) -> Path:
    """Write ``report.html`` and its figures; add the figure paths to ``result``.

    Parameters:
        out_dir: output folder (created).
        result: what ``run_audit`` computed (the content of ``audit.json``).
        artifacts: the ``AuditArtifacts`` of the run (statistics, clusters, test examples).
        title: page title.

    Returns:
        The path of ``report.html``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = list(artifacts.classifier.labels)
    classes, others = [], []
    for label, entry in result["classes"].items():
        if not entry["audited"]:
            others.append(f"{label} ({entry['n_images']})")
            continue
        cls = entry["index"]
        stats = artifacts.accumulator.stats[cls]
        finding = artifacts.findings.get(cls)
        figures = _class_figures(out_dir, label, stats, entry)
        entry["figures"] = figures
        card = {"label": label, "entry": entry, "figures": figures, "clusters": [], "worst": []}
        if finding is not None and finding.spray is not None:
            card["clusters"] = _cluster_figures(out_dir, label, cls, finding, artifacts)
        if entry.get("annotations"):
            card["worst"] = _worst_figures(out_dir, label, cls, entry["annotations"], artifacts)
        classes.append(card)
    flags = []
    for number, flag in enumerate(result["flags"]):
        cls = labels.index(flag["class"])
        confirmation = _confirmation_of(artifacts.findings.get(cls), flag)
        figures = _flag_figures(out_dir, number, flag, confirmation, labels)
        flag["figures"] = {
            key: [{k: v for k, v in ex.items() if k != "caption"} for ex in examples]
            for key, examples in figures.items()
        }
        flags.append({"flag": flag, "examples": figures, "place": _place(flag["box"])})
    html = _render(result, classes, others, flags, title)
    return write_text(out_dir / "report.html", html)


# --- figures -------------------------------------------------------------------------------


def _class_figures(
    out_dir: Path, label: str, stats: Any, entry: Mapping[str, Any]
) -> dict[str, str]:
    stem = f"figures/classes/{_safe(label)}"
    mean_image = Image.fromarray(np.rint(stats.mean_image * 255).astype(np.uint8))
    mean_image = mean_image.resize((_SIDE, _SIDE), Image.BILINEAR)
    mean_map = stats.mean_map
    peak = float(mean_map.max())
    heat = _resize_map(mean_map / peak if peak > 0 else mean_map, _SIDE)
    picture = overlay(mean_image, heat, alpha=0.5)
    frequency = Image.fromarray(colorize(_resize_map(stats.frequency, _SIDE, nearest=True), "gray"))
    for hotspot in entry.get("hotspots", []):
        color = _CONFIRMED if hotspot.get("confirmed") else _CANDIDATE
        _outline(picture, hotspot["box"], color)
        _outline(
            frequency, hotspot["box"], _CONFIRMED if hotspot.get("confirmed") else (0, 160, 255)
        )
    write_png(out_dir / f"{stem}_mean.png", picture)
    write_png(out_dir / f"{stem}_frequency.png", frequency)
    return {"mean_map": f"{stem}_mean.png", "frequency": f"{stem}_frequency.png"}


def _cluster_figures(
    out_dir: Path, label: str, cls: int, finding: Any, artifacts: Any
) -> list[dict[str, Any]]:
    from camlens.api import explain, make_method

    spray = finding.spray
    method = make_method(artifacts.classifier, artifacts.method, artifacts.layer)
    cards = []
    for k, cluster in enumerate(spray.clusters):
        stem = f"figures/clusters/{_safe(label)}_{k}"
        peak = float(cluster.mean_map.max())
        heat = _resize_map(cluster.mean_map / peak if peak > 0 else cluster.mean_map, _THUMB)
        write_png(out_dir / f"{stem}.png", Image.fromarray(colorize(heat)))
        sources = [finding.spray_sources[i] for i in cluster.exemplars]
        exemplars = []
        if sources:
            explanation = explain(
                artifacts.classifier, sources, method=method, target=[cls] * len(sources)
            )
            for j, source in enumerate(sources):
                image = explanation.image_overlays(j, threshold=None)[0]
                relative = f"{stem}_ex{j}.png"
                write_png(out_dir / relative, _thumbnail(image, _THUMB))
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
    out_dir: Path, label: str, cls: int, annotations: Mapping[str, Any], artifacts: Any
) -> list[dict[str, str]]:
    from camlens.api import explain, make_method

    worst = annotations.get("worst", [])
    if not worst:
        return []
    method = make_method(artifacts.classifier, artifacts.method, artifacts.layer)
    sources = [w["image"] for w in worst]
    explanation = explain(artifacts.classifier, sources, method=method, target=[cls] * len(sources))
    cards = []
    for j, item in enumerate(worst):
        relative = f"figures/worst/{_safe(label)}_{j}.png"
        image = explanation.image_overlays(j, threshold=None)[0]
        write_png(out_dir / relative, _thumbnail(image, _THUMB))
        cards.append(
            {
                "src": relative,
                "caption": f"{Path(item['image']).name}: {percent(item['outside_share'])} outside",
            }
        )
    return cards


def _flag_figures(
    out_dir: Path, number: int, flag: Mapping[str, Any], confirmation: Any, labels: list[str]
) -> dict[str, list[dict[str, str]]]:
    if confirmation is None:
        return {}
    stem = f"figures/flags/{number:02d}"
    figures: dict[str, list[dict[str, str]]] = {"paste": [], "erase": []}
    for j, example in enumerate(confirmation.paste.examples):
        before, after = _pair(out_dir, f"{stem}_paste_{j}", example)
        figures["paste"].append(
            {
                "before": before,
                "after": after,
                "caption": (
                    f"{_name(labels, example['before_class'])} {percent(example['before_prob'])}"
                    f" \u2192 {_name(labels, example['after_class'])} "
                    f"{percent(example['after_prob'])}"
                ),
            }
        )
    for j, example in enumerate(confirmation.erase.examples):
        before, after = _pair(out_dir, f"{stem}_erase_{j}", example)
        figures["erase"].append(
            {
                "before": before,
                "after": after,
                "caption": (
                    f"p({flag['class']}) {percent(example['before_prob'])} \u2192 "
                    f"{percent(example['after_prob'])}"
                ),
            }
        )
    return figures


def _pair(out_dir: Path, stem: str, example: Mapping[str, Any]) -> tuple[str, str]:
    before = _enlarge(Image.fromarray(example["before"]), _THUMB)
    after = Image.fromarray(example["after"])
    scale = _THUMB / max(after.size)
    after = _enlarge(after, _THUMB)
    x0, y0, x1, y1 = example["box"]
    draw = ImageDraw.Draw(after)
    draw.rectangle(
        (x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1), outline=_CONFIRMED, width=2
    )
    write_png(out_dir / f"{stem}_before.png", before)
    write_png(out_dir / f"{stem}_after.png", after)
    return f"{stem}_before.png", f"{stem}_after.png"


def _confirmation_of(finding: Any, flag: Mapping[str, Any]) -> Any:
    if finding is None:
        return None
    for hotspot, confirmation in zip(finding.hotspot_records, finding.confirmations, strict=True):
        if hotspot["box"] == flag["box"]:
            return confirmation
    return None


def _resize_map(values: np.ndarray, side: int, *, nearest: bool = False) -> np.ndarray:
    image = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    resized = image.resize((side, side), Image.NEAREST if nearest else Image.BILINEAR)
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
    from camlens.audit.core import describe_place

    return describe_place(box) if box else ""


def _name(labels: list[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:60] or "class"


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
