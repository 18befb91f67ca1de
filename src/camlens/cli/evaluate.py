"""``camlens evaluate``: localisation and faithfulness numbers per method, and a report."""

from __future__ import annotations

from pathlib import Path

import click

from camlens.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    device_option,
    engine_options,
    layer_option,
    load_classifier,
    run_or_exit,
)
from camlens.errors import ConfigError
from camlens.models import DEFAULT_MODEL, available_models


@click.command()
@click.argument("annotations", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder (created): metrics.json, report.html, curves/, gallery/, "
    "evaluation.jsonl (one record per image) and evaluation.json (the settings).",
)
@click.option(
    "--model",
    "model_spec",
    default=DEFAULT_MODEL,
    show_default=True,
    help=f"Model: {', '.join(available_models())}.",
)
@click.option(
    "--method",
    "methods",
    default="cam,gradcam",
    show_default=True,
    help="Comma-separated methods (camlens.METHODS), or 'all'.",
)
@click.option(
    "--metrics",
    default=None,
    help="Comma-separated metrics or groups (localization, faithfulness, confidence, "
    "deletion, insertion, mask, road, sanity, all). Default: localization and faithfulness.",
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
@layer_option
@click.option(
    "--batch-size",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per method call and perturbed inputs per forward pass.",
)
@device_option
@click.option(
    "--steps",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Deletion/insertion steps.",
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
@engine_options
def evaluate(
    annotations: Path,
    out_dir: Path,
    model_spec: str,
    methods: str,
    metrics: str | None,
    image_root: Path | None,
    samples: bool,
    layer: str | None,
    batch_size: int,
    device: str,
    steps: int,
    deletion_baseline: str,
    insertion_baseline: str,
    tolerance: float,
    gallery: int,
    sanity_images: int,
    seed: int,
    engine: str,
    ray_address: str | None,
    workers: int | None,
    resume: bool,
    overwrite: bool,
) -> None:
    """Score heat-map methods on annotated images: metrics.json and report.html.

    ANNOTATIONS is a CSV (image,x0,y0,x1,y1,label), a COCO .json, Pascal VOC .xml files or a
    folder with images/ and masks/. Labels are the model's class names.

    Each image's numbers are appended to OUT/evaluation.jsonl as its batch completes, so a
    killed run continues with --resume (same settings; images already recorded are skipped).
    A non-empty --out is refused unless --resume or --overwrite. --engine ray spreads the
    images over Ray actors with the same results.

    \b
    Example (hand-drawn boxes of the bundled photos, shipped in the repository):
      camlens evaluate data/sample_boxes.csv --samples --out eval_out
      camlens evaluate boxes.csv --out eval_out --engine ray --resume

    Exit status: 0 evaluated (unreadable images are listed in metrics.json), 2 usage or
    configuration error, or no image could be evaluated.
    """
    from camlens.evaluation import OUTPUT_ENTRIES, RECORDS_FILE, make_methods
    from camlens.evaluation import evaluate as run_evaluation
    from camlens.io.annotations import load_annotations
    from camlens.report.evaluate import write_evaluation_report
    from camlens.runner import prepare_output

    def job() -> dict:
        root = image_root
        continuing = resume
        if samples:
            if image_root is not None:
                raise ConfigError("use either --samples or --images, not both")
            from camlens.io.samples import write_samples

            # The photos go into OUT, and must be there before the annotations are read: check
            # the folder first, then let the evaluation continue in it.
            prepare_output(
                out_dir, resume=resume, overwrite=overwrite, entries=OUTPUT_ENTRIES,
                results=RECORDS_FILE, key="index",
            )  # fmt: skip
            write_samples(out_dir / "samples")
            root, continuing = out_dir / "samples", True
        classifier = load_classifier(model_spec, device)
        instances = {m.name: m for m in make_methods(classifier, methods, layer)}
        result = run_evaluation(
            classifier,
            annotations,
            image_root=root,
            methods=list(instances.values()),
            metrics=metrics,
            layer=layer,
            batch_size=batch_size,
            steps=steps,
            deletion_baseline=deletion_baseline,
            insertion_baseline=insertion_baseline,
            tolerance=tolerance,
            sanity_images=sanity_images,
            seed=seed,
            progress=True,
            out_dir=out_dir,
            resume=continuing,
            overwrite=overwrite and not samples,
            engine=engine,
            ray_address=ray_address,
            workers=workers,
        )
        write_evaluation_report(
            out_dir,
            result,
            classifier=classifier,
            annotations=load_annotations(annotations, image_root=root) if gallery else None,
            gallery=gallery,
            methods=instances,
        )
        return result

    result = run_or_exit(job)
    click.echo(_summary_table(result))
    click.echo(f"-> {out_dir / 'metrics.json'}, {out_dir / 'report.html'}")
    if result["n_images"] == 0:
        click.echo("Error: no image could be evaluated; see 'errors' in metrics.json", err=True)
        raise SystemExit(EXIT_USAGE)
    raise SystemExit(EXIT_OK)


def _summary_table(result: dict) -> str:
    """A plain-text methods x metrics table for the terminal."""
    methods = result["methods"]
    keys = [k for k in result["metrics"] if any(v.get(k) is not None for v in methods.values())]
    width = max([len("method"), *(len(m) for m in methods)])
    lines = [
        f"{result['n_images']} images, {result['n_instances']} annotated classes, "
        f"{result['n_failed']} failed",
        " ".join(["method".ljust(width), *(k.rjust(max(len(k), 6)) for k in keys)]),
    ]
    for name, values in methods.items():
        cells = [
            ("n/a" if values.get(k) is None else f"{values[k]:.3f}").rjust(max(len(k), 6))
            for k in keys
        ]
        lines.append(" ".join([name.ljust(width), *cells]))
    return "\n".join(lines)
