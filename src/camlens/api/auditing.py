"""``camlens.audit``: find, group, confirm and report the shortcuts a model uses on a data set.

1. **Map pass** (``camlens.tasks.audit``, through ``camlens.pipeline.run``): every image's map
   on a fixed grid, batch by batch, locally or on Ray actors, stored in the output folder
   (``maps.jsonl`` and ``maps/``), so that a killed audit resumes after its last complete
   batch; the fold turns the records into per-class statistics, hotspots and SpRAy clusters.
2. **Confirm** (``camlens.shortcuts.counterfactuals``): paste and erase each hotspot, against
   random regions of the same size (runs the model, on this process).
3. **Report**: ``audit.json`` and ``report.html`` (``camlens.report.audit``), drawn from the
   result, the fold's summary and the stored maps; the model is not run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from camlens.api.explaining import job_folder, job_model
from camlens.errors import ConfigError
from camlens.io.annotations import Annotation, load_annotations
from camlens.methods import check_method, make_method
from camlens.models import Classifier
from camlens.pipeline import OutputFolder, RunOptions, run
from camlens.report.audit import write_audit_report
from camlens.shortcuts.core import AuditSettings, build_result
from camlens.shortcuts.counterfactuals import confirm_findings
from camlens.shortcuts.data import resolve_audit_classes, resolve_audit_items
from camlens.tasks.audit import AuditTask
from camlens.writers import write_json

__all__ = ["AUDIT_FILE", "REPORT_FILE", "audit"]

AUDIT_FILE = "audit.json"
REPORT_FILE = "report.html"


def audit(
    model: Classifier | nn.Module | str | os.PathLike | Callable[[], Classifier],
    data: str | os.PathLike,
    out_dir: str | os.PathLike | OutputFolder | None = None,
    *,
    method: str = "cam",
    layer: str | None = None,
    method_options: dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    annotations: str | os.PathLike | Sequence[Annotation] | None = None,
    labels_from: str = "auto",
    max_images: int | None = None,
    seed: int = 0,
    settings: AuditSettings | None = None,
    report: bool = True,
    options: RunOptions | None = None,
) -> dict[str, Any]:
    """Audit ``model`` on the images of ``data`` for shortcuts; write ``audit.json`` and
    ``report.html`` into ``out_dir`` (what ``camlens audit`` does).

    Parameters:
        model: a ``Classifier``, a ``load_model`` spec (e.g. a ``camlens train`` folder), an
            ``nn.Module``, or a function that loads it (called once the folder is checked).
        data: an ImageFolder (true classes from the folders) or a folder of images (classes
            from the model's predictions); see ``camlens.shortcuts.data``.
        out_dir: output folder (created), or an ``OutputFolder``; None writes nothing and only
            returns the result. Besides ``audit.json``, ``report.html`` and ``figures/`` it
            holds the stored map pass (``maps.jsonl``, ``maps/``) and the run's settings
            (``.camlens/run.json``). A non-empty folder is refused unless ``options.resume``
            (continue an interrupted audit with the same settings) or ``options.overwrite``
            (remove what camlens wrote there before; nothing else).
        method: map method (``"cam"`` is exact on GAP + linear heads).
        layer: feature layer (default: found automatically).
        method_options: keyword arguments of the method's class (``{"max_channels": 64}``).
        classes: audit only these classes (names); the others still serve as recipients.
        annotations: boxes or masks (a file or folder for ``load_annotations``, or a list of
            ``Annotation``): adds the share of each map outside the object.
        labels_from: ``"auto"``, ``"folders"`` or ``"predictions"``.
        max_images: audit a seeded random sample of at most this many images.
        seed: seeds every sample and test; the same seed gives the same audit.
        settings: detection and decision parameters (``AuditSettings``).
        report: also write ``report.html`` and its figures (with ``out_dir``).
        options: batch size, device, engine (``"local"`` or ``"ray"``), resume/overwrite,
            progress (``RunOptions``). The result depends on neither the batch size nor the
            engine, nor on whether the audit was resumed.

    Returns:
        The content of ``audit.json``: ``{"classes": {label: {...}}, "flags": [...],
        "summary": [...], "n_images", "n_failed", "errors", ...}``; every flag has ``class``,
        ``kind``, ``box`` (x0, y0, x1, y1 as fractions of the image), ``images_affected``,
        ``heat_share``, ``flip_rate``, ``baseline_flip_rate``, ``confidence_drop``,
        ``confirmed``. A pattern that moves (``kind: "moving-pattern"``; searched on annotated
        images, see ``camlens.shortcuts.PatternSettings``) also has ``locations`` (image as
        given and box as fractions, per sampled image where it was found), ``exemplar_image``
        and ``exemplar`` (its picture in ``out_dir``, written with the report).

    Raises:
        ConfigError: bad parameters, a data folder without images, class folders that are
            not classes of the model, an output folder the rules refuse, or a resume with
            other settings than the interrupted run's (checked before anything is written).

    Example:
        >>> import camlens, os
        >>> result = camlens.audit("runs/shapes", "shapes/images", "audit_out",
        ...                        options=camlens.RunOptions(progress=False))
        >>> result["n_images"], result["labels_from"], sorted(result["classes"])
        (60, 'folders', ['circle', 'square', 'triangle'])
        >>> [(f["class"], f["box"], f["confirmed"]) for f in result["flags"]][0]
        ('square', [0.0, 0.4375, 0.4062, 1.0], False)
        >>> print(result["summary"][0])  # runs/shapes trained 2 epochs: the tag is not learnt yet
        No confirmed shortcut: 2 candidate region(s) were hot on many images at the same place, ...
        >>> sorted(os.listdir("audit_out"))
        ['.camlens', 'audit.json', 'figures', 'maps', 'maps.jsonl', 'report.html']
    """
    started = time.perf_counter()
    options = options or RunOptions()
    settings = (settings or AuditSettings()).check()
    if out_dir is None and (options.resume or options.overwrite):
        raise ConfigError(
            f"{options.spell('resume')} and {options.spell('overwrite')} apply to an output "
            f"folder; give {options.spell('out_dir', '')}"
        )
    folder = job_folder(out_dir, options) if out_dir is not None else None
    method = check_method(method, method_options).name
    classifier = job_model(model, options.device)
    labels = list(classifier.labels)
    items = resolve_audit_items(
        data, labels, labels_from=labels_from, max_images=max_images, seed=seed,
        spell=options.spell,
    )  # fmt: skip
    audited = resolve_audit_classes(classes, labels, options.spell)
    annotation_list = _annotations(annotations)
    make_method(classifier, method, layer, **(method_options or {}))  # bad layer, options
    task = AuditTask(
        classifier,
        method,
        layer,
        dict(method_options or {}),
        settings,
        seed,
        tuple(labels),
        tuple(annotation_list),
        None if audited is None else frozenset(audited),
        {
            "data": str(Path(data).resolve()),
            "labels_from": items.labels_from,
            "max_images": max_images,
            "classes": None if audited is None else [labels[i] for i in sorted(audited)],
            "annotations": _describe_annotations(annotations, annotation_list),
        },
        max_pixels=options.max_pixels,
    )
    inputs = [
        (str(path), None if items.classes is None else items.classes[i])
        for i, path in enumerate(items.paths)
    ]
    if folder is None:
        # No output folder: the map pass is kept in a temporary one, so that memory does not
        # grow with the number of images and the records are folded as they are stored.
        with tempfile.TemporaryDirectory(prefix="camlens-audit-") as scratch:
            scratch_folder = OutputFolder(scratch, spell=options.spell)
            summary = run(task, inputs, scratch, options, folder=scratch_folder).summary
    else:
        outputs = [AUDIT_FILE, *([REPORT_FILE] if report else [])]
        _claim(folder, options, outputs)
        summary = run(task, inputs, folder.root, options, folder=folder).summary
    confirm_findings(classifier, summary, settings, batch_size=options.batch_size, seed=seed)
    result = build_result(
        summary,
        model=classifier.name,
        method=method,
        data=data,
        labels_from=items.labels_from,
        n_found=items.n_found,
        annotations=annotations,
        settings=settings,
        seed=seed,
    )
    result["seconds"] = round(time.perf_counter() - started, 2)
    if folder is not None:
        if report:
            records = folder.log(AuditTask.records_file, AuditTask.parts_dir).records()
            write_audit_report(folder, result, summary, records)
        write_json(folder.path(AUDIT_FILE), result)
        folder.close()
    return result


def _claim(folder: OutputFolder, options: RunOptions, names: Sequence[str]) -> None:
    """Prepare the folder and record the files the audit writes at its end, so that a fresh
    run refuses a file camlens did not write (``OutputFolder.path``) before the map pass,
    not after it; a refused fresh run leaves nothing behind."""
    folder.prepare(resume=options.resume, overwrite=options.overwrite)
    if not folder.fresh:
        return
    try:
        for name in names:
            folder.path(name)
    except ConfigError:
        folder.discard()
        raise


def _annotations(annotations: Any) -> list[Annotation]:
    if annotations is None:
        return []
    if isinstance(annotations, (str, os.PathLike)):
        return load_annotations(annotations)
    return list(annotations)


def _describe_annotations(annotations: Any, annotation_list: list[Annotation]) -> str | None:
    """The annotations as the run's settings record them: the file, or a digest of a list."""
    if annotations is None:
        return None
    if isinstance(annotations, (str, os.PathLike)):
        return str(Path(annotations).resolve())
    content = [[str(a.image), [list(b) for b in a.boxes], a.labels] for a in annotation_list]
    return "sha256:" + hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()
