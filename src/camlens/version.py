"""The installed camlens version (foundation layer: imports nothing from camlens)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("camlens")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
