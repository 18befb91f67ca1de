"""``camlens.evaluate``: how good are a model's heat maps on an annotated data set?

The work is the evaluate task (``camlens.tasks.evaluate``) on the pipeline: batches of
annotated images through every method and the chosen metrics' measurements, one record per
image (in memory, or ``OUT/evaluation.jsonl`` with the maps in ``OUT/parts/``), folded into
the summary. The sanity check, which re-initialises copies of the model, runs afterwards in
this process; then ``metrics.json`` and ``report.html`` are written from the summary and the
records (the report never runs the model).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from camlens.api.explaining import job_folder, job_model, model_task
from camlens.dense import DEFAULT_SCORE_THRESHOLD
from camlens.errors import ConfigError
from camlens.io.annotations import Annotation
from camlens.methods import CAMMethod
from camlens.metrics import faithfulness as faith
from camlens.metrics import localization as loc
from camlens.metrics.registry import make_settings
from camlens.models import Classifier
from camlens.models.dense import DEFAULT_IOU_THRESHOLD
from camlens.pipeline import OutputFolder, RunOptions, run
from camlens.report.evaluate import REPORT_FILE, write_evaluation_report
from camlens.tasks.evaluate import (
    METRICS_FILE,
    EvaluateTask,
    Work,
    add_sanity,
    build_methods,
    class_ids,
    read_annotations,
    sanity_check,
)
from camlens.tasks.evaluate_dense import (
    DetectionEvaluateTask,
    dense_methods,
    detection_metrics,
)
from camlens.writers import write_json

__all__ = ["evaluate"]


def evaluate(
    model: Classifier | nn.Module | str | Callable[[], Classifier],
    annotations: str | os.PathLike | Sequence[Annotation],
    *,
    methods: Sequence[str | CAMMethod] | str | None = None,
    metrics: Sequence[str] | str | None = None,
    image_root: str | os.PathLike | None = None,
    layer: str | None = None,
    method_options: dict[str, Any] | None = None,
    steps: int = faith.DEFAULT_STEPS,
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
    out_dir: str | os.PathLike | OutputFolder | None = None,
    report: bool = True,
    gallery: int = 6,
    options: RunOptions | None = None,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
) -> dict[str, Any]:
    """Score heat-map methods on an annotated data set.

    For every annotated image and every method, the maps of the model's top-1 class and of
    every annotated class are computed in one call of the method, then:

    * **localisation**, on the annotated classes' maps at the original image size: MaxBoxAcc,
      MaxBoxAccV2, GT-known localisation at Zhou's threshold, pointing game, energy-based
      pointing game, and PxAP / peak pixel IoU when masks are given; top-1 localisation on
      the top-1 class's map;
    * **faithfulness**, on the top-1 class's map at the model's input size: deletion and
      insertion AUC, Average Drop, Increase in Confidence, Average Gain and, on request, ROAD;
    * **sanity**, on request: Adebayo's cascading randomisation on the first few images.

    The metrics, their directions and groups are listed in ``camlens.metrics.registry``.

    A **detector** (``camlens.api.explaining.model_task`` says ``"detection"``: a torchvision
    detector, or a module returning one dict of ``boxes``, ``labels`` and ``scores`` per
    image) is evaluated per detection instead (``camlens.tasks.evaluate_dense``): each image's
    detections scoring at least ``score_threshold`` are explained (a map per detection,
    ``camlens.dense.explain_dense``), matched greedily by score to the ground-truth boxes of
    their class (IoU >= 0.5, one box per detection), and each matched detection is measured:
    pointing game and energy-based pointing game of its map in its ground-truth box, deletion
    and insertion AUC of its *detection score* (the detector's score of the detection matching
    its box on the perturbed copies; ``score`` does not apply). ``metrics.json`` then holds,
    per method, the means over the matched detections and the counts ``n_detections``,
    ``n_matched``, ``n_unmatched``, ``n_missed`` (ground-truth boxes no detection matched),
    ``n_gt`` and ``recall``; ``task`` is ``"detection"``. No report, no sanity check.

    Parameters:
        model: a ``Classifier``, a ``load_model`` spec, an ``nn.Module``, or a function that
            loads it (called once the output folder is checked).
        annotations: a path for ``load_annotations`` (CSV, COCO JSON, VOC XML, mask folder)
            or a list of ``Annotation``. Labels are class names of the model
            (case-insensitive) or class ids.
        methods: method names (``camlens.METHODS``) or method instances, a list or a
            comma-separated string; ``"all"`` runs every registered method. None: ``cam``
            and ``gradcam`` for a classifier, ``gradcam`` for a detector (CAM and method
            instances are refused for a detector).
        metrics: metric names or groups (``camlens.metrics.registry.resolve_metrics``);
            default: localisation and faithfulness. PxAP and mask IoU need masks. A
            detector: ``pointing_game``, ``energy_pointing_game``, ``deletion_auc``,
            ``insertion_auc`` (default: all four; a group keeps those of them it holds).
        image_root: folder that relative image paths of ``annotations`` refer to.
        layer: feature layer for every method (default: found automatically).
        method_options: keyword arguments of the methods (``{"max_channels": 64}``,
            ``{"smooth": 8}``); each method receives those its class takes.
        steps: deletion/insertion steps (the curves have ``steps + 1`` points).
        deletion_baseline, insertion_baseline: ``"zero"`` or ``"blur"`` (RISE's defaults).
        score: ``"prob"`` (softmax) or ``"logit"`` for the faithfulness metrics.
        tolerance: pointing-game tolerance in original-image pixels (15 in the paper).
        threshold: Zhou's box threshold for top-1 and GT-known localisation.
        thresholds: the map-threshold grid of MaxBoxAcc and PxAP.
        road_fractions: fractions of pixels ROAD removes.
        sanity_images: how many images (the first readable ones) the sanity check uses.
        sanity_stages: stages of the sanity check (see ``cascading_randomization``).
        seed: seed of ROAD's noise and of the sanity check's re-initialisation.
        out_dir: write ``evaluation.jsonl`` (one record per annotated image, appended batch
            by batch; the maps the report shows in ``parts/``), ``metrics.json`` (the
            returned dict) and ``report.html`` there; the run's settings are kept in
            ``.camlens/run.json``. An ``OutputFolder`` keeps the caller's files in it (the
            bundled photos of ``--samples``). Without it the records stay in memory.
        report: with ``out_dir``, also write ``report.html`` (curves and gallery).
        gallery: worst-localised images shown per method in the report.
        options: batch size (images per method call, and perturbed inputs per forward
            pass), device, engine (``"local"`` or ``"ray"``: the same numbers), resume and
            overwrite of ``out_dir``, progress (``RunOptions``). A non-empty ``out_dir`` is
            refused unless ``resume`` (continue an interrupted run after its last complete
            batch; the settings must equal its settings) or ``overwrite`` (remove what
            camlens wrote there before, nothing else).
        score_threshold: a detector: evaluate the detections scoring at least this.
        iou_threshold: a detector: the IoU with which a detection on a perturbed or
            differentiated pass is the same detection (``DetectionScores``).

    Returns:
        A JSON-ready dict, the content of ``metrics.json``::

            {"n_images": ..., "n_instances": ..., "n_failed": ..., "model": ...,
             "annotations": ..., "metrics": [...],
             "methods": {"cam": {"maxboxacc": ..., "top1_loc": ..., ...}, ...},
             "curves": {"cam": {"deletion": [...], "insertion": [...], "boxacc": {...}}},
             "sanity": {"cam": [{"stage": "_fc", "spearman": ..., "ssim": ...}, ...]},
             "per_image": {"cam": [{"image": ..., "label": ..., "iou": ...}, ...]},
             "errors": [{"image": ..., "error": ...}], "settings": {...}}

        All metrics are fractions in [0, 1] (papers often print them x 100); a metric that
        cannot be computed (no masks, no image) is ``None``.

    Raises:
        ConfigError: unknown method, metric or option, a label that is not a class of the
            model, bad annotations (all checked before anything is written); an output folder
            the rules refuse; a resume with other settings.

    Example (three photos, four boxes in ``boxes.csv``; then the same run resumed):
        >>> import camlens, os
        >>> result = camlens.evaluate(
        ...     "efficientnet_lite0", "boxes.csv", methods=["cam"], metrics="localization",
        ...     out_dir="ev", options=camlens.RunOptions(progress=False))
        >>> result["n_images"], result["n_instances"]
        (3, 4)
        >>> {k: round(result["methods"]["cam"][k], 2) for k in ("maxboxacc", "top1_loc")}
        {'maxboxacc': 1.0, 'top1_loc': 0.33}
        >>> sorted(os.listdir("ev"))  # doctest: +NORMALIZE_WHITESPACE
        ['.camlens', 'curves', 'evaluation.jsonl', 'gallery', 'metrics.json', 'parts',
         'report.html']
        >>> again = camlens.evaluate(  # a killed run continues after its last complete batch
        ...     "efficientnet_lite0", "boxes.csv", methods=["cam"], metrics="localization",
        ...     out_dir="ev", options=camlens.RunOptions(resume=True, progress=False))
        >>> again["methods"] == result["methods"]  # engine="ray" gives the same numbers too
        True
    """
    options = options or RunOptions()
    folder = job_folder(out_dir, options) if out_dir is not None else None
    if folder is None and (options.resume or options.overwrite):
        raise ConfigError(
            f"{options.spell('resume')} and {options.spell('overwrite')} apply to an output "
            f"folder; give {options.spell('out_dir', '')}"
        )
    try:
        settings = make_settings(
            metrics, batch_size=options.batch_size, steps=steps,
            deletion_baseline=deletion_baseline, insertion_baseline=insertion_baseline,
            score=score, tolerance=tolerance, threshold=threshold, thresholds=thresholds,
            road_fractions=road_fractions, seed=seed,
        )  # fmt: skip
        items, source = read_annotations(annotations, image_root)
        classifier = job_model(model, options.device)
        task: EvaluateTask | DetectionEvaluateTask
        if _is_detector(classifier):
            chosen = dense_methods(methods, method_options, classifier.module)
            work = [Work(item, class_ids(item, classifier)) for item in items]
            task = DetectionEvaluateTask(
                classifier,
                tuple(name for name, _ in chosen),
                replace(settings, metrics=detection_metrics(metrics)),
                layer,
                {name: taken for name, taken in chosen},
                source,
                max_pixels=options.max_pixels,
                score_threshold=score_threshold,
                iou_threshold=iou_threshold,
            )
        else:
            methods = ("cam", "gradcam") if methods is None else methods
            instances = build_methods(classifier, methods, layer, method_options)
            work = [Work(item, class_ids(item, classifier)) for item in items]
            given = not isinstance(methods, str) and any(isinstance(m, CAMMethod) for m in methods)
            task = EvaluateTask(
                classifier,
                tuple(instances) if given else tuple(m.name for m in instances),
                settings,
                layer,
                dict(method_options or {}),
                source,
                max_pixels=options.max_pixels,
            )
        detection = isinstance(task, DetectionEvaluateTask)
        if folder is not None:
            folder.prepare(resume=options.resume, overwrite=options.overwrite)
            if folder.fresh:  # refuse a file in the way now, not after the work
                outputs = [METRICS_FILE, task.records_file]
                for name in [*outputs, REPORT_FILE] if report and not detection else outputs:
                    folder.path(name)
    except ConfigError:
        if folder is not None and folder.prepared and folder.fresh:
            folder.discard()
        raise
    result = run(task, work, None if folder is None else folder.root, options, folder=folder)
    summary = result.summary
    if not detection:
        add_sanity(
            summary,
            sanity_check(
                classifier, items, task.method_names, settings,
                n_images=sanity_images, layer=layer, stages=sanity_stages,
            ),
        )  # fmt: skip
    if folder is not None:
        write_json(folder.path(METRICS_FILE), summary)
        if report and not detection:
            records = folder.log(EvaluateTask.records_file, EvaluateTask.parts_dir).records()
            write_evaluation_report(folder, summary, records, annotations=items, gallery=gallery)
        folder.close()
    return summary


def _is_detector(classifier: Classifier) -> bool:
    """Whether ``classifier`` is a detector (``model_task``). A model whose task cannot be
    told (its output on a blank input is none of the three, or it does not run on one) is
    left to the classifier path, which reports its own errors as before."""
    known = classifier.info.get("task")
    if known:
        return known == "detection"
    try:
        return model_task(classifier) == "detection"
    except Exception:  # any failure: not recognisably a detector
        return False
