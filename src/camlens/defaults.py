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
