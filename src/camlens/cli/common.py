"""The command line's one vocabulary: shared options, error handling, exit statuses.

Every option that appears in several commands is defined here once, with one help text:
``--out``, ``--model``/``--weights``/``--labels``/``--trust-model``/``--random-weights``,
``--method``/``--max-channels``/``--smooth``/``--aug-smooth``/``--eigen-smooth``, ``--layer``, ``--device`` and the batch options
(``--batch-size``, ``--engine``, ``--ray-address``, ``--workers``, ``--resume``,
``--overwrite``). Exit status, everywhere: 0 all inputs done, 1 some inputs failed (the rest
was processed), 2 usage or configuration error, 130 interrupted (Ctrl-C).

This module and the command modules import only click and camlens' foundation at import time;
the library (torch...) is imported when a command runs, so ``camlens --help`` starts quickly.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from camlens.defaults import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    DEFAULT_OVERLAY_SIZE,
    ENGINES,
)
from camlens.errors import ConfigError

if TYPE_CHECKING:
    from camlens.models import Classifier
    from camlens.pipeline import RunResult

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2

T = TypeVar("T")


def run_or_exit(job: Callable[[], T]) -> T:
    """Run ``job``; a configuration error prints ``Error: ...`` and exits with status 2."""
    try:
        return job()
    except (ConfigError, ValueError) as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_USAGE)


def exit_status(n_done: int, n_failed: int) -> int:
    """The exit status of a batch command: 0 all inputs done, 1 some (or all) inputs failed,
    2 there was no input at all."""
    if n_done + n_failed == 0:
        return EXIT_USAGE
    return EXIT_SOME_FAILED if n_failed else EXIT_OK


def finish_run(result: RunResult, summary_line: str) -> None:
    """Print the run's summary line and exit with :func:`exit_status`."""
    click.echo(summary_line)
    sys.exit(exit_status(result.n_ok, result.n_error))


def _add(function: Callable, options: list) -> Callable:
    for option in reversed(options):
        function = option(function)
    return function


# --- where the output goes ---------------------------------------------------------------------


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


# --- which model -------------------------------------------------------------------------------

MODEL_HELP = (
    f"Model: {DEFAULT_MODEL} (built in, ImageNet), torchvision:<name> or timm:<name> (with "
    "--weights), a folder written by `camlens train`, hf:FOLDER (a Hugging Face image "
    "classifier saved with save_pretrained), or a TorchScript file."
)


@dataclass(frozen=True)
class ModelFiles:
    """``--weights``, ``--labels``, ``--trust-model``, ``--random-weights``, ``--multilabel``,
    ``--threshold-prob`` and ``--input-size`` (None: the model's own, e.g. what a trained
    folder records)."""

    weights: Path | None = None
    labels: Path | None = None
    trust_model: bool = False
    random_weights: bool = False
    multilabel: bool | None = None
    threshold_prob: float | None = None
    input_size: int | None = None

    @property
    def given(self) -> bool:
        return self.weights is not None or self.labels is not None or self.trust_model


@dataclass(frozen=True)
class ModelChoice:
    """The model a command runs: ``--model`` and its files (see :class:`ModelFiles`)."""

    spec: str = DEFAULT_MODEL
    files: ModelFiles = ModelFiles()

    def load(self, device: str | None) -> Classifier:
        """Load the model on ``device``; refuse TorchScript (no method can hook it)."""
        from camlens.models import load_model
        from camlens.models.checkpoints import TORCHSCRIPT_NOT_HOOKABLE

        classifier = load_model(
            self.spec,
            weights=self.files.weights,
            labels=self.files.labels,
            trust_model=self.files.trust_model,
            random_weights=self.files.random_weights,
            device=device,
            multilabel=self.files.multilabel,
            threshold_prob=self.files.threshold_prob,
            input_size=self.files.input_size,
        )
        if classifier.info.get("format") == "torchscript":
            raise ConfigError(TORCHSCRIPT_NOT_HOOKABLE.format(name=self.spec, path=self.spec))
        return classifier


