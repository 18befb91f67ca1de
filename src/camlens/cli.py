"""The ``camlens`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import camlens
from camlens.errors import ConfigError
from camlens.io.samples import SAMPLES, write_samples
from camlens.methods import METHODS
from camlens.models import DEFAULT_MODEL, available_models, load_model
from camlens.runner import RunSummary, Style, run_explain

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _style_options(function):
    function = click.option(
        "--alpha",
        type=click.FloatRange(0.0, 1.0),
        default=0.5,
        show_default=True,
        help="Opacity of the heat map over the photo.",
    )(function)
    return click.option(
        "--colormap",
        default="jet",
        show_default=True,
        help="Any matplotlib colormap name (jet, viridis, inferno, turbo...).",
    )(function)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(camlens.__version__, prog_name="camlens")
def main() -> None:
    """camlens shows where a convolutional network looks when it decides.

    \b
    Quick start:
      camlens demo --out demo_out              # built-in model on sample photos
      camlens explain photos/ --out results    # your images, top-1 class maps
    """


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder (created).",
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
    default="cam",
    show_default=True,
    type=click.Choice(sorted(METHODS), case_sensitive=False),
    help="cam: exact, for GAP + linear heads. gradcam: any CNN.",
)
@click.option(
    "--target",
    default="top1",
    show_default=True,
    help="What to explain: top1, top5, topK, a class id or a class name.",
)
@click.option(
    "--layer", default=None, help="Feature layer (qualified name); default: found automatically."
)
@click.option(
    "--batch-size",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per forward pass.",
)
@click.option(
    "--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, cuda:1..."
)
@_style_options
@click.option(
    "--threshold",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Box threshold: fraction of the map's maximum (Zhou 2016).",
)
def explain(
    inputs: tuple[Path, ...],
    out_dir: Path,
    model_spec: str,
    method: str,
    target: str,
    layer: str | None,
    batch_size: int,
    device: str,
    colormap: str,
    alpha: float,
    threshold: float,
) -> None:
    """Explain images: an overlay per explained class, raw maps, results.jsonl, index.html.

    INPUTS are image files or folders (searched recursively). Unreadable inputs are reported
    in results.jsonl and the rest are processed. Exit status: 0 all ok, 1 some inputs failed,
    2 usage or configuration error.
    """
    summary = _run(
        lambda: run_explain(
            _load(model_spec, device),
            list(inputs),
            out_dir,
            method=method,
            target=_parse_target(target),
            layer=layer,
            batch_size=batch_size,
            style=_style(colormap, alpha, threshold),
        )
    )
    _finish(summary)


@main.command()
@click.option(
    "--out",
    "out_dir",
    default="demo_out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Output folder (created).",
)
@click.option(
    "--method",
    default="cam",
    show_default=True,
    type=click.Choice(sorted(METHODS), case_sensitive=False),
)
@click.option("--device", default="cpu", show_default=True, help="Torch device.")
@_style_options
def demo(out_dir: Path, method: str, device: str, colormap: str, alpha: float) -> None:
    """The built-in EfficientNet-Lite0 on bundled photos: top-5 class maps per image.

    Writes one figure per photo with its five most likely classes side by side (like
    Figure 3 of the CAM paper), the overlays, raw maps, results.jsonl and index.html.
    """
    samples = write_samples(out_dir / "samples")
    summary = _run(
        lambda: run_explain(
            _load(DEFAULT_MODEL, device),
            samples,
            out_dir,
            method=method,
            target="top5",
            style=_style(colormap, alpha, 0.2),
            figures=True,
            title="camlens demo: where EfficientNet-Lite0 looks",
        )
    )
    click.echo(f"samples: {', '.join(SAMPLES)}")
    _finish(summary)


def _load(spec: str, device: str) -> camlens.Classifier:
    return load_model(spec, device=device)


def _style(colormap: str, alpha: float, threshold: float) -> Style:
    from camlens.render import colorize

    colorize(__import__("numpy").zeros((1, 1)), colormap)  # fail early on an unknown name
    return Style(colormap=colormap, alpha=alpha, threshold=threshold)


def _parse_target(text: str) -> str | int:
    return int(text) if text.strip().isdigit() else text


def _run(job) -> RunSummary:
    try:
        return job()
    except (ConfigError, ValueError) as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_USAGE)


def _finish(summary: RunSummary) -> None:
    click.echo(
        f"{summary.n_inputs} inputs: {summary.n_ok} ok, {summary.n_error} failed -> "
        f"{summary.out_dir / 'index.html'}"
    )
    if summary.n_inputs == 0:
        click.echo("Error: no images found in the given inputs", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(EXIT_SOME_FAILED if summary.n_error else EXIT_OK)
