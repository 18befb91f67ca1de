"""Reading inputs: images from paths, folders and PIL objects (see :mod:`camlens.io.images`).

The package's names are those of :mod:`camlens.io.images`, listed once, in its ``__all__``.
"""

from camlens.io import images
from camlens.io.images import *  # noqa: F403

__all__ = images.__all__