def model_file_options(function):
    """``--weights``, ``--labels``, ``--trust-model``, ``--random-weights``, ``--multilabel``,
    ``--threshold-prob``; the command gets ``model_files: ModelFiles``."""

    @functools.wraps(function)
    def command(
        *args,
        weights,
        labels,
        trust_model,
        random_weights,
        multilabel,
        threshold_prob,
        input_size,
        **kwargs,
    ):
        files = ModelFiles(
            weights,
            labels,
            trust_model,
            random_weights,
            multilabel or None,
            threshold_prob,
            input_size,
        )
        return function(*args, model_files=files, **kwargs)

    return _add(
        command,
        [
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
                "mapping indices to names or names to indices). Default: the model's own "
                "names, else class indices.",
            ),
            click.option(
                "--trust-model",
                is_flag=True,
                help="Allow model files that run code when loaded (a module saved with "
                "torch.save(model)). Only for files from a source you trust.",
            ),
            click.option(
                "--random-weights",
                is_flag=True,
                help="Allow a torchvision:/timm: architecture without --weights, i.e. with "
                "random weights (its maps mean nothing): for tests and sanity checks.",
            ),
            click.option(
                "--multilabel",
                is_flag=True,
                help="The model's classes are independent (sigmoid outputs): predictions list "
                "every class whose sigmoid probability reaches --threshold-prob, and --target "
                "positive explains each of them. Default: what a `camlens train` folder "
                "records, else single-label (softmax).",
            ),
            click.option(
                "--threshold-prob",
                type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
                default=None,
                help="Multi-label: the sigmoid probability a class needs to be predicted "
                "(default 0.5).",
            ),
            click.option(
                "--input-size",
                type=click.IntRange(min=8),
                default=None,
                help="Side in pixels that every image is resized to for the model (default: "
                "the model's own, 224 for torchvision and timm classifiers and segmenters, "
                "the detector's min_size for torchvision detectors, whose own resizing then "
                "uses this size too).",
            ),
        ],
    )


def model_options(function):
    """``--model`` and :func:`model_file_options`; the command gets ``model: ModelChoice``."""

    @functools.wraps(function)
    def command(*args, model_spec, model_files, **kwargs):
        return function(*args, model=ModelChoice(model_spec, model_files), **kwargs)

    command = model_file_options(command)
    return click.option(
        "--model", "model_spec", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP
    )(command)


# --- which method ------------------------------------------------------------------------------

METHOD_HELP = (
    "cam: exact, for GAP + linear heads. Gradients (any CNN): gradcam, gradcam++, hirescam, "
    "xgradcam, layercam. Perturbations: scorecam, ablationcam (slow: one forward per channel; "
    "see --max-channels). eigencam: class-agnostic. drise: random masks (D-RISE, "
    "detectors; RISE, classifiers). random: a baseline."
)

MAX_CHANNELS_HELP = "scorecam/ablationcam: use only the N most active channels (faster)."
SMOOTH_HELP = "Gradient methods: average over this many noisy copies (SmoothGrad); 0 = off."
AUG_SMOOTH_HELP = (
    "Average the maps of the image flipped or not, times 0.9, 1 and 1.1 (test-time "
    "augmentation; 6 passes). Not random."
)
EIGEN_SMOOTH_HELP = (
    "Channel-weighted methods (cam, gradcam, gradcam++, xgradcam): map = first principal "
    "component of the weighted activations."
)

#: ``--layer``: the feature layer the maps come from.
layer_option = click.option(
    "--layer", default=None, help="Feature layer (qualified name); default: found automatically."
)


