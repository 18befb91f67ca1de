"""Defaults and fixed choices that several layers share, in one place (foundation: imports
nothing).

The command line reads them at import time, so they live where importing costs nothing.
"""

#: The built-in model: ImageNet EfficientNet-Lite0 (GAP + linear head; CAM is exact).
DEFAULT_MODEL = "efficientnet_lite0"

#: Images per batch of every batch command.
DEFAULT_BATCH_SIZE = 16

#: Where a job's batches run: this process, or a pool of Ray actors.
ENGINES = ("local", "ray")

#: How ``camlens audit`` decides each image's class: ``auto``, its folder, or the prediction.
LABEL_SOURCES = ("auto", "folders", "predictions")

#: The largest image (in pixels) camlens decodes unless told otherwise (``--max-pixels``):
#: 40 megapixels, below Pillow's own decompression-bomb limit (89.5 Mpx). A decoded image
#: takes 3 bytes per pixel; 40 Mpx is 120 MB.
DEFAULT_MAX_PIXELS = 40_000_000

#: The longest side of an overlay ``camlens explain`` writes (``--overlay-size``; 0: the
#: original size). Boxes stay in original-image pixels. 2000, not 2048: a 12-megapixel photo
#: (4000 x 3000) then decodes at half scale (JPEG), which halves the time and the memory.
DEFAULT_OVERLAY_SIZE = 2000

#: zlib level of the PNG files camlens writes (0-9; Pillow's default is 6). Level 1 encodes an
#: overlay about 4.5 x faster than 6 for files about 13 % larger (measured on 320 x 240
#: overlays of the sample photos; see benchmarks/results/throughput.md): encoding at level 6
#: took longer than the model's forward pass per image.
PNG_COMPRESS_LEVEL = 1

#: zlib strategy of those PNG files: run-length matches only (``zlib.Z_RLE``). On the same
#: overlays it encodes 12 % faster than the default strategy and the files are 12 % smaller,
#: 5 % smaller than level 6's (photos blended with a colour map have few long repeats for the
#: default's string search).
PNG_COMPRESS_TYPE = 3
