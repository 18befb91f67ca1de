"""Data sets: reading ImageFolder layouts, and generating synthetic shapes with ground truth."""

from camlens.data.imagefolder import (
    ImageFolder,
    LoadedImages,
    load_images,
    scan_image_folder,
    stratified_split,
)
from camlens.data.shapes import SHAPES, SHORTCUTS, ShapesConfig, make_shapes_dataset

__all__ = [
    "SHAPES",
    "SHORTCUTS",
    "ImageFolder",
    "LoadedImages",
    "ShapesConfig",
    "load_images",
    "make_shapes_dataset",
    "scan_image_folder",
    "stratified_split",
]
