"""Grad-CAM with segmentation and detection targets against pytorch-grad-cam's own targets
(``SemanticSegmentationTarget``, ``FasterRCNNBoxScoreTarget``) on the same models and layers."""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam.utils.model_targets import (
    FasterRCNNBoxScoreTarget,
    SemanticSegmentationTarget,
)
from torch import nn

import camlens
from camlens.dense import explain_dense
from camlens.io.samples import sample_image


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


class _Out(nn.Module):
    """pytorch-grad-cam's segmentation tutorial wrapper: the ``"out"`` logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def test_segmentation_gradcam_matches_pytorch_grad_cam():
    torch.manual_seed(0)
    model = camlens.load_model(
        "torchvision:lraspp_mobilenet_v3_large", random_weights=True, num_classes=3
    )
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        predicted = model.module(x)["out"].argmax(1)[0]
    quadrant = np.zeros((96, 96), bool)
    quadrant[:48, :48] = True
    cases = [(c, None, (predicted == c).numpy()) for c in torch.unique(predicted).tolist()]
    cases += [(c, quadrant, quadrant) for c in range(3)]  # a user's region, every class
    for c, region, mask in cases:
        ours = explain_dense(model, x, task="segmentation", classes=[c], region=region)
        target = SemanticSegmentationTarget(c, mask.astype(np.float32))
        with ReferenceGradCAM(_Out(model.module), [model.module.backbone["16"]]) as reference:
            theirs = reference(x, targets=[target])[0]
        assert _correlation(ours.maps[0, 0].numpy(), theirs) >= 0.98


def test_detection_gradcam_matches_pytorch_grad_cam():
    """A detector with random weights scores every box alike (its box head's random ReLUs
    are mostly dead): its heads get weights that tell boxes apart, and it sees a photo."""
    torch.manual_seed(1)
    model = camlens.load_model(
        "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", random_weights=True, num_classes=3
    )
    heads = model.module.roi_heads
    heads.detections_per_img = 5
    with torch.no_grad():
        nn.init.normal_(heads.box_predictor.cls_score.weight, std=0.5)
        nn.init.normal_(heads.box_predictor.bbox_pred.weight, std=0.05)
        for layer in (heads.box_head.fc6, heads.box_head.fc7):
            nn.init.normal_(layer.weight, std=0.05)
            nn.init.constant_(layer.bias, 0.1)
    photo = sample_image("astronaut").resize((320, 320))  # a multiple of 32: no padding
    x = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    layer = "backbone.fpn.layer_blocks.0"
    ours = explain_dense(model, x, layer=layer, score_threshold=0.0, detection_score="score+iou")
    assert len(ours.objects) == 5
    for k, found in enumerate(ours.objects):
        target = FasterRCNNBoxScoreTarget([found["class"]], np.array([found["box"]]))
        with ReferenceGradCAM(model.module, [model.module.get_submodule(layer)]) as reference:
            theirs = reference(x, targets=[target])[0]
        assert _correlation(ours.maps[0, k].numpy(), theirs) >= 0.98
