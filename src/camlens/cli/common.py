"""Shared pieces of the command line: exit codes, common options, error handling."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import click
import numpy as np

from camlens.errors import ConfigError
from camlens.models import Classifier, load_model
from camlens.runner import RunSummary, Style

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2

T = TypeVar("T")


def style_options(function):
    """``--colormap`` and ``--alpha``, shared by every command that draws overlays."""
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


def make_style(colormap: str, alpha: float, threshold: float) -> Style:
    """A validated ``Style`` (an unknown colormap fails here, before any work)."""
    from camlens.render import colorize

    colorize(np.zeros((1, 1)), colormap)
    return Style(colormap=colormap, alpha=alpha, threshold=threshold)


def load_classifier(spec: str, device: str) -> Classifier:
    return load_model(spec, device=device)


def run_or_exit(job: Callable[[], T]) -> T:
    """Run ``job``; a configuration error prints ``Error: ...`` and exits with status 2."""
    try:
        return job()
    except (ConfigError, ValueError) as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_USAGE)


def finish(summary: RunSummary) -> None:
    """Print the summary and exit: 0 all ok, 1 some inputs failed, 2 nothing to do."""
    click.echo(
        f"{summary.n_inputs} inputs: {summary.n_ok} ok, {summary.n_error} failed -> "
        f"{summary.out_dir / 'index.html'}"
    )
    if summary.n_inputs == 0:
        click.echo("Error: no images found in the given inputs", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(EXIT_SOME_FAILED if summary.n_error else EXIT_OK)
