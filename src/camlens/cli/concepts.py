"""``camlens concepts``: Deep Feature Factorization of a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from camlens.cli.common import (
    ModelChoice,
    finish_run,
    layer_option,
    model_options,
    out_option,
    run_options,
    run_or_exit,
)
from camlens.defaults import DEFAULT_OVERLAY_SIZE

if TYPE_CHECKING:
    from camlens.pipeline import RunOptions, RunResult

#: ``--fit-images`` default (``camlens.tasks.concepts.DEFAULT_FIT_IMAGES``; repeated here so
#: that ``--help`` imports no library; a test keeps them equal).
FIT_IMAGES = 64


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_option(
    "Output folder (created): concepts/ (pictures), raw/, results.jsonl, concepts.json, "
    "concepts.csv, concepts.npz (the fitted concepts)."
)
@model_options
@layer_option
@click.option(
    "-k",
    "--n-concepts",
    "k",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Number of concepts to find (the K of the factorisation).",
)
@click.option(
    "--fit-images",
    default=FIT_IMAGES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Fit the concepts on the first N inputs (unreadable ones skipped); every input is "
    "then drawn with these concepts.",
)
@click.option(
    "--top",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Classes named per concept (the classifier's head applied to the concept).",
)
@click.option(
    "--colormap",
    default="tab10",
    show_default=True,
    help="Where the concepts' colours come from: a qualitative matplotlib colormap (tab10, "
    "tab20, Set1...); a continuous one gives evenly spaced colours.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="Opacity of the colour where a concept is at its strongest.",
)
@click.option(
    "--overlay-size",
    default=DEFAULT_OVERLAY_SIZE,
    show_default=True,
    type=click.IntRange(min=0),
    help="Longest side of a picture in pixels (larger photos are drawn smaller); 0: the "
    "original size.",
)
@run_options
def concepts(
    inputs: tuple[Path, ...],
    out_dir: Path,
    model: ModelChoice,
    layer: str | None,
    k: int,
    fit_images: int,
    top: int,
    colormap: str,
    alpha: float,
    overlay_size: int,
    options: RunOptions,
) -> None:
    """Find K concepts a model uses across images (Deep Feature Factorization) and draw them.

    The layer's activations on the first --fit-images inputs (images x positions by
    channels, ReLU'd) are factorised into K concepts by non-negative matrix factorisation
    (Collins et al., ECCV 2018): each concept is a channel pattern the layer uses in many
    places, named by the classes the model's linear head gives it. Every input is then drawn
    with each concept's region in its own colour (a pixel takes the colour of its strongest
    concept; opacity from its strength) and a legend.

    \b
    Writes, in --out:
      concepts/<n>_<name>.png  the picture of each input
      raw/<n>_<name>.npz       its K coefficient maps at the layer's resolution
      results.jsonl            one record per input: each concept's share of the image
      concepts.json, .csv      per concept: colour, top classes, images it dominates
      concepts.npz             the fitted concepts (a --resume reuses them)

    INPUTS are image files or folders (searched recursively). Unreadable inputs are reported
    in results.jsonl and the rest are processed. A non-empty --out is refused unless --resume
    (same settings, concepts and inputs) or --overwrite (removes only what camlens wrote).

    Exit status: 0 all inputs done, 1 some inputs failed, 2 usage or configuration error.
    """
    from camlens.api.factorizing import concepts as run_concepts
    from camlens.tasks.concepts import ConceptStyle

    style = run_or_exit(lambda: ConceptStyle(colormap, alpha, overlay_size).check())
    result = run_or_exit(
        lambda: run_concepts(
            lambda: model.load(options.device),
            list(inputs),
            out_dir,
            k=k,
            layer=layer,
            fit_images=fit_images,
            top=top,
            style=style,
            options=options,
        )
    )
    finish_run(result, _summary(result))


def _summary(result: RunResult) -> str:
    counts = ", ".join(
        f"concept {k}: {n}" for k, n in enumerate(result.summary.get("dominant", []))
    )
    return (
        f"{result.n_inputs} inputs: {result.n_ok} ok, {result.n_error} failed; dominant in "
        f"({counts}) -> {result.out_dir / 'concepts.json'}"
    )
