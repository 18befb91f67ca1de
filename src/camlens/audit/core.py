"""``run_audit``: find, group, confirm and report the shortcuts a model uses on a data set.

1. **Find** (``camlens.audit.find``): stream every image's map (batched) into per-class mean
   maps and top-pixel frequency maps on a fixed grid; detect hotspots, the compact regions
   that are hot on many images of one class at the same place; with annotations, measure the
   share of each map outside the object.
2. **Group** (``camlens.audit.spray``): Spectral Relevance Analysis on a bounded sample of
   each class's maps.
3. **Confirm** (``camlens.audit.confirm``): paste and erase each hotspot, against random
   regions of the same size.
4. **Report**: ``audit.json`` (classes and flags, the flags sorted by severity) and
   ``report.html`` (``camlens.report.audit``).

With an output folder, the map pass (step 1's expensive part) is stored batch by batch in
``OUT/maps/`` and the run's settings in ``OUT/audit_run.json`` (``camlens.audit.checkpoint``):
a killed audit continues with ``resume=True``, computing only the batches not yet stored, and
ends with the result of an uninterrupted run. The rest (folding the stored maps, steps 2, 3
and 4) is fast and is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from camlens.audit.checkpoint import (
    PARTS_DIR,
    RUN_FILE,
    MapParts,
    checkpointed_batches,
    run_settings,
)
from camlens.audit.confirm import Confirmation, ConfirmRule, confirm_hotspot, predict_probs
from camlens.audit.data import AuditItems, resolve_audit_classes, resolve_audit_items
from camlens.audit.find import Hotspot, MapAccumulator, TopCellSpool, find_hotspots, heat_share
from camlens.audit.maps import AuditItem, MapBatch, MapComputer, local_map_batches
from camlens.audit.spray import ClassReservoirs, SprayResult, spectral_relevance_analysis
from camlens.data.imagefolder import load_images
from camlens.errors import ConfigError
from camlens.formatting import percent, two_decimals
from camlens.io.annotations import Annotation, load_annotations
from camlens.models import Classifier, load_model
from camlens.runner import prepare_output, record_run_settings
from camlens.writers import write_json

__all__ = ["ENGINES", "AuditArtifacts", "AuditSettings", "describe_place", "run_audit"]

ENGINES = ("local", "ray")
AUDIT_FILE = "audit.json"
#: Everything ``camlens audit`` writes into its output folder (what ``overwrite`` removes).
OUTPUT_ENTRIES = (AUDIT_FILE, "report.html", "figures", PARTS_DIR, RUN_FILE)


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
        rule: when a hotspot is confirmed (see ``camlens.audit.confirm``).
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


@dataclass
class ClassFinding:
    """Everything the audit found for one class (kept in memory for the report)."""

    index: int
    hotspots: list[Hotspot] = field(default_factory=list)
    hotspot_records: list[dict[str, Any]] = field(default_factory=list)
    spray: SprayResult | None = None
    spray_sources: list[str] = field(default_factory=list)
    confirmations: list[Confirmation | None] = field(default_factory=list)


@dataclass
class AuditArtifacts:
    """In-memory results the report draws from (``audit.json`` holds the numbers)."""

    classifier: Classifier
    method: str
    layer: str | None
    accumulator: MapAccumulator
    findings: dict[int, ClassFinding]


def run_audit(
    model: Classifier | str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    method: str = "cam",
    layer: str | None = None,
    classes: Sequence[str] | None = None,
    annotations: str | os.PathLike | Sequence[Annotation] | None = None,
    labels_from: str = "auto",
    max_images: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
    engine: str = "local",
    seed: int = 0,
    settings: AuditSettings | None = None,
    progress: bool = False,
    report: bool = True,
    ray_address: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Audit ``model`` on the images of ``data`` for shortcuts; write ``audit.json`` and
    ``report.html`` into ``out_dir``.

    Parameters:
        model: a ``Classifier`` or a ``load_model`` spec (e.g. a ``camlens train`` folder).
        data: an ImageFolder (true classes from the folders) or a folder of images (classes
            from the model's predictions); see ``camlens.audit.data``.
        out_dir: output folder (created); None writes nothing and only returns the result.
            Besides ``audit.json``, ``report.html`` and ``figures/`` it holds the stored map
            pass (``maps/``) and the run's settings (``audit_run.json``). A non-empty folder
            is refused unless ``resume`` or ``overwrite``.
        method: map method (``"cam"`` is exact on GAP + linear heads).
        layer: feature layer (default: found automatically).
        classes: audit only these classes (names); the others still serve as recipients.
        annotations: boxes or masks (a file or folder for ``load_annotations``, or a list of
            ``Annotation``): adds the share of each map outside the object.
        labels_from: ``"auto"``, ``"folders"`` or ``"predictions"``.
        max_images: audit a seeded random sample of at most this many images.
        batch_size: images per forward pass.
        device: torch device for a model given by spec.
        engine: ``"local"`` or ``"ray"`` (maps computed by Ray actors).
        seed: seeds every sample and test; the same seed gives the same audit.
        settings: detection and decision parameters (``AuditSettings``).
        progress: progress bar on stderr.
        report: also write ``report.html`` and its figures.
        ray_address, workers: configure the Ray engine (see ``camlens.ray_engine``).
        resume: continue an interrupted audit in ``out_dir`` (same settings): stored map
            batches are read back, only the missing ones are computed; the result equals an
            uninterrupted run's.
        overwrite: remove camlens' previous audit outputs from ``out_dir`` (never other files).

    Returns:
        The content of ``audit.json``: ``{"classes": {label: {...}}, "flags": [...],
        "summary": [...], ...}``; every flag has ``class``, ``kind``, ``box`` (x0, y0, x1, y1
        as fractions of the image), ``images_affected``, ``heat_share``, ``flip_rate``,
        ``baseline_flip_rate``, ``confidence_drop``, ``confirmed``.

    Raises:
        ConfigError: bad parameters, a data folder without images, class folders that are
            not classes of the model, a non-empty ``out_dir`` without ``resume`` or
            ``overwrite``, both, or a resume with other settings than the interrupted run's.

    Example:
        >>> result = run_audit("runs/shapes", "shapes/images", "audit_out")  # tag top right
        >>> [(f["class"], f["box"], f["flip_rate"], f["confirmed"]) for f in result["flags"]]
        [('square', [0.625, 0.0312, 1.0, 0.5312], 0.9091, True)]
    """
    settings = settings or AuditSettings()
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if out_dir is None and (resume or overwrite):
        raise ConfigError("resume and overwrite apply to an output folder; give out_dir")
    started = time.perf_counter()
    classifier = model if isinstance(model, Classifier) else load_model(model, device=device)
    labels = list(classifier.labels)
    items = resolve_audit_items(
        data, labels, labels_from=labels_from, max_images=max_images, seed=seed
    )
    audited = resolve_audit_classes(classes, labels)
    annotation_list = _annotations(annotations)
    parts = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        prepare_output(
            out_dir, resume=resume, overwrite=overwrite, entries=OUTPUT_ENTRIES, results=None
        )
        recorded = run_settings(
            classifier, items.paths, items.classes, method=method, layer=layer,
            data=str(Path(data).resolve()), labels_from=items.labels_from, max_images=max_images,
            seed=seed, classes=None if audited is None else [labels[i] for i in sorted(audited)],
            annotations=_describe_annotations(annotations, annotation_list),
            batch_size=batch_size, **asdict(settings),
        )  # fmt: skip
        record_run_settings(
            out_dir, RUN_FILE, recorded, resume=resume, has_results=any(out_dir.iterdir())
        )
        parts = MapParts(out_dir / PARTS_DIR)
    by_image = {str(Path(a.image).resolve()): a for a in annotation_list}
    accumulator = MapAccumulator(grid=settings.grid, top_fraction=settings.top_fraction)
    reservoirs = ClassReservoirs(settings.spray_maps, seed)
    errors: list[dict[str, str]] = []
    correct: dict[int, int] = {}
    layer_used = layer
    feature_size = (settings.grid, settings.grid)
    with TopCellSpool(settings.grid) as spool:
        work = [
            (i, str(path), items.classes[i] if items.classes is not None else None)
            for i, path in enumerate(items.paths)
        ]
        bar = tqdm(total=len(work), unit="img", file=sys.stderr, disable=not progress)

        def compute(todo: list[AuditItem]) -> Iterator[MapBatch]:
            return _map_batches(
                classifier, method, layer, settings, todo, batch_size, engine, ray_address, workers
            )

        with bar:
            for batch in checkpointed_batches(work, batch_size, parts, compute):
                errors.extend({"input": s, "error": m} for _, s, m in batch.errors)
                if len(batch.indices):
                    layer_used = batch.layer or layer_used
                    feature_size = batch.feature_size
                    tops = accumulator.update(batch.maps, batch.classes, batch.thumbs)
                    spool.append(tops, batch.classes)
                    _collect(
                        batch, reservoirs, correct, settings, items, accumulator, by_image, labels
                    )
                bar.update(len(batch.indices) + len(batch.errors))
        findings = _find(accumulator, spool, reservoirs, audited, settings, feature_size, seed)
    _confirm(classifier, findings, reservoirs, settings, batch_size, seed)
    result = _result(
        classifier, items, data, method, layer_used, accumulator, findings, correct, errors,
        settings, annotations, by_image, seed,
    )  # fmt: skip
    result["seconds"] = round(time.perf_counter() - started, 2)
    if out_dir is not None:
        if report:
            from camlens.report.audit import write_audit_report

            artifacts = AuditArtifacts(classifier, method, layer_used, accumulator, findings)
            write_audit_report(out_dir, result, artifacts)
        write_json(out_dir / AUDIT_FILE, result)
    return result


