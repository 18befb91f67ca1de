"""``camlens audit``: find, confirm and report the shortcuts a model uses on a data set."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from camlens.cli.common import ModelChoice, exit_status, job_options, run_options, run_or_exit
from camlens.defaults import LABEL_SOURCES

if TYPE_CHECKING:
    from camlens.pipeline import RunOptions


@click.command()
@click.argument("data", type=click.Path(path_type=Path, file_okay=False))
@job_options(
    "Output folder (created): audit.json, report.html, figures/, and the stored map pass "
    "(maps.jsonl, maps/) with the run's settings (.camlens/run.json) for --resume."
)
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
    type=click.Choice(LABEL_SOURCES),
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
@run_options
def audit(
    data: Path,
    out_dir: Path,
    model: ModelChoice,
    method: str,
    method_options: dict,
    layer: str | None,
    classes: tuple[str, ...],
    annotations: Path | None,
    labels_from: str,
    max_images: int | None,
    confirm_images: int,
    erase: str,
    seed: int,
    options: RunOptions,
) -> None:
    """Search a data set for shortcuts the model uses: audit.json and report.html.

    DATA is an ImageFolder (DATA/<class>/<image>: true classes from the folders, matched to
    the model's class names) or a folder of images (classes from the model's predictions).
    For every class, camlens finds regions that are hot on many images at the same place,
    groups the maps into strategies (SpRAy) and tests each region: pasted onto other images,
    does it make the model say the class? Erased, does the confidence fall? Both against
    random regions of the same size.

    The maps of each batch are stored in --out as they are made, so a killed audit continues
    with --resume (same settings and inputs, checked): the complete batches are read back,
    the rest is computed, and the result is the one an uninterrupted run gives. A non-empty
    --out is refused unless --resume or --overwrite (which removes only what camlens wrote
    there). --engine ray computes the maps on Ray actors with the same result.

    \b
    Example (a data set with a planted shortcut, and a model trained on it):
      camlens make-dataset shapes --out shapes --shortcut corner-tag --shortcut-class square
      camlens train shapes/images --out shapes_model --epochs 8
      camlens audit shapes/images --model shapes_model --annotations shapes/annotations.csv \\
        --out shapes_audit
      (killed? the same command with --resume continues it)

    Exit status: 0 every image was read (flags are findings, not failures), 1 some (or all)
    images could not be read (the rest was audited), 2 usage or configuration error.
    """
    from camlens.api.auditing import audit as audit_job
    from camlens.methods import get_method
    from camlens.shortcuts.core import AuditSettings

    method_name = run_or_exit(lambda: get_method(method).name)
    names = [name.strip() for item in classes for name in item.split(",") if name.strip()]
    result = run_or_exit(
        lambda: audit_job(
            lambda: model.load(options.device),
            data,
            out_dir,
            method=method_name,
            layer=layer,
            method_options=method_options,
            classes=names or None,
            annotations=annotations,
            labels_from=labels_from,
            max_images=max_images,
            seed=seed,
            settings=AuditSettings(confirm_images=confirm_images, erase=erase),
            options=options,
        )
    )
    click.echo(terminal_summary(result))
    click.echo(f"-> {out_dir / 'audit.json'}, {out_dir / 'report.html'}")
    if result["n_images"] == 0:
        click.echo("Error: no image could be read; see 'errors' in audit.json", err=True)
    sys.exit(exit_status(result["n_images"], result["n_failed"]))


def terminal_summary(result: dict[str, Any]) -> str:
    """Counts, one line per flag, and the plain-language summary."""
    from camlens.shortcuts.core import describe_place

    lines = [
        f"audited {result['n_images']} images of {len(result['classes'])} classes "
        f"({result['n_failed']} unreadable) in {result['seconds']} s"
    ]
    for flag in result["flags"]:
        verdict = "CONFIRMED" if flag["confirmed"] else "candidate"
        box = ",".join(f"{v:.2f}" for v in flag["box"])
        place = describe_place(flag["box"])
        if flag.get("kind") == "moving-pattern":  # the box is one exemplar's, not a place
            place = f"a moving pattern on {len(flag['locations'])} images (e.g. {place})"
        line = f"  {verdict:9}  {flag['class']}  {place}  box {box}"
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
