"""``camlens serve``: the explorer page and JSON API on a local web server."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import click

from camlens.cli.common import (
    EXIT_USAGE,
    MAX_CHANNELS_HELP,
    METHOD_HELP,
    SMOOTH_HELP,
    ModelChoice,
    ModelFiles,
    deprecated_option,
    device_option,
    layer_option,
    max_pixels_option,
    model_file_options,
    run_or_exit,
)
from camlens.defaults import DEFAULT_MODEL
from camlens.errors import ConfigError


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The default answers this computer only; 0.0.0.0 opens the "
    "server to your network.",
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0: any free port, printed at start).",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    help=f"Model to offer (repeatable; the first is the default). Default: {DEFAULT_MODEL}.",
)
@click.option(
    "--models-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder whose entries (trained model folders, checkpoints) are offered by name.",
)
@click.option(
    "--max-upload-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest accepted upload; larger requests get 413.",
)
@click.option(
    "--max-queue",
    default=8,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests that may wait for a worker; more get 503 with Retry-After.",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Threads that run models (HTTP requests beyond them wait in the queue).",
)
@deprecated_option("--workers", "--threads", "threads", type=click.IntRange(min=1))
@model_file_options
@click.option(
    "--method",
    default="cam",
    show_default=True,
    help="The method of requests that name none. " + METHOD_HELP,
)
@layer_option
@click.option(
    "--max-channels",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help=MAX_CHANNELS_HELP + " 0: all (minutes per image on a CPU).",
)
@deprecated_option(
    "--perturbation-channels", "--max-channels", "max_channels", type=click.IntRange(min=0)
)
@click.option(
    "--smooth",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help=SMOOTH_HELP,
)
@device_option
@max_pixels_option
def serve(
    host: str,
    port: int,
    models: tuple[str, ...],
    models_dir: Path | None,
    max_upload_mb: float,
    max_queue: int,
    threads: int,
    model_files: ModelFiles,
    method: str,
    layer: str | None,
    max_channels: int,
    smooth: int,
    device: str,
    max_pixels: int,
) -> None:
    """Explore class activation maps in the browser: upload an image, pick a class.

    Serves the page at http://HOST:PORT/, the JSON API under /api (POST /api/explain) and its
    docs at /docs. Everything works offline. The models given with --model are loaded before
    the server starts; --weights, --labels and --trust-model apply to the one --model given.
    """
    try:
        import uvicorn

        from camlens.serve import create_app
    except ImportError as error:
        click.echo(
            f"Error: camlens serve needs the 'web' extra ({error.name} is missing): "
            "pip install 'camlens[web]'",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    settings = {
        "models_dir": models_dir,
        "max_upload_mb": max_upload_mb,
        "max_queue": max_queue,
        "threads": threads,
        "max_channels": max_channels or None,
        "smooth": smooth,
        "layer": layer,
        "method": method,
        "max_pixels": max_pixels or None,
    }

    def build():
        if model_files.given and len(models) != 1:
            raise ConfigError(
                "--weights, --labels and --trust-model apply to one model: give exactly one "
                "--model (offer trained folders with --models-dir)"
            )
        offered = [
            ModelChoice(spec, model_files).load(device) for spec in models or [DEFAULT_MODEL]
        ]
        return _build(create_app, offered, settings)

    app = run_or_exit(build)
    if not _is_loopback(host):
        click.echo(
            f"Warning: listening on {host}: anyone who can reach this address can use the "
            "server and upload images to it.",
            err=True,
        )
    uvicorn.run(app, host=host, port=port, log_level="info")


def _build(create_app, models: list[str], settings: dict):
    """The app, with the models named on the command line loaded (errors: exit 2)."""
    app = create_app(models or None, **settings)
    store = app.state.store
    for name in store.names if models else [store.default]:
        click.echo(f"loading model {name}...")
        store.get(name)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
