"""``camlens explain`` and ``camlens demo``."""

from __future__ import annotations

from pathlib import Path

import click

from camlens.cli.common import (
    device_option,
    engine_options,
    finish,
    layer_option,
    load_classifier,
    make_style,
    method_kwargs,
    method_options,
    model_options,
    run_or_exit,
    style_options,
)
from camlens.io.samples import SAMPLES, write_samples
from camlens.models import DEFAULT_MODEL
from camlens.runner import run_explain


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder (created).",
)
@model_options
@method_options
@click.option(
    "--target",
    default="top1",
    show_default=True,
    help="What to explain: top1, top5, topK, a class id or a class name.",
)
@layer_option
@click.option(
    "--batch-size",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per forward pass.",
)
@device_option
@style_options
@click.option(
    "--threshold",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Box threshold: fraction of the map's maximum (Zhou 2016).",
)
@engine_options
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
    batch_size: int,
    device: str,
    colormap: str,
    alpha: float,
    threshold: float,
    engine: str,
    ray_address: str | None,
    workers: int | None,
    resume: bool,
    overwrite: bool,
) -> None:
    """Explain images: an overlay per explained class, raw maps, results.jsonl, index.html.

    INPUTS are image files or folders (searched recursively). Unreadable inputs are reported
    in results.jsonl and the rest are processed. Exit status: 0 all ok, 1 some inputs failed,
    2 usage or configuration error.
    """
    summary = run_or_exit(
        lambda: run_explain(
            load_classifier(
                model_spec, device, weights=weights, labels=labels, trust_model=trust_model
            ),
            list(inputs),
            out_dir,
            method=method,
            method_options=method_kwargs(max_channels, smooth),
            target=_parse_target(target),
            layer=layer,
            batch_size=batch_size,
            style=make_style(colormap, alpha, threshold),
            engine=engine,
            ray_address=ray_address,
            workers=workers,
            resume=resume,
            overwrite=overwrite,
        )
    )
    finish(summary)


@click.command()
@click.option(
    "--out",
    "out_dir",
    default="demo_out",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Output folder (created).",
)
@method_options
@device_option
@style_options
def demo(
    out_dir: Path,
    method: str,
    max_channels: int | None,
    smooth: int,
    device: str,
    colormap: str,
    alpha: float,
) -> None:
    """The built-in EfficientNet-Lite0 on bundled photos: top-5 class maps per image.

    Writes one figure per photo with its five most likely classes side by side (like
    Figure 3 of the CAM paper), the overlays, raw maps, results.jsonl and index.html.
    Previous demo outputs in --out are replaced.
    """
    samples = write_samples(out_dir / "samples")
    summary = run_or_exit(
        lambda: run_explain(
            load_classifier(DEFAULT_MODEL, device),
            samples,
            out_dir,
            method=method,
            method_options=method_kwargs(max_channels, smooth),
            target="top5",
            style=make_style(colormap, alpha, 0.2),
            figures=True,
            overwrite=True,
            title="camlens demo: where EfficientNet-Lite0 looks",
        )
    )
    click.echo(f"samples: {', '.join(SAMPLES)}")
    finish(summary)


def _parse_target(text: str) -> str | int:
    return int(text) if text.strip().isdigit() else text