def method_options(function=None, *, default: str | None = "cam", several: bool = False):
    """``--method``, ``--max-channels``, ``--smooth``, ``--aug-smooth`` and
    ``--eigen-smooth``; the command gets ``method`` (the name, or comma-separated names with
    ``several``) and ``method_options`` (the options given, as keyword arguments of the
    methods)."""

    def decorate(function):
        @functools.wraps(function)
        def command(*args, max_channels, smooth, aug_smooth, eigen_smooth, **kwargs):
            options = {
                "max_channels": max_channels,
                "smooth": smooth,
                "aug_smooth": aug_smooth,
                "eigen_smooth": eigen_smooth,
            }
            chosen = {key: value for key, value in options.items() if value}
            return function(*args, method_options=chosen, **kwargs)

        help_text = METHOD_HELP
        if default is None:
            help_text += " Default: cam for classifiers, gradcam for detectors and segmenters."
        if several:
            help_text = "Comma-separated methods, or 'all'. " + METHOD_HELP
        return _add(
            command,
            [
                click.option("--method", default=default, show_default=True, help=help_text),
                click.option(
                    "--max-channels",
                    default=None,
                    type=click.IntRange(min=1),
                    help=MAX_CHANNELS_HELP,
                ),
                click.option(
                    "--smooth",
                    default=0,
                    show_default=True,
                    type=click.IntRange(min=0),
                    help=SMOOTH_HELP,
                ),
                click.option("--aug-smooth", is_flag=True, help=AUG_SMOOTH_HELP),
                click.option("--eigen-smooth", is_flag=True, help=EIGEN_SMOOTH_HELP),
            ],
        )

    return decorate(function) if function is not None else decorate


# --- how overlays look -------------------------------------------------------------------------


def style_options(function):
    """``--colormap``, ``--alpha`` and ``--overlay-size``, shared by every command that draws
    overlays."""
    return _add(
        function,
        [
            click.option(
                "--colormap",
                default="jet",
                show_default=True,
                help="Any matplotlib colormap name (jet, viridis, inferno, turbo...).",
            ),
            click.option(
                "--alpha",
                type=click.FloatRange(0.0, 1.0),
                default=0.5,
                show_default=True,
                help="Opacity of the heat map over the photo.",
            ),
            click.option(
                "--overlay-size",
                default=DEFAULT_OVERLAY_SIZE,
                show_default=True,
                type=click.IntRange(min=0),
                help="Longest side of an overlay in pixels (larger photos are drawn smaller; "
                "boxes stay in original pixels); 0: the original size.",
            ),
        ],
    )


# --- how a job runs ----------------------------------------------------------------------------

#: ``--device``: the torch device a command runs the model on.
device_option = click.option(
    "--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, cuda:1..."
)


#: ``--max-pixels``: the pixel budget of an input image.
max_pixels_option = click.option(
    "--max-pixels",
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    type=click.IntRange(min=0),
    help="Pixel budget: a larger image is refused (an error record), which bounds memory and "
    "stops decompression bombs; 0: no camlens budget (Pillow's own limit, 179 Mpx, remains).",
)


def run_options(function):
    """The options of every batch command, given to it as one ``options: RunOptions``:
    ``--batch-size``, ``--device``, ``--engine``, ``--ray-address``, ``--workers``,
    ``--resume`` and ``--overwrite`` (checked before any work: exit 2 when they are wrong)."""

    @functools.wraps(function)
    def command(*args, batch_size, device, engine, ray_address, workers, resume, overwrite,
                max_pixels, **kw):  # fmt: skip
        from camlens.pipeline import RunOptions

        options = run_or_exit(
            lambda: RunOptions(
                batch_size=batch_size,
                device=device,
                engine=engine,
                ray_address=ray_address,
                workers=workers,
                resume=resume,
                overwrite=overwrite,
                max_pixels=max_pixels or None,
                cli=True,
            )
        )
        return function(*args, options=options, **kw)

    return _add(
        command,
        [
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
                help="local: this process. ray: Ray actors (needs camlens[ray]); see "
                "--ray-address.",
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
            max_pixels_option,
        ],
    )


def deprecated_option(old: str, new: str, dest: str, **attrs: Any):
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


def job_options(out_help: str, *, method: str | None = "cam", several: bool = False):
    """The options of the commands that run a model over many inputs (explain, evaluate,
    audit), in this order: ``--out``, :func:`model_options`, :func:`method_options` and
    ``--layer``. Put :func:`run_options` last, after the command's own options."""

    def decorate(function):
        function = layer_option(function)
        function = method_options(default=method, several=several)(function)
        return out_option(out_help)(model_options(function))

    return decorate
