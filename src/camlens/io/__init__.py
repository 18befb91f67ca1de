"""Reading inputs: images from paths, folders and PIL objects (see :mod:`camlens.io.images`),
DICOM files and series (:mod:`camlens.io.medical`).

The package's names are those of :mod:`camlens.io.images` and :mod:`camlens.io.medical`,
listed once each, in their ``__all__``.
"""

from camlens.io import images, medical
from camlens.io.images import *  # noqa: F403
from camlens.io.medical import *  # noqa: F403

__all__ = images.__all__ + medical.__all__
