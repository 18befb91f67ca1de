"""``camlens.explain``: one call from images to an ``Explanation``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.io import load_image
from camlens.methods import CAMMethod, get_method
from camlens.models import Classifier, load_model
from camlens.targets import Target

Images = str | os.PathLike | Image.Image | torch.Tensor | Sequence[str | os.PathLike | Image.Image]


def explain(
    model: Classifier | nn.Module | str,
    images: Images,
    *,
    method: str | CAMMethod = "cam",
    target: Target = "top1",
    layer: str | None = None,
    method_options: dict[str, Any] | None = None,
) -> Explanation:
    """Explain why ``model`` predicts what it does for ``images``.

    Parameters:
        model: a ``Classifier``, a spec for ``load_model`` (e.g. ``"efficientnet_lite0"``) or
            a bare ``nn.Module``.
        images: a path, a PIL image, a list of them, or an already preprocessed tensor
            (N, C, H, W).
        method: a name from ``camlens.METHODS`` (``"cam"``: exact, GAP + linear heads;
            ``"gradcam"``, ``"gradcam++"``, ``"hirescam"``, ``"xgradcam"``, ``"layercam"``:
            gradients; ``"scorecam"``, ``"ablationcam"``: perturbations; ``"eigencam"``:
            class-agnostic projection; ``"random"``: a baseline), or a method instance to reuse
            across calls.
        target: ``"top1"``, ``"top5"``, a class id, a class name, a per-image list or a
            callable (see ``camlens.targets.resolve_targets``).
        layer: qualified name of the feature layer (default: found automatically); Layer-CAM
            also takes several, ``"layer3,layer4"``.
        method_options: keyword arguments of the method's class, e.g. ``{"max_channels": 64}``
            for Score-CAM, ``{"smooth": 8}`` for gradient methods.

    Returns:
        An ``Explanation`` (``raw``, ``maps``, ``targets``, ``logits``, ``probs``, ``boxes()``,
        ``overlays()``, ``save()``).

    Raises:
        ConfigError: unknown method, layer or class, or CAM on a model without a GAP head.
        ImageLoadError: an image cannot be read.

    Example:
        >>> import camlens
        >>> result = camlens.explain("efficientnet_lite0", "cat.jpg", target="top5")
        >>> result.labels[result.targets[0, 0]], result.boxes(original=True)[0][0]
        ('Egyptian cat', (35, 12, 410, 300))
    """
    classifier = model if isinstance(model, Classifier) else load_model(model)
    originals = None
    if isinstance(images, torch.Tensor):
        batch = images.to(device=classifier.device)
    else:
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        originals = [load_image(item) for item in items]
        batch = classifier.preprocess(originals)
    instance = (
        method
        if isinstance(method, CAMMethod)
        else make_method(classifier, method, layer, **(method_options or {}))
    )
    result = instance.run(batch, target)
    return Explanation(
        raw=result.raw.cpu(),
        targets=result.targets.cpu(),
        logits=result.logits.float().cpu(),
        method=instance.name,
        layer=result.layer,
        input_size=(batch.shape[-2], batch.shape[-1]),
        labels=classifier.labels,
        images=originals,
        identity_error=result.identity_error,
    )


def make_method(
    classifier: Classifier, method: str, layer: str | None = None, **options: Any
) -> CAMMethod:
    """Instantiate method ``method`` for ``classifier`` (reuse it across batches).

    ``options`` are keyword arguments of the method's class (``max_channels``, ``batch_size``,
    ``smooth``, ``seed``...); an option the method does not take is a ``ConfigError``.
    """
    cls = get_method(method)
    try:
        return cls(
            classifier.module,
            layer=layer or classifier.layer,
            output=classifier.output,
            labels=classifier.labels,
            **options,
        )
    except TypeError as error:
        raise ConfigError(
            f"method {cls.name!r} does not take the option(s) {', '.join(options)} ({error})"
        ) from error
