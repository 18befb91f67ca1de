"""The ``camlens`` command line: one group, one module per command family."""

from __future__ import annotations

import sys

import click

from camlens.version import __version__

#: The exit status of a command stopped with Ctrl-C, as shells report it (128 + SIGINT).
EXIT_INTERRUPTED = 130


class _Commands(click.Group):
    """The ``camlens`` group: Ctrl-C exits with 130 (not click's 1, the status of a run in
    which some inputs failed), after a line that says what a resume can do."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo(
                "\nInterrupted. Batch commands continue where they stopped with --resume.",
                err=True,
            )
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="camlens")
def main() -> None:
    """camlens shows where a convolutional network looks when it decides.

    \b
    Quick start:
      camlens demo --out demo_out              # built-in model on sample photos
      camlens explain photos/ --out results    # your images, top-1 class maps
      camlens concepts photos/ --out found -k 5   # concepts shared by the images
    """


def _register() -> None:
    from camlens.cli import audit, concepts, evaluate, explain, serve, train

    for command in (
        explain.explain,
        explain.demo,
        serve.serve,
        evaluate.evaluate,
        audit.audit,
        concepts.concepts,
        train.train,
        train.make_dataset,
    ):
        main.add_command(command)


_register()
