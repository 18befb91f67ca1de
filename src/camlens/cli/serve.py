"""``camlens serve``: the explorer page and JSON API on a local web server."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import click

from camlens.cli.common import EXIT_USAGE, run_or_exit
from camlens.models import DEFAULT_MODEL


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
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Threads that run models.",
)
@click.option(
    "--perturbation-channels",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help="Score-CAM and Ablation-CAM perturb only this many channels (highest mean "
    "activation); 0: all channels (minutes per image on a CPU).",
)
def serve(
    host: str,
    port: int,
    models: tuple[str, ...],
    models_dir: Path | None,
    max_upload_mb: float,
    max_queue: int,
    workers: int,
    perturbation_channels: int,
) -> None:
    """Explore class activation maps in the browser: upload an image, pick a class.

    Serves the page at http://HOST:PORT/, the JSON API under /api (POST /api/explain) and its
    docs at /docs. Everything works offline. The models given with --model are loaded before
    the server starts.
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
        "workers": workers,
        "perturbation_channels": perturbation_channels or None,
    }
    app = run_or_exit(lambda: _build(create_app, list(models), settings))
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
    for name in models or [store.default]:
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
