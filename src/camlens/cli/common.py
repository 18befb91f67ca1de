"""Shared pieces of the command line: exit codes, common options, error handling."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from camlens.errors import ConfigError
from camlens.models import DEFAULT_MODEL, Classifier, load_model
from camlens.models.checkpoints import TORCHSCRIPT_NOT_HOOKABLE
from camlens.pipeline import DEFAULT_BATCH_SIZE, ENGINES, RunOptions, RunResult
from camlens.tasks.explain import Style

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


def make_style(colormap: str, alpha: float, threshold: float) -> Style:
    """A checked ``Style`` (an unknown colormap fails here, before any work)."""
    return Style(colormap=colormap, alpha=alpha, threshold=threshold).check()


def model_options(function):
    """``--model``, ``--weights``, ``--labels``, ``--trust-model`` and ``--random-weights``:
    which model to explain.

    The command receives ``model_spec``, ``weights``, ``labels`` and ``trust_model``; pass them
    to ``load_classifier``. ``--random-weights`` is not passed to the command: it is kept in
    the click context, where ``load_classifier`` reads it.
    """
    function = model_file_options(function)
    return click.option(
        "--model",
        "model_spec",
        default=DEFAULT_MODEL,
        show_default=True,
        help=MODEL_HELP,
    )(function)


MODEL_HELP = (
    "Model: efficientnet_lite0 (built in, ImageNet), torchvision:<name> or timm:<name> (with "
    "--weights), a folder written by `camlens train`, or a TorchScript file."
)


def model_file_options(function):
    """``--weights``, ``--labels``, ``--trust-model`` and ``--random-weights`` (see
    :func:`model_options`)."""
    options = [
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
        click.option(
            "--random-weights",
            is_flag=True,
            default=False,
            expose_value=False,
            callback=_remember_random_weights,
            help="Allow a torchvision:/timm: architecture without --weights, i.e. with random "
            "weights (its maps mean nothing): for tests and sanity checks.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


_RANDOM_WEIGHTS_KEY = "camlens.random_weights"


def _remember_random_weights(context: click.Context, _param: click.Parameter, value: bool):
    context.meta[_RANDOM_WEIGHTS_KEY] = value
    return value


def load_classifier(
    spec: str,
    device: str,
    *,
    weights: Path | None = None,
    labels: Path | None = None,
    trust_model: bool = False,
    random_weights: bool | None = None,
) -> Classifier:
    """Load the model for a command; refuse TorchScript early, since no method can hook it.

    ``random_weights`` (allow a network with random weights, see ``load_model``) defaults to
    the command's ``--random-weights`` flag (``model_options``).
    """
    if random_weights is None:
        context = click.get_current_context(silent=True)
        random_weights = bool(context and context.meta.get(_RANDOM_WEIGHTS_KEY, False))
    classifier = load_model(
        spec,
        weights=weights,
        labels=labels,
        trust_model=trust_model,
        device=device,
        random_weights=random_weights,
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


def deprecated_option(old: str, new: str, dest: str, **attrs):
    """A hidden option ``old`` that still works for one release: it prints a deprecation line
    and gives its value to the command's ``dest`` (the parameter of option ``new``).

    Example:
        >>> @deprecated_option("--workers", "--threads", "threads", type=int)
        ... @click.option("--threads", default=1)
        ... def serve(threads): ...
    """
    hidden = "_deprecated_" + old.lstrip("-").replace("-", "_")

    def decorate(function):
        @functools.wraps(function)
        def command(*args, **kwargs):
            value = kwargs.pop(hidden)
            if value is not None:
                click.echo(f"Warning: {old} is deprecated; use {new}", err=True)
                kwargs[dest] = value
            return function(*args, **kwargs)

        return click.option(old, hidden, default=None, hidden=True, **attrs)(command)

    return decorate


def run_options(function):
    """The options of every batch command, given to it as one ``options: RunOptions``:
    ``--batch-size``, ``--device``, ``--engine``, ``--ray-address``, ``--workers``,
    ``--resume`` and ``--overwrite``."""

    @functools.wraps(function)
    def command(*args, batch_size, device, engine, ray_address, workers, resume, overwrite, **kw):
        options = run_or_exit(
            lambda: RunOptions(
                batch_size=batch_size,
                device=device,
                engine=engine,
                ray_address=ray_address,
                workers=workers,
                resume=resume,
                overwrite=overwrite,
                cli=True,
            )
        )
        return function(*args, options=options, **kw)

    options = [
        click.option(
            "--batch-size",
            default=DEFAULT_BATCH_SIZE,
            show_default=True,
            type=click.IntRange(min=1),
            help="Images per batch (per forward pass). A run gives the same results with "
            "either engine and after a resume.",
        ),
        device_option,
        click.option(
            "--engine",
            type=click.Choice(ENGINES),
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
            help="Ray actors (--engine ray; default: one per CPU).",
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue an interrupted run in --out (same settings and inputs, checked).",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Remove what camlens wrote in --out before (nothing else), then start again.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def finish_run(result: RunResult, summary_line: str) -> None:
    """Print the run's summary line and exit: 0 all inputs done, 1 some failed."""
    click.echo(summary_line)
    sys.exit(result.exit_code)


def out_option(help_text: str, *, default: str | None = None):
    """``--out``: the folder a command writes (required unless it has a default)."""
    return click.option(
        "--out",
        "out_dir",
        required=default is None,
        default=default,
        show_default=default is not None,
        type=click.Path(path_type=Path),
        help=help_text,
    )
