"""``camlens serve``: the explorer page and JSON API on a local web server."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import sys
from pathlib import Path

import click

from camlens.cli.common import (
    AUG_SMOOTH_HELP,
    EIGEN_SMOOTH_HELP,
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
    type=click.Path(path_type=Path),
    default=None,
    help="Folder whose model folders (written by `camlens train`) are offered by name; its "
    "other entries are skipped, each with a line saying why.",
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
@click.option("--aug-smooth", is_flag=True, help=AUG_SMOOTH_HELP)
@click.option("--eigen-smooth", is_flag=True, help=EIGEN_SMOOTH_HELP)
@click.option(
    "--body-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a client has to send a whole request (upload); later: 408. A request waits "
    "for a model thread only once it has arrived, so slow clients lock nobody out.",
)
@click.option(
    "--allow-origin",
    "allow_origins",
    multiple=True,
    metavar="URL",
    help="Another web page (its origin, e.g. http://localhost:3000) that may call the API "
    "(repeatable; * for any page). By default only the server's own page may POST to it.",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="NAME",
    help="Another name the server answers to (repeatable), e.g. mybox.local when serving on "
    "the network. Default: localhost, 127.0.0.1, [::1] and --host; other Host headers get "
    "400 (DNS rebinding protection).",
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
    aug_smooth: bool,
    eigen_smooth: bool,
    body_timeout: float,
    allow_origins: tuple[str, ...],
    allow_hosts: tuple[str, ...],
    device: str,
    max_pixels: int,
) -> None:
    """Explore class activation maps in the browser: upload an image, pick a class.

    Serves the page at http://HOST:PORT/, the JSON API under /api (POST /api/explain) and its
    docs at /docs. Everything works offline. The models given with --model are loaded before
    the server starts; --weights, --labels and --trust-model apply to the one --model given.
    Only requests addressed to this server (see --allow-host) are answered, and POSTs only
    from its own page (see --allow-origin).
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
        "aug_smooth": aug_smooth,
        "eigen_smooth": eigen_smooth,
        "layer": layer,
        "method": method,
        "max_pixels": max_pixels or None,
        "body_timeout": body_timeout,
        "allowed_hosts": [host, *allow_hosts],
        "allowed_origins": list(allow_origins),
    }

    def build():
        _check_address(host, port)
        for option, path in (("--weights", model_files.weights), ("--labels", model_files.labels)):
            if path is not None:
                _check_regular_file(option, path)
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
    for name, reason in store.skipped:
        click.echo(f"--models-dir: skipping {name}: {reason}", err=True)
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


def _check_address(host: str, port: int) -> None:
    """ConfigError (exit 2, one line) when the server could not listen on ``host:port``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}") from None


def _check_regular_file(option: str, path: Path) -> None:
    """ConfigError unless ``path`` is a regular file (a FIFO or a device would never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ConfigError(f"{option} {str(path)!r}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{option} {str(path)!r} is not a regular file")