def _annotations(annotations: Any) -> list[Annotation]:
    if annotations is None:
        return []
    if isinstance(annotations, (str, os.PathLike)):
        return load_annotations(annotations)
    return list(annotations)


def _describe_annotations(annotations: Any, annotation_list: list[Annotation]) -> str | None:
    """The annotations as ``audit_run.json`` records them: the file, or a digest of a list."""
    if annotations is None:
        return None
    if isinstance(annotations, (str, os.PathLike)):
        return str(Path(annotations).resolve())
    content = [[str(a.image), [list(b) for b in a.boxes], a.labels] for a in annotation_list]
    return "sha256:" + hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()


def _map_batches(
    classifier: Classifier,
    method: str,
    layer: str | None,
    settings: AuditSettings,
    work: list[AuditItem],
    batch_size: int,
    engine: str,
    ray_address: str | None,
    workers: int | None,
) -> Iterator[MapBatch]:
    if engine == "ray":
        from camlens.audit.ray_maps import ray_map_batches

        return ray_map_batches(
            classifier, method, layer, settings.grid, work, batch_size,
            address=ray_address, workers=workers,
        )  # fmt: skip
    computer = MapComputer(classifier, method, layer, grid=settings.grid)
    return local_map_batches(computer, work, batch_size)


def _collect(
    batch: MapBatch,
    reservoirs: ClassReservoirs,
    correct: dict[int, int],
    settings: AuditSettings,
    items: AuditItems,
    accumulator: MapAccumulator,
    by_image: dict[str, Annotation],
    labels: list[str],
) -> None:
    """Per-image bookkeeping of a batch: SpRAy sample, accuracy, annotation shares."""
    side = settings.spray_side
    small = torch.nn.functional.adaptive_avg_pool2d(batch.maps[:, None], side)[:, 0].numpy()
    for row, (index, source) in enumerate(zip(batch.indices, batch.sources, strict=True)):
        cls = int(batch.classes[row])
        reservoirs.add(cls, (index, source, small[row].astype(np.float32)))
        correct[cls] = correct.get(cls, 0) + int(int(batch.predicted[row]) == cls)
        annotation = by_image.get(str(Path(source).resolve())) if by_image else None
        if annotation is not None:
            size = annotation.size or batch.sizes[row]
            obj = object_grid(annotation, labels[cls], size, settings.grid)
            if obj is not None:
                accumulator.add_object(cls, index, source, batch.maps[row].numpy(), obj)


