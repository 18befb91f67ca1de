"""One command-line vocabulary: the same option means the same thing everywhere, with one
help text; ``--help`` loads no library; old spellings still work for a release."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from camlens.cli import main
from camlens.cli.evaluate import METRIC_GROUPS

COMMANDS = {name: main.commands[name] for name in main.commands}
BATCH_COMMANDS = ("explain", "demo", "evaluate", "audit")
WRITING_COMMANDS = ("explain", "demo", "evaluate", "audit", "train", "make-dataset")
METHOD_COMMANDS = ("explain", "evaluate", "audit", "serve")
MODEL_COMMANDS = ("explain", "evaluate", "audit")


def _options(command: click.Command) -> dict[str, click.Option]:
    return {
        name: param
        for param in command.params
        if isinstance(param, click.Option) and not param.hidden
        for name in param.opts
    }


def _help(command: str, option: str) -> str:
    return _options(COMMANDS[command])[option].help


@pytest.mark.parametrize(
    ("option", "commands"),
    [
        ("--batch-size", BATCH_COMMANDS),
        ("--engine", BATCH_COMMANDS),
        ("--resume", BATCH_COMMANDS),
        ("--overwrite", BATCH_COMMANDS),
        ("--workers", BATCH_COMMANDS),
        ("--device", (*BATCH_COMMANDS, "serve", "train")),
        ("--model", MODEL_COMMANDS),
        ("--weights", (*MODEL_COMMANDS, "serve")),
        ("--labels", (*MODEL_COMMANDS, "serve")),
        ("--trust-model", (*MODEL_COMMANDS, "serve")),
        ("--random-weights", (*MODEL_COMMANDS, "serve")),
        ("--layer", METHOD_COMMANDS),
        ("--max-channels", ("explain", "demo", "evaluate", "audit")),
        ("--smooth", (*METHOD_COMMANDS, "demo")),
        ("--aug-smooth", (*METHOD_COMMANDS, "demo")),
        ("--eigen-smooth", (*METHOD_COMMANDS, "demo")),
    ],
)
def test_a_shared_option_has_one_help_text(option, commands):
    texts = {_help(command, option) for command in commands}
    assert len(texts) == 1, texts


def test_every_command_that_writes_takes_out():
    for name in WRITING_COMMANDS:
        assert "--out" in _options(COMMANDS[name]), name


def test_one_batch_size_default():
    defaults = {_options(COMMANDS[name])["--batch-size"].default for name in BATCH_COMMANDS}
    assert defaults == {16}


def test_workers_means_ray_actors_and_serve_has_threads():
    assert "Ray actors" in _help("explain", "--workers")
    assert "--workers" not in _options(COMMANDS["serve"])  # hidden old spelling only
    assert "--threads" in _options(COMMANDS["serve"])
    assert "--max-channels" in _options(COMMANDS["serve"])


def test_metric_groups_in_the_help_are_the_registry_groups():
    from camlens.metrics.registry import GROUPS

    assert tuple(GROUPS) == METRIC_GROUPS


def test_help_loads_no_library_and_lists_every_command():
    code = (
        "import sys\n"
        "from camlens.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'torch', 'numpy', 'matplotlib', 'PIL', 'jinja2', 'fastapi'} & set(sys.modules)\n"
        "print('HEAVY', sorted(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in done.stdout
    for name in COMMANDS:
        assert name in done.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help_loads_no_library(name):
    code = (
        "import sys\n"
        "from camlens.cli import main\n"
        "try:\n"
        f"    main([{name!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TORCH False" in done.stdout
