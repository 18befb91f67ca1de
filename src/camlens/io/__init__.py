"""Reading inputs: images from paths, folders and PIL objects (see :mod:`camlens.io.images`)."""

from camlens.io.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    collect_inputs,
    load_image,
    to_rgb,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "collect_inputs",
    "load_image",
    "to_rgb",
]
