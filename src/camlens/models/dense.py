"""Detectors and segmenters seen as classifiers of fixed targets, so every map method explains them.

A map method differentiates, masks or ablates toward *one score per target*. A classifier's
scores are its logits; a segmenter's and a detector's are built here, for the targets of one
image fixed on its clean forward pass (pytorch-grad-cam's ``SemanticSegmentationTarget`` and
``FasterRCNNBoxScoreTarget`` ideas):

* :class:`RegionScores` (segmentation): for target ``k`` = (class ``c_k``, region ``R_k``)::

      s_k(x) = sum_{(i, j) in R_k} z_{c_k}(x)[i, j]           z: the class logits (N, C, H, W)

  the region is fixed (the pixels predicted as ``c_k`` on the clean image, or a user's mask),
  so a masked or perturbed copy of the image is scored over the same pixels.
* :class:`DetectionScores` (detection): for target ``k`` = (box ``b_k``, class ``c_k``) of the
  clean pass, each pass's detections ``(b_j, c_j, s_j)`` are matched to it::

      s_k(x) = s_{j*}  where j* = argmax_{j : c_j = c_k} IoU(b_j, b_k), if IoU >= 0.5, else 0

  (mode ``"score+iou"`` adds ``IoU(b_j*, b_k)``, as ``FasterRCNNBoxScoreTarget`` does;
  mode ``"drise"`` is D-RISE's similarity ``max_{j : c_j = c_k} IoU(b_j, b_k) s_j``, without
  a threshold).

Both wrap the model in an ``nn.Module`` whose output is (B, K): the methods run on the wrapper
as on a classifier with K outputs whose targets are ``arange(K)``. Every row of a batch is a
copy (masked, noisy, augmented) of the *same* image: the targets belong to one image.

Also here: which task a model's output means (:func:`output_task`, :func:`detect_task`), the
default layers of torchvision's segmenters and detectors (:func:`default_dense_layers`: a
detector's feature pyramid levels), and the number of classes of their checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camlens.errors import ConfigError

#: The tasks camlens explains, as ``--task`` names them.
TASKS = ("classification", "segmentation", "detection")

#: How ``DetectionScores`` scores a reference detection on each pass.
DETECTION_SCORES = ("score", "score+iou", "drise")

#: A detection's box must overlap the clean pass's box this much to be the same detection.
DEFAULT_IOU_THRESHOLD = 0.5


def output_task(output: Any) -> str | None:
    """The task a model's output means, or None when it is none of them.

    * ``"detection"``: a list (or tuple) of dicts with ``"boxes"``, ``"labels"`` and
      ``"scores"`` (torchvision's detectors in eval mode);
    * ``"segmentation"``: a (N, C, h, w) tensor with more than one position, or a dict with
      such an ``"out"`` entry (torchvision's segmenters);
    * ``"classification"``: a (N, classes) tensor, or a dict or tuple holding one.

    Example:
        >>> output_task(torch.zeros(2, 10)), output_task({"out": torch.zeros(1, 3, 8, 8)})
        ('classification', 'segmentation')
        >>> output_task([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0),
        ...               "scores": torch.zeros(0)}])
        'detection'
    """
    if isinstance(output, (list, tuple)) and output and all(_is_detection(o) for o in output):
        return "detection"
    if _dense_tensor(output) is not None:
        return "segmentation"
    if isinstance(output, torch.Tensor):
        return "classification" if output.ndim == 2 else None
    values = list(output.values()) if isinstance(output, Mapping) else output
    tensors = values if isinstance(values, (list, tuple)) else []
    if any(isinstance(v, torch.Tensor) and v.ndim == 2 for v in tensors):
        return "classification"
    return None


def detect_task(module: nn.Module, example: torch.Tensor) -> str:
    """Run ``module`` once on ``example`` (no gradients) and name its task (``output_task``).

    Raises:
        ConfigError: the output is none of the three, with what it was.

    Example:
        >>> detect_task(nn.Conv2d(3, 4, 1), torch.zeros(1, 3, 8, 8))
        'segmentation'
    """
    flags = {m: m.training for m in module.modules()}
    try:
        with torch.no_grad():
            output = module.eval()(example)
    finally:
        for submodule, flag in flags.items():
            submodule.training = flag
    task = output_task(output)
    if task is None:
        raise ConfigError(
            f"cannot tell what this model does from its output ({_describe(output)}): "
            "expected (N, classes) logits, (N, C, H, W) segmentation logits (or a dict with "
            "'out'), or a list of detection dicts with boxes, labels and scores; "
            "choose with --task classification|segmentation|detection"
        )
    return task


def segmentation_logits(output: Any) -> torch.Tensor:
    """The (N, C, h, w) class logits of a segmenter's output (the tensor, or ``"out"``).

    Raises:
        ConfigError: no such tensor in the output.

    Example:
        >>> segmentation_logits({"out": torch.zeros(1, 3, 8, 8), "aux": None}).shape
        torch.Size([1, 3, 8, 8])
    """
    logits = _dense_tensor(output)
    if logits is None:
        raise ConfigError(
            f"a segmentation model must return (N, C, H, W) logits or a dict with 'out', "
            f"got {_describe(output)}"
        )
    return logits


def detection_outputs(output: Any) -> list[Mapping[str, torch.Tensor]]:
    """The per-image detection dicts (``boxes`` (D, 4) x0 y0 x1 y1, ``labels`` (D,),
    ``scores`` (D,)) of a detector's output.

    Raises:
        ConfigError: the output is not a list of such dicts.
    """
    if isinstance(output, (list, tuple)) and output and all(_is_detection(o) for o in output):
        return list(output)
    raise ConfigError(
        "a detection model must return one dict per image with 'boxes', 'labels' and "
        f"'scores' (torchvision's detectors in eval mode), got {_describe(output)}"
    )


def default_dense_layers(module: nn.Module, task: str) -> list[str]:
    """The layers a segmenter's or detector's maps come from by default.

    * a detector with a feature pyramid (torchvision's ``backbone.fpn``): the output of every
      level (``backbone.fpn.layer_blocks.<i>``); their maps are resized to the finest level
      and summed (the extra pooled levels computed from the coarsest are left out);
    * otherwise the last stage of ``backbone.body`` or ``backbone`` (torchvision's
      segmenters: ``backbone.layer4`` of a ResNet, the last block of a MobileNet);
    * a model without a ``backbone``: the last layer returning feature maps before the one
      that returns the logits (found by one traced forward pass in
      ``camlens.methods.dense``; here: an empty list).

    Example:
        >>> import torchvision
        >>> model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        ...     weights=None, weights_backbone=None, num_classes=3)
        >>> default_dense_layers(model, "detection")
        ['backbone.fpn.layer_blocks.0', 'backbone.fpn.layer_blocks.1']
    """
    backbone = getattr(module, "backbone", None)
    if not isinstance(backbone, nn.Module):
        return []
    fpn = getattr(backbone, "fpn", None)
    blocks = getattr(fpn, "layer_blocks", None)
    if task == "detection" and isinstance(blocks, nn.ModuleList) and len(blocks):
        return [f"backbone.fpn.layer_blocks.{i}" for i in range(len(blocks))]
    for path in ("backbone.body", "backbone.features", "backbone"):
        try:
            container = module.get_submodule(path)
        except AttributeError:
            continue
        children = list(container.named_children())
        if children:
            return [f"{path}.{children[-1][0]}"]
    return []


class TargetScores(nn.Module):
    """A segmenter or detector seen as a classifier of K fixed targets of one image: its
    forward pass returns (B, K) scores (see the module docstring).

    Methods read these as scores, not as class logits: Score-CAM weighs a channel by the
    target's score of the masked image (no softmax over the targets).

    Attributes:
        model: the wrapped network (its layers are ``model.<name>``).
        labels: a name per target (K).
    """

    outputs_are_scores = True

    def __init__(self, model: nn.Module, labels: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.labels = list(labels)


class RegionScores(TargetScores):
    """Segmentation targets: ``s_k(x) = sum over region_k of the logits of class_k``.

    Parameters:
        model: returns (N, C, h, w) logits or a dict with ``"out"``; logits smaller than the
            regions are upsampled bilinearly to them first.
        classes: the class of each target (K).
        regions: (K, H, W) weights of the pixels of each target's region (bool or 0/1: the
            sum over the region; any other weights: a weighted sum).
        labels: a name per target (default: the class numbers).

    Example:
        >>> head = nn.Conv2d(1, 2, 1, bias=False)
        >>> _ = head.weight.data.copy_(torch.tensor([[[[1.0]]], [[[-1.0]]]]))
        >>> regions = torch.zeros(1, 2, 2, dtype=torch.bool)
        >>> regions[0, 0] = True                      # the top row
        >>> scores = RegionScores(head, [1], regions)
        >>> scores(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))  # -(1 + 2)
        tensor([[-3.]], grad_fn=<ViewBackward0>)
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[int],
        regions: torch.Tensor,
        labels: Sequence[str] | None = None,
    ) -> None:
        if regions.ndim != 3 or regions.shape[0] != len(classes):
            raise ConfigError(
                f"regions must be (K, H, W) with one region per class ({len(classes)}), "
                f"got {tuple(regions.shape)}"
            )
        super().__init__(model, labels or [str(c) for c in classes])
        self.classes = [int(c) for c in classes]
        self.register_buffer("regions", regions.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = segmentation_logits(self.model(x))
        size = self.regions.shape[-2:]
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        chosen = logits[:, self.classes]
        return torch.einsum("bkhw,khw->bk", chosen, self.regions.to(chosen.dtype)).view(
            len(x), len(self.classes)
        )


class DetectionScores(TargetScores):
    """Detection targets: the score of the detection that matches each reference box.

    Parameters:
        model: a detector returning one dict per image (``boxes``, ``labels``, ``scores``),
            called with a list of (C, H, W) images as torchvision's detectors are.
        boxes: (K, 4) the reference detections' boxes (x0, y0, x1, y1) in input pixels.
        classes: (K,) their classes.
        iou_threshold: the IoU a detection of the same class needs to match.
        mode: ``"score"`` (the matched detection's score), ``"score+iou"`` (plus the matched
            IoU, ``FasterRCNNBoxScoreTarget``) or ``"drise"`` (``IoU x score`` of the best
            same-class detection, no threshold: ``camlens.methods.DRISE``).
        labels: a name per target.

    After each forward pass, ``valid`` holds the fraction (rows, columns) of the detector's
    padded batch that the image covers (torchvision pads its resized images to a multiple of
    32 at the bottom and right): the part of a feature map that shows the image.
    """

    def __init__(
        self,
        model: nn.Module,
        boxes: torch.Tensor,
        classes: Sequence[int],
        *,
        iou_threshold: float = DEFAULT_IOU_THRESHOLD,
        mode: str = "score",
        labels: Sequence[str] | None = None,
    ) -> None:
        if mode not in DETECTION_SCORES:
            raise ConfigError(f"detection score mode {mode!r}: expected one of {DETECTION_SCORES}")
        if boxes.ndim != 2 or boxes.shape != (len(classes), 4):
            raise ConfigError(
                f"boxes must be (K, 4) with one box per class ({len(classes)}), "
                f"got {tuple(boxes.shape)}"
            )
        super().__init__(model, labels or [str(c) for c in classes])
        self.register_buffer("boxes", boxes.float(), persistent=False)
        self.register_buffer(
            "classes", torch.as_tensor(list(classes), dtype=torch.long), persistent=False
        )
        self.iou_threshold = float(iou_threshold)
        self.mode = mode
        self.valid: tuple[float, float] = (1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _PaddingProbe(self.model) as probe:
            outputs = detection_outputs(self.model(list(x)))
        self.valid = probe.valid
        return torch.stack([self.match(output) for output in outputs])

    def match(self, output: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(K,) scores of one image's detections for the reference boxes (0 without a match)."""
        from torchvision.ops import box_iou

        scores = output["scores"]
        zero = scores.sum() * 0  # keeps the graph when nothing matches
        if not len(scores):
            return zero.expand(len(self.classes)).clone()
        ious = box_iou(self.boxes.to(output["boxes"].dtype), output["boxes"])
        same = self.classes[:, None] == output["labels"].to(self.classes.device)[None]
        ious = torch.where(same, ious, torch.zeros_like(ious))
        if self.mode == "drise":
            return (ious * scores[None]).amax(dim=1)
        best, index = ious.max(dim=1)
        matched = best >= self.iou_threshold
        value = scores[index] + (best if self.mode == "score+iou" else 0)
        return torch.where(matched, value, zero)


class _PaddingProbe:
    """Reads, during a torchvision detector's forward pass, how much of its padded batch the
    (first) image covers: a forward hook on ``model.transform`` (GeneralizedRCNNTransform)."""

    def __init__(self, model: nn.Module) -> None:
        self.transform = getattr(model, "transform", None)
        self.valid = (1.0, 1.0)
        self._handle = None

    def _hook(self, module: nn.Module, inputs: object, output: object) -> None:
        image_list = output[0] if isinstance(output, tuple) else output
        sizes = getattr(image_list, "image_sizes", None)
        tensors = getattr(image_list, "tensors", None)
        if sizes and isinstance(tensors, torch.Tensor):
            height, width = sizes[0]
            self.valid = (height / tensors.shape[-2], width / tensors.shape[-1])

    def __enter__(self) -> _PaddingProbe:
        if isinstance(self.transform, nn.Module):
            self._handle = self.transform.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()


def resize_detector_input(module: nn.Module, size: tuple[int, int]) -> None:
    """Make a torchvision detector's own resizing (``module.transform``) keep images of
    ``size`` (H, W) as they are: ``min_size`` the shorter side, ``max_size`` the longer.
    Nothing happens for other modules.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        ...     weights=None, weights_backbone=None)
        >>> resize_detector_input(model, (128, 128))
        >>> model.transform.min_size, model.transform.max_size
        ((128,), 128)
    """
    transform = getattr(module, "transform", None)
    if hasattr(transform, "min_size") and hasattr(transform, "max_size"):
        transform.min_size = (int(min(size)),)
        transform.max_size = int(max(size))


def is_dense_architecture(spec: str) -> bool:
    """Whether ``"torchvision:<name>"`` names one of torchvision's detectors or segmenters.

    Example:
        >>> is_dense_architecture("torchvision:lraspp_mobilenet_v3_large")
        True
        >>> is_dense_architecture("torchvision:resnet18")
        False
    """
    return dense_architecture_task(spec) is not None


def dense_architecture_task(spec: str) -> str | None:
    """``"detection"`` or ``"segmentation"`` for torchvision's detectors and segmenters
    (``"torchvision:<name>"``), else None."""
    prefix, _, name = spec.partition(":")
    if prefix != "torchvision" or not name:
        return None
    try:
        import torchvision
    except ImportError:
        return None
    models = torchvision.models
    for task, package in (("detection", models.detection), ("segmentation", models.segmentation)):
        if name in models.list_models(module=package):
            return task
    return None


#: The number of classes of torchvision's detectors and segmenters by default.
DEFAULT_DENSE_CLASSES = {"detection": 91, "segmentation": 21}


def dense_checkpoint_classes(
    state: Mapping[str, torch.Tensor], probe: nn.Module, task: str
) -> int | None:
    """The number of classes a detector's or segmenter's state dict was trained for.

    ``probe`` is the architecture built with its default classes (91 for detectors, 21 for
    segmenters). The first tensor whose first dimension differs from the probe's, where the
    probe's is a multiple of the default count (one row, or one row per anchor or per box
    coordinate, per class), gives the count; None when every shape matches the default.

    Example:
        >>> import torchvision
        >>> build = torchvision.models.segmentation.lraspp_mobilenet_v3_large
        >>> state = build(weights=None, weights_backbone=None, num_classes=4).state_dict()
        >>> dense_checkpoint_classes(state, build(weights=None, weights_backbone=None),
        ...                          "segmentation")
        4
    """
    default = DEFAULT_DENSE_CLASSES[task]
    expected = probe.state_dict()
    for key, tensor in state.items():
        own = expected.get(key)
        if own is None or tensor.ndim == 0 or own.ndim == 0 or tensor.shape == own.shape:
            continue
        per_class, remainder = divmod(int(own.shape[0]), default)
        if remainder == 0 and per_class and tensor.shape[0] % per_class == 0:
            return int(tensor.shape[0]) // per_class
    return None


def _is_detection(value: Any) -> bool:
    return isinstance(value, Mapping) and {"boxes", "labels", "scores"} <= set(value)


def _dense_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, Mapping):
        output = output.get("out")
    if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-2:].numel() > 1:
        return output
    return None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return type(value).__name__
