"""``camlens audit``: find, confirm and report the shortcuts a model uses on a data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from camlens.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    device_option,
    engine_options,
    layer_option,
    load_classifier,
    model_options,
    run_or_exit,
)
from camlens.methods import METHODS


@click.command()
@click.argument("data", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder (created): audit.json, report.html, figures/, maps/ (the stored map "
    "batches) and audit_run.json (the settings).",
)
@model_options
@click.option(
    "--method",
    default="cam",
    show_default=True,
    type=click.Choice(sorted(METHODS), case_sensitive=False),
    help="Map method: cam (exact, GAP + linear heads), gradcam (any CNN), ...",
)
@layer_option
@click.option(
    "--classes",
    multiple=True,
    help="Audit only these classes (names; repeat the option or separate with commas). "
    "Images of the other classes still serve in the counterfactual tests.",
)
@click.option(
    "--annotations",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Object boxes or masks (CSV, COCO .json, Pascal VOC, or a folder with images/ and "
    "masks/): adds the share of each map outside the object and ranks the worst images.",
)
@click.option(
    "--labels-from",
    type=click.Choice(["auto", "folders", "predictions"]),
    default="auto",
    show_default=True,
    help="Class of each image: its folder (DATA/<class>/...) or the model's prediction; auto: "
    "folders when DATA holds class subfolders and no images of its own.",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=None,
    help="Audit a seeded random sample of at most N images.",
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per pass.",
)
@device_option
@click.option(
    "--confirm-images",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per class used by the paste and erase tests.",
)
@click.option(
    "--erase",
    type=click.Choice(["blur", "mean"]),
    default="blur",
    show_default=True,
    help="How the erase test removes a region: blur it away or fill it with the mean colour.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds samples and tests.")
@engine_options
def audit(
    data: Path,
    out_dir: Path,
    model_spec: str,
    weights: Path | None,
    labels: Path | None,
    trust_model: bool,
    method: str,
    layer: str | None,
    classes: tuple[str, ...],
    annotations: Path | None,
    labels_from: str,
    max_images: int | None,
    batch_size: int,
    device: str,
    confirm_images: int,
    erase: str,
    seed: int,
    engine: str,
    ray_address: str | None,
    workers: int | None,
    resume: bool,
    overwrite: bool,
) -> None:
    """Search a data set for shortcuts the model uses: audit.json and report.html.

    DATA is an ImageFolder (DATA/<class>/<image>: true classes from the folders, matched to
    the model's class names) or a folder of images (classes from the model's predictions).
    For every class, camlens finds regions that are hot on many images at the same place,
    groups the maps into strategies (SpRAy) and tests each region: pasted onto other images,
    does it make the model say the class? Erased, does the confidence fall? Both against
    random regions of the same size.

    The maps of each batch are stored in OUT/maps/ as they are made, so a killed audit
    continues with --resume (same settings, checked against OUT/audit_run.json): stored
    batches are read back, only the missing ones are computed, and the result is the one an
    uninterrupted run gives. A non-empty --out is refused unless --resume or --overwrite
    (which removes only camlens' audit outputs). --engine ray computes the maps on Ray actors
    with the same result.

    \b
    Example (a data set with a planted shortcut, and a model trained on it):
      camlens make-dataset shapes shapes --shortcut corner-tag --shortcut-class square
      camlens train shapes/images --out shapes_model --epochs 8
      camlens audit shapes/images --model shapes_model --annotations shapes/annotations.csv \\
        --out shapes_audit
      (killed? the same command with --resume continues it)

    Exit status: 0 the audit ran (flags are findings, not errors), 2 usage or configuration
    error, or no image could be read.
    """
    from camlens.audit import AuditSettings, run_audit

    names = [name.strip() for item in classes for name in item.split(",") if name.strip()]

    def job() -> dict[str, Any]:
        classifier = load_classifier(
            model_spec, device, weights=weights, labels=labels, trust_model=trust_model
        )
        return run_audit(
            classifier,
            data,
            out_dir,
            method=method,
            layer=layer,
            classes=names or None,
            annotations=annotations,
            labels_from=labels_from,
            max_images=max_images,
            batch_size=batch_size,
            engine=engine,
            seed=seed,
            settings=AuditSettings(confirm_images=confirm_images, erase=erase),
            progress=True,
            ray_address=ray_address,
            workers=workers,
            resume=resume,
            overwrite=overwrite,
        )

    result = run_or_exit(job)
    click.echo(_terminal_summary(result))
    click.echo(f"-> {out_dir / 'audit.json'}, {out_dir / 'report.html'}")
    if result["n_images"] == 0:
        click.echo("Error: no image could be read; see 'errors' in audit.json", err=True)
        raise SystemExit(EXIT_USAGE)
    raise SystemExit(EXIT_OK)


def _terminal_summary(result: dict[str, Any]) -> str:
    """Counts, one line per flag, and the plain-language summary."""
    from camlens.audit import describe_place

    lines = [
        f"audited {result['n_images']} images of {len(result['classes'])} classes "
        f"({result['n_failed']} unreadable) in {result['seconds']} s"
    ]
    for flag in result["flags"]:
        verdict = "CONFIRMED" if flag["confirmed"] else "candidate"
        box = ",".join(f"{v:.2f}" for v in flag["box"])
        line = f"  {verdict:9}  {flag['class']}  {describe_place(flag['box'])}  box {box}"
        if flag["flip_rate"] is not None:
            line += (
                f"  flip {flag['flip_rate']:.0%} (random {flag['baseline_flip_rate']:.0%})"
                f"  drop {round(flag['confidence_drop'], 2) + 0.0:.2f} (random "
                f"{round(flag['baseline_confidence_drop'], 2) + 0.0:.2f})"
            )
        else:
            line += f"  ({flag['kind']})"
        lines.append(line)
    lines.extend(result["summary"])
    return "\n".join(lines)
