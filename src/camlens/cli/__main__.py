"""``python -m camlens.cli``: the command line."""

from camlens.cli import main

main()
