"""``camlens explain`` and ``camlens demo``."""

from __future__ import annotations

from pathlib import Path

import click

from camlens.api.explaining import run_explain
from camlens.cli.common import (
    finish_run,
    layer_option,
    load_classifier,
    make_style,
    method_kwargs,
    method_options,
    model_options,
    out_option,
    run_options,
    run_or_exit,
    style_options,
)
from camlens.io.samples import SAMPLES, write_samples
from camlens.models import DEFAULT_MODEL
from camlens.pipeline import OutputFolder, RunOptions, RunResult
from camlens.targets import Target


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_option("Output folder (created): overlays/, raw/, results.jsonl, index.html.")
@model_options
@method_options
@click.option(
    "--target",
    default="top1",
    show_default=True,
    help="What to explain: top1, top5, topK, a class id or a class name.",
)
@layer_option
@style_options
@click.option(
    "--threshold",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Box threshold: fraction of the map's maximum (Zhou 2016).",
)
@run_options
def explain(
    inputs: tuple[Path, ...],
    out_dir: Path,
    model_spec: str,
    weights: Path | None,
    labels: Path | None,
    trust_model: bool,
    method: str,
    max_channels: int | None,
    smooth: int,
    target: str,
    layer: str | None,
    colormap: str,
    alpha: float,
    threshold: float,
    options: RunOptions,
) -> None:
    """Explain images: an overlay per explained class, raw maps, results.jsonl, index.html.

    INPUTS are image files or folders (searched recursively). Unreadable inputs are reported
    in results.jsonl and the rest are processed. A non-empty --out is refused unless --resume
    (same settings and inputs) or --overwrite (removes only what camlens wrote there).

    Exit status: 0 all inputs done, 1 some inputs failed, 2 usage or configuration error.
    """
    style = run_or_exit(lambda: make_style(colormap, alpha, threshold))
    result = run_or_exit(
        lambda: run_explain(
            lambda: load_classifier(
                model_spec, options.device, weights=weights, labels=labels, trust_model=trust_model
            ),
            list(inputs),
            out_dir,
            method=method,
            method_options=method_kwargs(max_channels, smooth),
            target=parse_target(target),
            layer=layer,
            style=style,
            options=options,
        )
    )
    finish_run(result, _summary(result))


@click.command()
@out_option("Output folder (created).", default="demo_out")
@method_options
@style_options
@run_options
def demo(
    out_dir: Path,
    method: str,
    max_channels: int | None,
    smooth: int,
    colormap: str,
    alpha: float,
    options: RunOptions,
) -> None:
    """The built-in EfficientNet-Lite0 on bundled photos: top-5 class maps per image.

    Writes one figure per photo with its five most likely classes side by side (like
    Figure 3 of the CAM paper), the overlays, raw maps, results.jsonl and index.html, and the
    photos themselves (samples/). The folder rules are those of explain: a non-empty --out
    needs --overwrite (which removes only what camlens wrote there) or --resume.
    """
    style = run_or_exit(lambda: make_style(colormap, alpha, 0.2))

    def job() -> RunResult:
        folder = OutputFolder(out_dir, spell=options.spell)
        folder.check(resume=options.resume, overwrite=options.overwrite)
        classifier = load_classifier(DEFAULT_MODEL, options.device)
        folder.prepare(resume=options.resume, overwrite=options.overwrite)
        samples = write_samples(lambda name: folder.path(f"samples/{name}"))
        return run_explain(
            classifier,
            samples,
            folder,
            method=method,
            method_options=method_kwargs(max_channels, smooth),
            target="top5",
            style=style,
            figures=True,
            title="camlens demo: where EfficientNet-Lite0 looks",
            options=options,
        )

    result = run_or_exit(job)
    click.echo(f"samples: {', '.join(SAMPLES)}")
    finish_run(result, _summary(result))


def _summary(result: RunResult) -> str:
    return (
        f"{result.n_inputs} inputs: {result.n_ok} ok, {result.n_error} failed -> "
        f"{result.out_dir / 'index.html'}"
    )


def parse_target(text: str) -> Target:
    """``--target``: a class id when it is a number (ASCII digits only), else a name or topK.

    Example:
        >>> parse_target("285"), parse_target("Egyptian cat"), parse_target("²")
        (285, 'Egyptian cat', '²')
    """
    stripped = text.strip()
    return int(stripped) if stripped.isascii() and stripped.isdigit() else text
