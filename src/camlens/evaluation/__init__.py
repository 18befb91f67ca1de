"""``camlens.evaluate``: how good are a model's heat maps on an annotated data set?

For every annotated image and every method, camlens computes the maps of the model's top-1
class and of every annotated class in one call of the method, then:

* **localisation**, on the annotated classes' maps at the original image size (boxes are in
  original pixels): MaxBoxAcc, MaxBoxAccV2, GT-known localisation at Zhou's threshold,
  pointing game, energy-based pointing game, and PxAP / peak pixel IoU when masks are given;
  top-1 localisation on the top-1 class's map;
* **faithfulness**, on the top-1 class's map at the model's input size (the decision the
  model made): deletion and insertion AUC, Average Drop, Increase in Confidence, Average Gain
  and, on request, ROAD;
* **sanity**, on request: Adebayo's cascading randomisation on the first few images.

An image with several annotated classes contributes one *instance* per class to the
class-wise metrics; top-1 localisation and the faithfulness metrics count each image once.
An annotation without a class (``None``: mask folders without class subfolders) is evaluated
on the model's top-1 class, which then counts as right for top-1 localisation.

How it runs: the images go through the model in batches, and each image becomes one small
JSON *record*, what the summary needs of it and never a map::

    {"index": 3, "image": "a.png", "status": "ok", "error": null,
     "methods": {"cam": {"predicted": 0, "predicted_label": "red", "top1_loc": true,
                         "instances": [{"label": "red", "class": 0, "ious": [...],
                                        "gt_known_loc": true, "pointing_game": true,
                                        "energy_pointing_game": 0.93}],
                         "deletion": [...], "insertion": [...], "full": 0.9, "masked": 0.7}}}

(``ious``: the IoU at every map threshold; with the metrics that need them, ``ious_all`` per
instance for MaxBoxAccV2, ``road_morf`` / ``road_lerf`` scores, and ``pixels``: PxAP's
object/background histograms. An unreadable image: ``status`` ``"error"``, no ``methods``.)
The data-set metrics are folded from the records in input order, so memory grows with the
number of images by a few numbers each, and the records can be made anywhere: in this process
(``engine="local"``) or on Ray actors (``engine="ray"``, see ``camlens.ray_engine``), with the
same batches and the same numbers. With ``out_dir`` they are appended to
``OUT/evaluation.jsonl`` as each batch completes, so a run killed at any moment continues with
``resume=True``: a torn last line is dropped, images already recorded are skipped, and the
records are put back in input order before ``metrics.json`` is folded from all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from camlens.errors import ConfigError
from camlens.evaluation.engines import ENGINES, _actor_job, _records
from camlens.evaluation.fold import _summarize
from camlens.evaluation.measure import _annotations, _class_ids, _sanity, make_methods
from camlens.evaluation.registry import (
    DEFAULT_METRICS,
    HIGHER_IS_BETTER,
    METRICS,
    _make_settings,
    resolve_metrics,
)
from camlens.evaluation.store import OUTPUT_ENTRIES, RECORDS_FILE, _RecordStore, _run_settings
from camlens.io.annotations import Annotation
from camlens.methods import CAMMethod
from camlens.metrics import faithfulness as faith
from camlens.metrics import localization as loc
from camlens.models import Classifier, load_model

__all__ = [
    "DEFAULT_METRICS",
    "ENGINES",
    "HIGHER_IS_BETTER",
    "METRICS",
    "OUTPUT_ENTRIES",
    "RECORDS_FILE",
    "evaluate",
    "make_methods",
    "resolve_metrics",
]


def evaluate(
    model: Classifier | nn.Module | str,
    annotations: str | os.PathLike | Sequence[Annotation],
    *,
    methods: Sequence[str | CAMMethod] | str = ("cam", "gradcam"),
    metrics: Sequence[str] | str | None = None,
    image_root: str | os.PathLike | None = None,
    layer: str | None = None,
    batch_size: int = 16,
    steps: int = 100,
    deletion_baseline: str = "zero",
    insertion_baseline: str = "blur",
    score: str = "prob",
    tolerance: float = 15.0,
    threshold: float = 0.2,
    thresholds: Sequence[float] = loc.DEFAULT_THRESHOLDS,
    road_fractions: Sequence[float] = faith.ROAD_FRACTIONS,
    sanity_images: int = 8,
    sanity_stages: int | Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Score heat-map methods on an annotated data set.

    Parameters:
        model: a ``Classifier``, a spec for ``load_model`` or an ``nn.Module``.
        annotations: a path for ``load_annotations`` (CSV, COCO JSON, VOC XML, mask folder) or
            a list of ``Annotation``. Labels are class names of the model (case-insensitive)
            or class ids.
        methods: method names (``camlens.METHODS``) or method instances (reused, e.g. to
            draw the report's gallery without finding the layer again), a list or a
            comma-separated string; ``"all"`` runs every registered method.
        metrics: metric names or groups (see :func:`resolve_metrics`); default
            :data:`DEFAULT_METRICS`. PxAP and mask IoU need masks.
        image_root: folder that relative image paths of ``annotations`` refer to.
        layer: feature layer for every method (default: found automatically).
        batch_size: images per method call, and perturbed inputs per forward pass. Batches
            are consecutive slices of the annotation list, whatever the engine and however
            often the run was resumed, so the numbers do not depend on either.
        steps: deletion/insertion steps (the curves have ``steps + 1`` points).
        deletion_baseline, insertion_baseline: ``"zero"`` or ``"blur"`` (RISE's defaults).
        score: ``"prob"`` (softmax) or ``"logit"`` for the faithfulness metrics.
        tolerance: pointing-game tolerance in original-image pixels (15 in the paper).
        threshold: Zhou's box threshold for top-1 and GT-known localisation.
        thresholds: the map-threshold grid of MaxBoxAcc and PxAP.
        road_fractions: fractions of pixels ROAD removes.
        sanity_images: how many images (the first ones) the sanity check uses.
        sanity_stages: stages of the sanity check (see ``cascading_randomization``).
        seed: seed of ROAD's noise and of the sanity check's re-initialisation.
        progress: show a progress bar on stderr (images done).
        out_dir: write ``evaluation.json`` (the settings), ``evaluation.jsonl`` (one record per
            annotated image, appended as each batch completes) and ``metrics.json`` (the
            returned dict) there. A non-empty folder is refused unless ``resume`` or
            ``overwrite``. Without ``out_dir`` the records are kept in memory.
        resume: continue an interrupted run in ``out_dir``: a torn last line is dropped,
            images already recorded are skipped, the rest are computed, and the metrics are
            folded from all records. The settings must equal the interrupted run's
            (``ConfigError`` naming those that differ).
        overwrite: remove camlens' previous outputs in ``out_dir`` (:data:`OUTPUT_ENTRIES`,
            never other files) and start again.
        engine: ``"local"`` (this process) or ``"ray"`` (a pool of Ray actors, each loading
            the model once; see ``camlens.ray_engine``). Both give the same numbers; the
            sanity check always runs here.
        ray_address: address of a running Ray cluster (default: start a local Ray).
        workers: Ray actors (default: one per CPU).

    Returns:
        A JSON-ready dict, the content of ``metrics.json``::

            {"n_images": ..., "n_instances": ..., "n_failed": ..., "model": ..., "metrics": [...],
             "methods": {"cam": {"maxboxacc": ..., "top1_loc": ..., ...}, ...},
             "curves": {"cam": {"deletion": [...], "insertion": [...], "boxacc": {...}}},
             "sanity": {"cam": [{"stage": "_fc", "spearman": ..., "ssim": ...}, ...]},
             "per_image": {"cam": [{"image": ..., "label": ..., "iou": ...}, ...]},
             "errors": [{"image": ..., "error": ...}], "settings": {...}}

        All metrics are fractions in [0, 1] (papers often print them x 100); a metric that
        cannot be computed (no masks, no image) is ``None``.

    Raises:
        ConfigError: unknown method, metric or engine, a label that is not a class of the
            model, bad annotations; a non-empty ``out_dir`` without ``resume`` or
            ``overwrite``; a resume with other settings.

    Example:
        >>> result = camlens.evaluate(
        ...     "efficientnet_lite0", "data/sample_boxes.csv", image_root="samples",
        ...     methods=["cam"], metrics="localization")  # the bundled photos, written first
        >>> round(result["methods"]["cam"]["maxboxacc"], 3)
        0.667
        >>> result = camlens.evaluate("efficientnet_lite0", "boxes.csv", out_dir="ev",
        ...                           engine="ray", resume=True)  # continue a killed run
    """
    classifier = model if isinstance(model, Classifier) else load_model(model)
    items, source = _annotations(annotations, image_root)
    settings = _make_settings(
        metrics, batch_size, steps, deletion_baseline, insertion_baseline, score, tolerance,
        threshold, thresholds, road_fractions, seed,
    )  # fmt: skip
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    work = [(i, item, _class_ids(item, classifier)) for i, item in enumerate(items)]
    instances = make_methods(classifier, methods, layer)
    job = _actor_job(model, classifier, methods, instances, layer, settings)
    store = _RecordStore(
        None if out_dir is None else Path(out_dir),
        _run_settings(classifier, items, instances, layer, settings),
    )
    done = store.open(resume=resume, overwrite=overwrite)
    store.append(
        _records(classifier, instances, work, done, job, engine, ray_address, workers, progress)
    )
    sanity = _sanity(
        classifier, items, store.records, instances, settings, sanity_images, layer, sanity_stages
    )
    result = _summarize(
        store.records, [m.name for m in instances], settings, classifier.name, source, sanity
    )
    store.write_metrics(result)
    return result