def object_grid(
    annotation: Annotation, label: str, size: tuple[int, int], grid: int
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


def _find(
    accumulator: MapAccumulator,
    spool: TopCellSpool,
    reservoirs: ClassReservoirs,
    audited: set[int] | None,
    settings: AuditSettings,
    feature_size: tuple[int, int],
    seed: int,
) -> dict[int, ClassFinding]:
    """Hotspots and SpRAy clusters of every audited class with enough images."""
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
    return findings


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


def _confirm(
    classifier: Classifier,
    findings: dict[int, ClassFinding],
    reservoirs: ClassReservoirs,
    settings: AuditSettings,
    batch_size: int,
    seed: int,
) -> None:
    """Run the counterfactual tests on every fixed-region hotspot."""
    tested = [
        (cls, i)
        for cls, finding in findings.items()
        for i, record in enumerate(finding.hotspot_records)
        if record["kind"] == "fixed-region"
    ]
    cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    for finding in findings.values():
        finding.confirmations = [None] * len(finding.hotspots)
    for number, (cls, i) in enumerate(tested):
        donors, donor_probs = _class_images(
            classifier, reservoirs, {cls}, settings, seed, batch_size, cache
        )
        others = set(reservoirs.by_key) - {cls}
        recipients, recipient_probs = _class_images(
            classifier, reservoirs, others, settings, seed, batch_size, cache
        )
        findings[cls].confirmations[i] = confirm_hotspot(
            classifier,
            cls,
            tuple(findings[cls].hotspot_records[i]["box"]),
            donors,
            recipients,
            rule=settings.rule,
            n_tests=2 * len(tested),
            seed=seed + 7919 * (number + 1),
            erase=settings.erase,
            batch_size=batch_size,
            donor_probs=donor_probs,
            recipient_probs=recipient_probs,
        )


def _class_images(
    classifier: Classifier,
    reservoirs: ClassReservoirs,
    classes: set[int],
    settings: AuditSettings,
    seed: int,
    batch_size: int,
    cache: dict[Any, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``confirm_images`` images of ``classes`` (uint8, input size; a seeded sample of
    the reservoirs) and the model's probabilities for them."""
    key = tuple(sorted(classes))
    if key not in cache:
        sources = [s for cls in key for _, s, _ in reservoirs.items(cls)]
        rng = np.random.default_rng([seed, len(key), *key[:4]])
        if len(sources) > settings.confirm_images:
            chosen = rng.choice(len(sources), settings.confirm_images, replace=False)
            sources = [sources[i] for i in sorted(chosen)]
        loaded = load_images([Path(s) for s in sources], [0] * len(sources), classifier.input_size)
        cache[key] = (loaded.images, predict_probs(classifier, loaded.images, batch_size))
    return cache[key]


def _result(
    classifier: Classifier,
    items: AuditItems,
    data: Any,
    method: str,
    layer: str | None,
    accumulator: MapAccumulator,
    findings: dict[int, ClassFinding],
    correct: dict[int, int],
    errors: list[dict[str, str]],
    settings: AuditSettings,
    annotations: Any,
    by_image: dict[str, Annotation],
    seed: int,
) -> dict[str, Any]:
    labels = list(classifier.labels)
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
        if items.labels_from == "folders":
            entry["accuracy"] = round(correct.get(cls, 0) / max(stats.count, 1), 4)
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
                "not audited (not among --classes)"
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
        classes[labels[cls]] = entry
    flags.sort(key=lambda f: (not f["confirmed"], -f["severity"], -f["images_affected"]))
    return {
        "version": 1,
        "model": classifier.name,
        "method": method,
        "layer": layer,
        "data": str(data),
        "labels_from": items.labels_from,
        "annotations": str(annotations) if isinstance(annotations, (str, os.PathLike)) else None,
        "n_images": sum(s.count for s in accumulator.stats.values()),
        "n_found": items.n_found,
        "n_failed": len(errors),
        "n_annotated": sum(s.n_objects for s in accumulator.stats.values()),
        "seed": seed,
        "settings": asdict(settings),
        "summary": summary_sentences(flags, has_annotations=bool(by_image)),
        "flags": flags,
        "classes": classes,
        "errors": errors[:100],
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
    if not confirmed:
        lines.append(
            "No confirmed shortcut: "
            + (
                f"{len(unconfirmed)} candidate region(s) were hot on many images at the same "
                "place, but changing them did not change the predictions clearly more than "
                "changing random regions."
                if unconfirmed
                else "for every class the model looks at different places on different "
                "images, as it should when the objects move."
            )
        )
    elif unconfirmed:
        lines.append(f"{len(unconfirmed)} further candidate region(s) were not confirmed.")
    return lines
