"""Generated data sets with ground truth (``camlens make-dataset``).

``catalog`` lists what can be drawn (light: the command line reads it); ``shapes`` draws it;
``xray`` draws chest-radiograph-like images with a finding and per-hospital markers.
Reading ImageFolder layouts lives in ``camlens.io.imagefolder``.
"""

from camlens.lazy import lazy_exports

__all__ = [
    "SHAPES",
    "SHORTCUTS",
    "ShapesConfig",
    "XrayConfig",
    "make_shapes_dataset",
    "make_xray_dataset",
]

__getattr__, __dir__ = lazy_exports(
    globals(),
    {
        "SHAPES": "camlens.data.catalog",
        "SHORTCUTS": "camlens.data.catalog",
        "ShapesConfig": "camlens.data.shapes",
        "make_shapes_dataset": "camlens.data.shapes",
        "XrayConfig": "camlens.data.xray",
        "make_xray_dataset": "camlens.data.xray",
    },
)
