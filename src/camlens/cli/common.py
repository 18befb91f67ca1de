"""Shared pieces of the command line: exit codes, common options, error handling."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
import numpy as np

from camlens.errors import ConfigError
from camlens.models import DEFAULT_MODEL, Classifier, available_models, load_model
from camlens.models.checkpoints import TORCHSCRIPT_NOT_HOOKABLE
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


#: ``--device``: the torch device a command runs the model on.
device_option = click.option(
    "--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, cuda:1..."
)

#: ``--layer``: the feature layer the maps come from.
layer_option = click.option(
    "--layer", default=None, help="Feature layer (qualified name); default: found automatically."
)


def engine_options(function):
    """``--engine``, ``--ray-address``, ``--workers``, ``--resume`` and ``--overwrite``: where a
    batch command runs and what it does with an output folder that is not empty.

    The command receives ``engine``, ``ray_address``, ``workers``, ``resume`` and
    ``overwrite``.
    """
    options = [
        click.option(
            "--engine",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help="local: this process. ray: Ray actors (needs camlens[ray]); see --ray-address.",
        ),
        click.option(
            "--ray-address",
            default=None,
            help="Address of an existing Ray cluster (HEAD:6379); default: start a local Ray.",
        ),
        click.option(
            "--workers",
            default=None,
            type=click.IntRange(min=1),
            help="Ray actors (default: one per CPU).",
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue an interrupted run in --out (same settings): skip what is done.",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Replace camlens' previous outputs in a non-empty --out.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_style(colormap: str, alpha: float, threshold: float) -> Style:
    """A validated ``Style`` (an unknown colormap fails here, before any work)."""
    from camlens.render import colorize

    colorize(np.zeros((1, 1)), colormap)
    return Style(colormap=colormap, alpha=alpha, threshold=threshold)


def model_options(function):
    """``--model``, ``--weights``, ``--labels`` and ``--trust-model``: which model to explain.

    The command receives ``model_spec``, ``weights``, ``labels`` and ``trust_model``; pass them
    to ``load_classifier``.
    """
    options = [
        click.option(
            "--model",
            "model_spec",
            default=DEFAULT_MODEL,
            show_default=True,
            help=f"Model: {', '.join(available_models())}, a folder written by "
            "`camlens train`, or a TorchScript file.",
        ),
        click.option(
            "--weights",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="State dict for --model (.safetensors, .pt, .pth, or TorchScript); the "
            "number of classes is read from it.",
        ),
        click.option(
            "--labels",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Class names: a text file (one per line) or JSON (a list, or an object "
            "mapping indices to names or names to indices). Default: the model's own names, "
            "else class indices.",
        ),
        click.option(
            "--trust-model",
            is_flag=True,
            default=False,
            help="Allow model files that run code when loaded (a module saved with "
            "torch.save(model)). Only for files from a source you trust.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def load_classifier(
    spec: str,
    device: str,
    *,
    weights: Path | None = None,
    labels: Path | None = None,
    trust_model: bool = False,
) -> Classifier:
    """Load the model for a command; refuse TorchScript early, since no method can hook it."""
    classifier = load_model(
        spec, weights=weights, labels=labels, trust_model=trust_model, device=device
    )
    if classifier.info.get("format") == "torchscript":
        raise ConfigError(TORCHSCRIPT_NOT_HOOKABLE.format(name=spec, path=spec))
    return classifier


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


METHOD_HELP = (
    "cam: exact, for GAP + linear heads. Gradients (any CNN): gradcam, gradcam++, hirescam, "
    "xgradcam, layercam. Perturbations: scorecam, ablationcam (slow: one forward per channel; "
    "see --max-channels). eigencam: class-agnostic. random: a baseline."
)


def method_options(function):
    """``--method``, ``--max-channels`` and ``--smooth``, shared by the commands that explain."""
    function = click.option(
        "--smooth",
        default=0,
        show_default=True,
        type=click.IntRange(min=0),
        help="Gradient methods: average over this many noisy copies (SmoothGrad); 0 = off.",
    )(function)
    function = click.option(
        "--max-channels",
        default=None,
        type=click.IntRange(min=1),
        help="scorecam/ablationcam: use only the N most active channels (faster).",
    )(function)
    return click.option("--method", default="cam", show_default=True, help=METHOD_HELP)(function)


def method_kwargs(max_channels: int | None, smooth: int) -> dict:
    """The method options given on the command line (only those that were set)."""
    options: dict = {}
    if max_channels is not None:
        options["max_channels"] = max_channels
    if smooth:
        options["smooth"] = smooth
    return options
