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
