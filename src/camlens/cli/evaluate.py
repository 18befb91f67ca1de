"""``camlens evaluate``: localisation and faithfulness numbers per method, and a report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from camlens.cli.common import ModelChoice, exit_status, job_options, run_options, run_or_exit
from camlens.errors import ConfigError

if TYPE_CHECKING:
    from camlens.pipeline import RunOptions

#: The metric groups ``--metrics`` takes (``camlens.metrics.registry.GROUPS``; a test keeps
#: this list equal to it: the registry is not imported before the command runs).
METRIC_GROUPS = (
    "localization", "mask", "faithfulness", "deletion", "insertion", "confidence", "road",
    "sanity", "all",
)  # fmt: skip


@click.command()
@click.argument("annotations", type=click.Path(path_type=Path))
@job_options(
    "Output folder (created): metrics.json, report.html, curves/, gallery/, and "
    "evaluation.jsonl (one record per image; the maps the report shows in parts/).",
    method=None,
    several=True,
)
@click.option(
    "--metrics",
    default=None,
    help=f"Comma-separated metrics or groups ({', '.join(METRIC_GROUPS)}). "
    "Default: localization and faithfulness.",
)
@click.option(
    "--images",
    "image_root",
    default=None,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder that relative image paths in ANNOTATIONS refer to "
    "(default: the annotation file's folder).",
)
@click.option(
    "--samples",
    is_flag=True,
    help="The annotations refer to camlens' bundled sample photos (chelsea.png, coffee.png, "
    "...): write them to OUT/samples and read the images from there.",
)
@click.option(
    "--steps",
    default=128,  # camlens.metrics.faithfulness.DEFAULT_STEPS (a test keeps them equal)
    show_default=True,
    type=click.IntRange(min=1),
    help="Deletion/insertion steps: each curve has STEPS + 1 points, one forward pass per "
    "point and image. The report and the summary line state the number used.",
)
@click.option(
    "--deletion-baseline",
    default="zero",
    show_default=True,
    type=click.Choice(["zero", "blur"]),
    help="What deleted pixels become.",
)
@click.option(
    "--insertion-baseline",
    default="blur",
    show_default=True,
    type=click.Choice(["zero", "blur"]),
    help="The image that insertion starts from.",
)
@click.option(
    "--tolerance",
    default=15.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Pointing-game tolerance in image pixels.",
)
@click.option(
    "--gallery",
    default=6,
    show_default=True,
    type=click.IntRange(min=0),
    help="Worst-localised images shown per method.",
)
@click.option(
    "--sanity-images",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images used by the sanity check (with --metrics sanity).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed (ROAD, sanity).")
@click.option(
    "--score-threshold",
    default=0.5,  # camlens.dense.DEFAULT_SCORE_THRESHOLD
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Detectors: evaluate the detections scoring at least this.",
)
@click.option(
    "--iou-threshold",
    default=0.5,  # camlens.models.dense.DEFAULT_IOU_THRESHOLD
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Detectors: the IoU with the original box that a detection of the same class needs, "
    "on each perturbed or differentiated pass, to count as the same detection.",
)
@run_options
def evaluate(
    annotations: Path,
    out_dir: Path,
    model: ModelChoice,
    method: str | None,
    method_options: dict,
    metrics: str | None,
    image_root: Path | None,
    samples: bool,
    layer: str | None,
    steps: int,
    deletion_baseline: str,
    insertion_baseline: str,
    tolerance: float,
    gallery: int,
    sanity_images: int,
    seed: int,
    score_threshold: float,
    iou_threshold: float,
    options: RunOptions,
) -> None:
    """Score heat-map methods on annotated images: metrics.json and report.html.

    ANNOTATIONS is a CSV (image,x0,y0,x1,y1,label), a COCO .json, Pascal VOC .xml files or a
    folder with images/ and masks/. Labels are the model's class names. --method takes a
    comma-separated list or 'all' (default: cam,gradcam; gradcam for a detector);
    --max-channels, --smooth, --aug-smooth and --eigen-smooth reach every method that takes
    them.

    A detector (e.g. --model torchvision:fasterrcnn_mobilenet_v3_large_320_fpn --weights W)
    is evaluated per detection: each detection scoring at least --score-threshold is matched
    to a ground-truth box of its class (IoU >= 0.5, greedy by score) and its map is measured
    in that box (pointing game, energy) and by deletion/insertion of its detection score;
    metrics.json also counts the detections, matched ones and missed boxes (no report).

    Each batch's records are appended to OUT/evaluation.jsonl as it completes, so a killed
    run continues with --resume (same settings; complete batches are kept). A non-empty --out
    is refused unless --resume or --overwrite (which removes only what camlens wrote there).
    --engine ray spreads the batches over Ray actors with the same results.

    \b
    Example (hand-drawn boxes of the bundled photos, shipped in the repository):
      camlens evaluate data/sample_boxes.csv --samples --out eval_out
      camlens evaluate boxes.csv --out eval_out --engine ray --resume

    Exit status: 0 all images evaluated, 1 some (or all) images could not be read (listed in
    metrics.json), 2 usage or configuration error.
    """

    from camlens.api.evaluating import evaluate as evaluate_job
    from camlens.io.samples import write_samples
    from camlens.pipeline import OutputFolder

    def job() -> dict:
        if samples and image_root is not None:
            raise ConfigError("use either --samples or --images, not both")
        folder = OutputFolder(out_dir, spell=options.spell)
        root = image_root
        if samples:
            # The photos go into OUT, and must be there before the annotations are read.
            folder.check(resume=options.resume, overwrite=options.overwrite)
            folder.prepare(resume=options.resume, overwrite=options.overwrite)
            write_samples(lambda name: folder.path(f"samples/{name}"))
            root = folder.root / "samples"
        return evaluate_job(
            lambda: model.load(options.device),
            annotations,
            methods=method,
            metrics=metrics,
            image_root=root,
            layer=layer,
            method_options=method_options,
            steps=steps,
            deletion_baseline=deletion_baseline,
            insertion_baseline=insertion_baseline,
            tolerance=tolerance,
            sanity_images=sanity_images,
            seed=seed,
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
            out_dir=folder,
            gallery=gallery,
            options=options,
        )

    result = run_or_exit(job)
    click.echo(_summary_table(result))
    written = [out_dir / "metrics.json"]
    if result.get("task") != "detection":  # a detector's evaluation writes no report
        written.append(out_dir / "report.html")
    click.echo(f"-> {', '.join(map(str, written))}")
    if result["n_images"] == 0:
        click.echo("Error: no image could be evaluated; see 'errors' in metrics.json", err=True)
    sys.exit(exit_status(result["n_images"], result["n_failed"]))


def _summary_table(result: dict) -> str:
    """A plain-text methods x metrics table for the terminal."""
    methods = result["methods"]
    keys = [k for k in result["metrics"] if any(v.get(k) is not None for v in methods.values())]
    width = max([len("method"), *(len(m) for m in methods)])
    annotated = "ground-truth boxes" if result.get("task") == "detection" else "annotated classes"
    head = f"{result['n_images']} images, {result['n_instances']} {annotated}, {result['n_failed']} failed"
    if {"deletion_auc", "insertion_auc"} & set(result["metrics"]):
        head += f"; deletion/insertion: {result['settings']['steps']} steps"
    lines = [
        head,
        " ".join(["method".ljust(width), *(k.rjust(max(len(k), 6)) for k in keys)]),
    ]
    for name, values in methods.items():
        cells = [
            ("n/a" if values.get(k) is None else f"{values[k]:.3f}").rjust(max(len(k), 6))
            for k in keys
        ]
        lines.append(" ".join([name.ljust(width), *cells]))
    return "\n".join(lines)
