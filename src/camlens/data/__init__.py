"""Generated data sets with ground truth (``camlens make-dataset``).

Reading ImageFolder layouts lives in ``camlens.io.imagefolder``.
"""

from camlens.data.shapes import SHAPES, SHORTCUTS, ShapesConfig, make_shapes_dataset

__all__ = ["SHAPES", "SHORTCUTS", "ShapesConfig", "make_shapes_dataset"]
