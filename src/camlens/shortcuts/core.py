"""The audit's analysis between the map pass and the report: pure, no model.

* :class:`AuditSettings`: how the audit searches and decides.
* :class:`AuditFold`: folds the maps of the map pass (one grid map, thumbnail, class and
  prediction per image) into the statistics of ``camlens.shortcuts.find`` (per-class mean and
  top-cell frequency maps, the top cells of every image spooled to disk), the seeded SpRAy
  samples of ``camlens.shortcuts.spray``, the accuracy and, with annotations, the share of
  each map outside the object; then finds every audited class's hotspots and SpRAy clusters
  (:func:`find_classes`). The result is an :class:`AuditSummary`.
* :func:`build_result`: the content of ``audit.json`` from the summary, once the
  counterfactual tests (``camlens.shortcuts.counterfactuals``, which run the model) have
  filled in each hotspot's confirmation; :func:`summary_sentences` and
  :func:`describe_place` put it in plain words.

Memory does not grow with the number of images beyond one bit per grid cell and image (in a
temporary file) and the bounded SpRAy samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from camlens.errors import ConfigError
from camlens.formatting import percent, two_decimals
from camlens.io.annotations import Annotation
from camlens.shortcuts.confirm import ERASE_MODES, Confirmation, ConfirmRule
from camlens.shortcuts.find import (
    Hotspot,
    MapAccumulator,
    TopCellSpool,
    find_hotspots,
    heat_share,
)
from camlens.shortcuts.moving import Pattern, PatternCollector, PatternSettings, find_patterns
from camlens.shortcuts.spray import ClassReservoirs, SprayResult, spectral_relevance_analysis
from camlens.writers import Closing, safe_name

__all__ = [
    "THUMB_SIDE",
    "AuditFold",
    "AuditSettings",
    "AuditSummary",
    "ClassFinding",
    "box_on_object",
    "build_result",
    "describe_place",
    "exemplar_path",
    "find_classes",
    "object_grid",
    "summary_sentences",
    "widen_box",
]

#: Side of the thumbnails the map pass keeps of every image (for the classes' mean images).
THUMB_SIDE = 64


@dataclass(frozen=True)
class AuditSettings:
    """How the audit searches and decides (defaults suit most data sets).

    Attributes:
        grid: side of the grid every map is compared on.
        top_fraction: share of a map's cells counted as its most activated ("top") cells.
        min_frequency: a hotspot's cells are top cells on at least this share of the class's
            images (see ``find_hotspots``).
        specificity: ... and this many times more often than for the other classes.
        max_area: a hotspot covers at most this share of the image.
        min_cover: an image counts as affected when its top cells cover at least this share
            of the hotspot.
        min_class_images: classes with fewer images are not searched.
        spray_side: side of the maps SpRAy clusters.
        spray_maps: at most this many maps per class enter SpRAy (seeded reservoir sample).
        max_clusters: the most clusters SpRAy's eigengap may choose.
        confirm_images: images per class used as donors and as recipients by the tests.
        erase: ``"blur"`` or ``"mean"``: how the erase test removes a region.
        margin_cells: the tested region is the hotspot widened by this many cells of the
            model's feature map on every side: a map is only as sharp as that grid (and CAM
            tends to pull a border object's heat inwards), so the widened box covers the
            whole cause.
        object_overlap: with annotations, a hotspot whose cells are on the object in at least
            this share of the class's images is the usual place of the object, not a shortcut.
        rule: when a hotspot is confirmed (see ``camlens.shortcuts.confirm``).
        patterns: the search for small patterns that move (``camlens.shortcuts.moving``); by
            default on annotated images only, off the object.

    Example:
        >>> AuditSettings(confirm_images=60).check().confirm_images
        60
    """

    grid: int = 32
    top_fraction: float = 0.05
    min_frequency: float = 0.3
    specificity: float = 2.0
    max_area: float = 0.25
    min_cover: float = 0.5
    min_class_images: int = 20
    spray_side: int = 16
    spray_maps: int = 400
    max_clusters: int = 6
    confirm_images: int = 100
    erase: str = "blur"
    margin_cells: float = 1.0
    object_overlap: float = 0.5
    rule: ConfirmRule = field(default_factory=ConfirmRule)
    patterns: PatternSettings = field(default_factory=PatternSettings)

    def check(self) -> AuditSettings:
        """These settings, after checking them (a bad value is a ``ConfigError``, raised
        before an audit does any work)."""
        problems = []
        if self.grid < 2:
            problems.append(f"grid must be at least 2, got {self.grid}")
        if not 0.0 < self.top_fraction <= 1.0:
            problems.append(f"top_fraction must lie in (0, 1], got {self.top_fraction}")
        if not 0.0 < self.min_cover <= 1.0:
            problems.append(f"min_cover must lie in (0, 1], got {self.min_cover}")
        for name in ("spray_side", "spray_maps", "max_clusters", "confirm_images"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.erase not in ERASE_MODES:
            problems.append(f"erase must be one of {', '.join(ERASE_MODES)}, got {self.erase!r}")
        if problems:
            raise ConfigError("bad audit settings: " + "; ".join(problems))
        self.patterns.check()
        return self


@dataclass
class ClassFinding:
    """Everything the audit found for one class (kept in memory for the report).

    Attributes:
        index: the class index.
        hotspots: the class's hotspots, most frequent first.
        hotspot_records: per hotspot, its numbers for ``audit.json`` (box widened for the
            tests, images affected, heat share, object overlap, kind).
        spray: SpRAy on the class's sampled maps.
        spray_sources: the image file of each sampled map (for the clusters' exemplars).
        confirmations: per hotspot, its counterfactual tests (None: not tested); filled in
            after the fold, by ``camlens.shortcuts.counterfactuals.confirm_findings``.
        patterns: the class's candidate moving patterns (``camlens.shortcuts.moving``).
        pattern_confirmations: per pattern, its counterfactual tests (None: not tested).
    """

    index: int
    hotspots: list[Hotspot] = field(default_factory=list)
    hotspot_records: list[dict[str, Any]] = field(default_factory=list)
    spray: SprayResult | None = None
    spray_sources: list[str] = field(default_factory=list)
    confirmations: list[Confirmation | None] = field(default_factory=list)
    patterns: list[Pattern] = field(default_factory=list)
    pattern_confirmations: list[Confirmation | None] = field(default_factory=list)


@dataclass
class AuditSummary:
    """What the fold of an audit's map pass found (in memory; the report draws from it).

    Attributes:
        labels: the model's class names.
        accumulator: the per-class statistics on the grid.
        findings: per audited class with enough images, its hotspots and clusters.
        reservoirs: the seeded SpRAy samples, ``(index, source, small map)`` per class (the
            counterfactual tests draw their images from them).
        correct: per class, images whose prediction is their (folder's) class.
        errors: ``{"input", "error"}`` of every image that could not be read, in input order.
        layer: the explained layer (the one given, when no image could be read).
        feature_size: ``(h, w)`` of the raw maps (how sharp the maps can be).
        has_annotations: whether annotations were given.
    """

    labels: list[str]
    accumulator: MapAccumulator
    findings: dict[int, ClassFinding]
    reservoirs: ClassReservoirs
    correct: dict[int, int]
    errors: list[dict[str, str]]
    layer: str | None
    feature_size: tuple[int, int]
    has_annotations: bool = False

    @property
    def n_images(self) -> int:
        """Images whose map entered the statistics."""
        return sum(stats.count for stats in self.accumulator.stats.values())


class AuditFold(Closing):
    """Fold an audit's map pass, in input order, into an :class:`AuditSummary`.

    Feed it the images in input order (:meth:`add` for a group of readable images,
    :meth:`add_error` for an unreadable one), then call :meth:`finish`. The result does not
    depend on how the images are grouped: sums are taken in float64.

    Parameters:
        settings: the audit's settings.
        labels: the model's class names.
        seed: seeds the SpRAy samples and clustering.
        annotations: boxes or masks (matched to images by their resolved path).
        audited: the classes to search (None: all).
        layer: the layer given by the user (kept when no image could be read).

    Example:
        >>> fold = AuditFold(AuditSettings(grid=4), ["a", "b"])
        >>> fold.add([0], ["x.png"], np.zeros((1, 4, 4), np.float32), [0], [0], [(8, 8)])
        >>> fold.finish().n_images
        1
    """

    def __init__(
        self,
        settings: AuditSettings,
        labels: Sequence[str],
        *,
        seed: int = 0,
        annotations: Iterable[Annotation] = (),
        audited: set[int] | frozenset[int] | None = None,
        layer: str | None = None,
    ) -> None:
        self.settings = settings
        self.labels = list(labels)
        self.seed = seed
        self.audited = audited
        self.by_image = {str(Path(a.image).resolve()): a for a in annotations}
        self.accumulator = MapAccumulator(
            grid=settings.grid, top_fraction=settings.top_fraction, image_side=THUMB_SIDE
        )
        self.reservoirs = ClassReservoirs(settings.spray_maps, seed)
        self.spool = TopCellSpool(settings.grid)
        self.patterns = (
            PatternCollector(settings.patterns, seed) if settings.patterns.mode != "off" else None
        )
        self.correct: dict[int, int] = {}
        self.errors: list[dict[str, str]] = []
        self.layer = layer
        self.feature_size = (settings.grid, settings.grid)

    def add_error(self, source: str, message: str | None) -> None:
        """An image that could not be read."""
        self.errors.append({"input": source, "error": message or ""})

    def add(
        self,
        indices: Sequence[int],
        sources: Sequence[str],
        maps: np.ndarray | torch.Tensor,
        classes: Sequence[int],
        predicted: Sequence[int],
        sizes: Sequence[Sequence[int]],
        thumbs: np.ndarray | torch.Tensor | None = None,
        *,
        layer: str | None = None,
        feature_size: Sequence[int] | None = None,
        regions: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """Fold a group of readable images (consecutive in input order).

        Parameters:
            indices, sources: position in the audit and file of each image.
            maps: (n, G, G) normalised maps of the audited classes on the grid.
            classes: audited class of each image; predicted: the model's top-1 class.
            sizes: ``(width, height)`` of each original image.
            thumbs: (n, 3, S, S) images in [0, 1] (for the mean images), or None.
            layer, feature_size: the explained layer and the ``(h, w)`` of its raw maps.
            regions: per image, its small hot regions ``(boxes, features)``: (R, 4+) boxes as
                fractions (further columns ignored) and (R, C) feature vectors (see
                ``camlens.shortcuts.moving``); None: no pattern search for these images.
        """
        if not len(indices):
            return
        maps = torch.as_tensor(np.asarray(maps, dtype=np.float32))
        classes_t = torch.as_tensor(np.asarray(classes, dtype=np.int64))
        images = None
        if thumbs is not None:
            images = torch.as_tensor(np.asarray(thumbs, dtype=np.float32))
        if layer:
            self.layer = layer
        if feature_size is not None:
            self.feature_size = (int(feature_size[0]), int(feature_size[1]))
        tops = self.accumulator.update(maps, classes_t, images)
        self.spool.append(tops, classes_t)
        side = self.settings.spray_side
        small = torch.nn.functional.adaptive_avg_pool2d(maps[:, None], side)[:, 0].numpy()
        for row, (index, source) in enumerate(zip(indices, sources, strict=True)):
            cls = int(classes[row])
            self.reservoirs.add(cls, (int(index), source, small[row].astype(np.float32)))
            self.correct[cls] = self.correct.get(cls, 0) + int(int(predicted[row]) == cls)
            annotation = self.by_image.get(str(Path(source).resolve())) if self.by_image else None
            obj = None
            if annotation is not None:
                size = annotation.size or tuple(sizes[row])
                obj = object_grid(annotation, self.labels[cls], size, self.settings.grid)
                if obj is not None:
                    self.accumulator.add_object(cls, int(index), source, maps[row].numpy(), obj)
            if regions is not None:
                self._add_regions(cls, int(index), source, regions[row], obj)

    def _add_regions(
        self,
        cls: int,
        index: int,
        source: str,
        regions: tuple[np.ndarray, np.ndarray],
        obj: np.ndarray | None,
    ) -> None:
        """Offer one image's hot regions to the pattern search (those touching the object
        dropped, see ``PatternSettings.max_on_object``; in mode ``"annotated"``, images
        without an object are left out)."""
        if self.patterns is None or (obj is None and self.settings.patterns.mode == "annotated"):
            return
        boxes, features = regions
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, np.asarray(boxes).shape[-1])[:, :4]
        on_object = None
        if obj is not None:
            limit = self.settings.patterns.max_on_object
            on_object = np.array([box_on_object(box, obj) > limit for box in boxes], dtype=bool)
        self.patterns.add(cls, index, source, boxes, features, on_object)

    def finish(self) -> AuditSummary:
        """Find every audited class's hotspots and clusters; the summary of the fold."""
        try:
            findings = find_classes(
                self.accumulator,
                self.spool,
                self.reservoirs,
                self.audited,
                self.settings,
                self.feature_size,
                self.seed,
                self.patterns,
            )
        finally:
            self.spool.close()
        return AuditSummary(
            labels=self.labels,
            accumulator=self.accumulator,
            findings=findings,
            reservoirs=self.reservoirs,
            correct=self.correct,
            errors=self.errors,
            layer=self.layer,
            feature_size=self.feature_size,
            has_annotations=bool(self.by_image),
        )

    def close(self) -> None:
        """Release the spool (``finish`` does it too)."""
        self.spool.close()


def object_grid(
    annotation: Annotation, label: str, size: Sequence[int], grid: int
) -> np.ndarray | None:
    """The object of class ``label`` (else all objects) on the grid, (G, G) bool.

    A cell counts as object when the object touches it (a mask resized with a box filter,
    > 0; a box with outward rounding), so "outside" means clearly outside.

    Example:
        >>> a = Annotation("x.png", boxes=[(0, 0, 50, 50)], labels=["cat"])
        >>> object_grid(a, "cat", (100, 100), 4).astype(int).tolist()[0]
        [1, 1, 0, 0]
    """
    width, height = size
    named = label if label in annotation.labels else None
    mask = annotation.mask_for(named) if annotation.has_masks else None
    if mask is not None:
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize((grid, grid), Image.BOX)
        return np.asarray(small) > 0
    boxes = annotation.boxes_for(named) if named is not None else annotation.boxes
    if not boxes:
        return None
    obj = np.zeros((grid, grid), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = int(np.floor(x0 / width * grid)), int(np.floor(y0 / height * grid))
        c1, r1 = int(np.ceil(x1 / width * grid)), int(np.ceil(y1 / height * grid))
        obj[max(r0, 0) : max(r1, r0 + 1), max(c0, 0) : max(c1, c0 + 1)] = True
    return obj


def box_on_object(box: Sequence[float], obj: np.ndarray) -> float:
    """Share of the grid cells of ``box`` (fractions, outward rounding) on the object mask.

    Example:
        >>> obj = np.zeros((4, 4), dtype=bool); obj[:, :2] = True
        >>> box_on_object((0.25, 0.0, 0.75, 0.25), obj)
        0.5
    """
    rows, cols = obj.shape
    c0, r0 = int(np.floor(box[0] * cols + 1e-9)), int(np.floor(box[1] * rows + 1e-9))
    c1, r1 = int(np.ceil(box[2] * cols - 1e-9)), int(np.ceil(box[3] * rows - 1e-9))
    cells = obj[max(r0, 0) : max(r1, r0 + 1), max(c0, 0) : max(c1, c0 + 1)]
    return float(cells.mean()) if cells.size else 0.0


def find_classes(
    accumulator: MapAccumulator,
    spool: TopCellSpool,
    reservoirs: ClassReservoirs,
    audited: set[int] | frozenset[int] | None,
    settings: AuditSettings,
    feature_size: tuple[int, int],
    seed: int,
    patterns: PatternCollector | None = None,
) -> dict[int, ClassFinding]:
    """Hotspots, SpRAy clusters and (with ``patterns``) candidate moving patterns of every
    audited class with enough images."""
    findings: dict[int, ClassFinding] = {}
    for cls in sorted(accumulator.stats):
        stats = accumulator.stats[cls]
        if (audited is not None and cls not in audited) or stats.count < settings.min_class_images:
            continue
        finding = ClassFinding(cls)
        finding.hotspots = find_hotspots(
            stats.frequency,
            accumulator.other_frequency(cls),
            cls=cls,
            min_frequency=settings.min_frequency,
            specificity=settings.specificity,
            max_area=settings.max_area,
        )
        sample = reservoirs.items(cls)
        finding.spray = spectral_relevance_analysis(
            np.stack([m for _, _, m in sample]),
            max_clusters=settings.max_clusters,
            seed=seed,
        )
        finding.spray_sources = [source for _, source, _ in sample]
        if patterns is not None:
            places = [
                widen_box(h.box, feature_size, settings.margin_cells) for h in finding.hotspots
            ]
            finding.patterns = [
                p for p in find_patterns(patterns, cls, seed=seed) if not _stays_in(p, places)
            ]
        finding.pattern_confirmations = [None] * len(finding.patterns)
        findings[cls] = finding
    questions = [(cls, h.region) for cls, f in findings.items() for h in f.hotspots]
    affected = iter(spool.count_covering(questions, settings.min_cover))
    for cls, finding in findings.items():
        stats = accumulator.stats[cls]
        for hotspot in finding.hotspots:
            n_affected = next(affected)
            record = {
                **hotspot.to_dict(),
                "core_box": [round(v, 4) for v in hotspot.box],
                "box": [
                    round(v, 4) for v in widen_box(hotspot.box, feature_size, settings.margin_cells)
                ],
                "images_affected": n_affected,
                "share_affected": round(n_affected / max(stats.count, 1), 4),
                "heat_share": round(heat_share(stats.mean_map, hotspot.region), 4),
                "object_overlap": (
                    round(float(stats.object_frequency[hotspot.region].mean()), 4)
                    if stats.n_objects
                    else None
                ),
            }
            is_object = (
                record["object_overlap"] is not None
                and record["object_overlap"] >= settings.object_overlap
            )
            record["kind"] = "object-position" if is_object else "fixed-region"
            finding.hotspot_records.append(record)
        finding.confirmations = [None] * len(finding.hotspots)
    return findings


def _stays_in(pattern: Pattern, places: Sequence[Sequence[float]]) -> bool:
    """Whether most of a pattern's locations lie in one of the class's hotspots (a fixed
    place, found and tested as such)."""
    if not places:
        return False
    inside = 0
    for x0, y0, x1, y1 in pattern.boxes:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        inside += any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in places)
    return inside >= len(pattern.boxes) / 2


def widen_box(
    box: Sequence[float], feature_size: tuple[int, int], cells: float
) -> tuple[float, float, float, float]:
    """Widen a box (fractions) by ``cells`` feature-map cells on every side, within the image.

    Example:
        >>> widen_box((0.25, 0.25, 0.5, 0.5), (8, 4), 1.0)
        (0.0, 0.125, 0.75, 0.625)
    """
    dy, dx = cells / feature_size[0], cells / feature_size[1]
    x0, y0, x1, y1 = box
    return (max(0.0, x0 - dx), max(0.0, y0 - dy), min(1.0, x1 + dx), min(1.0, y1 + dy))


# --- the result ------------------------------------------------------------------------------


def build_result(
    summary: AuditSummary,
    *,
    model: str,
    method: str,
    data: Any,
    labels_from: str,
    n_found: int,
    annotations: Any,
    settings: AuditSettings,
    seed: int,
) -> dict[str, Any]:
    """The content of ``audit.json`` (without ``seconds`` and the report's figure paths).

    Parameters:
        summary: the fold's summary, its hotspots' confirmations filled in.
        model: the model's name; method: the map method.
        data: the audited folder, as given; labels_from: ``"folders"`` or ``"predictions"``.
        n_found: images found before sampling.
        annotations: as given (a path is recorded as such, a list is not).
        settings, seed: the audit's settings and seed.
    """
    labels = summary.labels
    accumulator, findings = summary.accumulator, summary.findings
    classes: dict[str, dict[str, Any]] = {}
    flags: list[dict[str, Any]] = []
    for cls in sorted(accumulator.stats):
        stats = accumulator.stats[cls]
        entry: dict[str, Any] = {
            "index": cls,
            "n_images": stats.count,
            "n_heated": stats.heated,
            "max_frequency": round(float(stats.frequency.max()), 4),
            "audited": cls in findings,
        }
        if labels_from == "folders":
            entry["accuracy"] = round(summary.correct.get(cls, 0) / max(stats.count, 1), 4)
        if stats.n_objects:
            entry["annotations"] = {
                "n_images": stats.n_annotated,
                "mean_outside_share": round(stats.outside_sum / max(stats.n_annotated, 1), 4),
                "share_mostly_outside": round(stats.mostly_outside / max(stats.n_annotated, 1), 4),
                "worst": [
                    {"image": source, "outside_share": round(share, 4)}
                    for share, _, source in sorted(stats.worst, reverse=True)
                ],
            }
        finding = findings.get(cls)
        if finding is None:
            entry["note"] = (
                "not audited (not among the audited classes)"
                if stats.count >= settings.min_class_images
                else f"too few images to search ({stats.count} < {settings.min_class_images})"
            )
        else:
            entry["hotspots"] = []
            for record, confirmation in zip(
                finding.hotspot_records, finding.confirmations, strict=True
            ):
                hotspot = {**record}
                if confirmation is not None:
                    hotspot["tests"] = confirmation.to_dict()
                    hotspot["confirmed"] = confirmation.confirmed
                else:
                    hotspot["confirmed"] = False
                entry["hotspots"].append(hotspot)
                flags.append(_flag(labels[cls], stats.count, record, confirmation))
            entry["clusters"] = _clusters(finding)
            entry["patterns"] = []
            for k, (pattern, confirmation) in enumerate(
                zip(finding.patterns, finding.pattern_confirmations, strict=True)
            ):
                flag = _pattern_flag(labels[cls], stats.count, pattern, confirmation)
                flag["exemplar"] = exemplar_path(labels[cls], k)
                entry["patterns"].append(
                    {
                        **{k: flag[k] for k in _PATTERN_KEYS},
                        **({"tests": confirmation.to_dict()} if confirmation else {}),
                    }
                )
                flags.append(flag)
        classes[labels[cls]] = entry
    flags.sort(key=lambda f: (not f["confirmed"], -f["severity"], -f["images_affected"]))
    return {
        "version": 1,
        "model": model,
        "method": method,
        "layer": summary.layer,
        "data": str(data),
        "labels_from": labels_from,
        "annotations": str(annotations) if isinstance(annotations, (str, os.PathLike)) else None,
        "n_images": summary.n_images,
        "n_found": n_found,
        "n_failed": len(summary.errors),
        "n_annotated": sum(s.n_objects for s in accumulator.stats.values()),
        "seed": seed,
        "settings": asdict(settings),
        "summary": summary_sentences(flags, has_annotations=summary.has_annotations),
        "flags": flags,
        "classes": classes,
        "errors": summary.errors[:100],
    }


def _flag(
    label: str, n_images: int, record: dict[str, Any], confirmation: Confirmation | None
) -> dict[str, Any]:
    """One row of ``flags``: a hotspot with its test numbers and verdict."""
    flag = {
        "class": label,
        "kind": record["kind"],
        "box": record["box"],
        "images_affected": record["images_affected"],
        "n_images": n_images,
        "heat_share": record["heat_share"],
        "frequency": record["frequency"],
        "object_overlap": record["object_overlap"],
        "flip_rate": None,
        "baseline_flip_rate": None,
        "confidence_drop": None,
        "baseline_confidence_drop": None,
        "p_paste": None,
        "p_erase": None,
        "confirmed": False,
        "severity": 0.0,
    }
    if confirmation is not None:
        paste, erase = confirmation.paste, confirmation.erase
        flag.update(
            flip_rate=round(paste.flip_rate, 4),
            baseline_flip_rate=round(paste.baseline_flip_rate, 4),
            confidence_drop=round(erase.confidence_drop, 4),
            baseline_confidence_drop=round(erase.baseline_drop, 4),
            p_paste=float(f"{paste.p_value:.3g}"),
            p_erase=float(f"{erase.p_value:.3g}"),
            n_paste=paste.n,
            n_erase=erase.n,
            confirmed=confirmation.confirmed,
            severity=round(
                max(
                    paste.flip_rate - paste.baseline_flip_rate,
                    erase.confidence_drop - erase.baseline_drop,
                    0.0,
                ),
                4,
            ),
        )
    return flag


_PATTERN_KEYS = (
    "box",
    "exemplar",
    "images_affected",
    "n_sampled",
    "frequency",
    "other_share",
    "spread",
    "exemplar_image",
    "locations",
    "confirmed",
)


def _pattern_flag(
    label: str, n_images: int, pattern: Pattern, confirmation: Confirmation | None
) -> dict[str, Any]:
    """One row of ``flags`` for a moving pattern: where it was found (``locations``: image
    and box as fractions, one per sampled image where it was found), the exemplar's box and
    image, and the test numbers. ``exemplar`` is the path of its picture in the output
    folder (``exemplar_path``; the report writes it)."""
    record = {
        "kind": "moving-pattern",
        "box": [round(v, 4) for v in pattern.boxes[pattern.exemplar]],
        "images_affected": len(pattern.sources),
        "heat_share": None,
        "frequency": round(pattern.share, 4),
        "object_overlap": None,
    }
    flag = _flag(label, n_images, record, confirmation)
    flag.update(
        n_sampled=pattern.n_sampled,
        other_share=round(pattern.other_share, 4),
        spread=round(pattern.spread, 4),
        exemplar=None,
        exemplar_image=pattern.sources[pattern.exemplar],
        locations=pattern.locations(),
    )
    return flag


def exemplar_path(label: str, k: int) -> str:
    """Where the report writes the exemplar of class ``label``'s ``k``-th moving pattern,
    relative to the output folder.

    Example:
        >>> exemplar_path("square", 0)
        'figures/patterns/square_0_exemplar.png'
    """
    return f"figures/patterns/{safe_name(label, fallback='class')}_{k}_exemplar.png"


def _clusters(finding: ClassFinding) -> dict[str, Any]:
    spray = finding.spray
    if spray is None:
        return {}
    return {
        **spray.to_dict(),
        "clusters": [
            {
                "size": cluster.size,
                "fraction": round(cluster.size / max(spray.n_maps, 1), 4),
                "focus": [round(v, 4) for v in cluster.focus] if cluster.focus else None,
                "exemplars": [finding.spray_sources[i] for i in cluster.exemplars],
            }
            for cluster in spray.clusters
        ],
    }


def describe_place(box: Sequence[float]) -> str:
    """Plain words for where a box (fractions of the image) lies.

    Example:
        >>> describe_place((0.0, 0.0, 0.2, 0.2)), describe_place((0.0, 0.9, 1.0, 1.0))
        ('in the upper left corner', 'along the bottom edge')
    """
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    if x1 - x0 >= 0.6 and vertical != "middle":
        return f"along the {vertical} edge"
    if y1 - y0 >= 0.6 and horizontal != "centre":
        return f"along the {horizontal} edge"
    if vertical == "middle" and horizontal == "centre":
        return "in the centre"
    if vertical == "middle":
        return f"on the {horizontal} side"
    if horizontal == "centre":
        return f"at the {vertical} centre"
    corner = min(x0, 1 - x1) < 0.1 and min(y0, 1 - y1) < 0.1
    upper_lower = "upper" if vertical == "top" else "lower"
    return f"in the {upper_lower} {horizontal}{' corner' if corner else ''}"


def summary_sentences(flags: Sequence[dict[str, Any]], *, has_annotations: bool) -> list[str]:
    """The plain-language summary at the top of the report (one sentence per finding)."""
    confirmed = [f for f in flags if f["confirmed"]]
    lines = []
    for flag in confirmed:
        label, place = flag["class"], describe_place(flag["box"])
        what = (
            "a small pattern that moves (found at varying places on "
            f"{percent(flag['frequency'])} of its sampled images; exemplar in "
            f"{Path(flag['exemplar_image']).name}, {place})"
            if flag.get("kind") == "moving-pattern"
            else None
        )
        what = what or (
            f"a region {place} of the image that is not the object"
            if has_annotations and flag["object_overlap"] is not None
            else f"a fixed region {place} of the image (the same place on "
            f"{percent(flag['images_affected'] / max(flag['n_images'], 1))} of its images, "
            "while objects move)"
        )
        evidence = []
        if flag["flip_rate"] is not None:
            evidence.append(
                f"pasting it onto other images makes the model say {label} in "
                f"{percent(flag['flip_rate'])} of cases (a random region of the same size: "
                f"{percent(flag['baseline_flip_rate'])})"
            )
        if flag["confidence_drop"] is not None:
            evidence.append(
                f"erasing it lowers the model's confidence in {label} by "
                f"{two_decimals(flag['confidence_drop'])} on average (a random region: "
                f"{two_decimals(flag['baseline_confidence_drop'])})"
            )
        lines.append(f"Class {label} depends on {what}: {'; '.join(evidence)}.")
    unconfirmed = [f for f in flags if not f["confirmed"]]
    moving = sum(f.get("kind") == "moving-pattern" for f in unconfirmed)
    if not confirmed:
        candidates = []
        if len(unconfirmed) > moving:
            candidates.append(
                f"{len(unconfirmed) - moving} candidate region(s) were hot on many images at "
                "the same place"
            )
        if moving:
            candidates.append(
                f"{moving} candidate pattern(s) were hot on many images at varying places"
            )
        lines.append(
            "No confirmed shortcut: "
            + (
                f"{' and '.join(candidates)}, but changing them did not change the predictions "
                "clearly more than changing random regions."
                if unconfirmed
                else "for every class the model looks at different places on different "
                "images, as it should when the objects move."
            )
        )
    elif unconfirmed:
        lines.append(f"{len(unconfirmed)} further candidate region(s) were not confirmed.")
    return lines
