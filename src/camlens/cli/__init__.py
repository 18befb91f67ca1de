"""The ``camlens`` command line: one group, one module per command family."""

from __future__ import annotations

import click

import camlens


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(camlens.__version__, prog_name="camlens")
def main() -> None:
    """camlens shows where a convolutional network looks when it decides.

    \b
    Quick start:
      camlens demo --out demo_out              # built-in model on sample photos
      camlens explain photos/ --out results    # your images, top-1 class maps
    """


def _register() -> None:
    from camlens.cli import audit, evaluate, explain, serve, train

    for command in (
        explain.explain,
        explain.demo,
        serve.serve,
        evaluate.evaluate,
        audit.audit,
        train.train,
        train.make_dataset,
    ):
        main.add_command(command)


_register()
