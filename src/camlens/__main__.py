"""``python -m camlens``: the command line."""

from camlens.cli import main

main()
