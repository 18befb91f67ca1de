"""One explain request, from bytes (or a sample name) to the JSON the API returns.

Everything here runs on a worker thread (see ``limits.WorkQueue``), never on the event loop.

Heat maps travel twice in a response: ``overlay`` is the finished picture (the photo blended
with the requested colour map and opacity, Zhou's box drawn), and ``heatmap`` is the map
itself as an 8-bit gray PNG whose value ``v = min(255, floor(256 * map))`` is the row of a
256-entry colour table (``colormap_table``), the same quantisation matplotlib applies. The
page blends ``heatmap`` with the photo itself, so the opacity slider and the colour-map choice
redraw at once and give the same pixels as the server's ``overlay``.

A detector or a segmenter (``ModelStore.task``) is explained by ``camlens.dense.explain_dense``
instead: the response's ``task`` says which, ``predictions`` and ``maps`` are empty and
``objects`` lists the detections (their boxes) or class regions (their size, and their
``mask`` as a gray PNG), each with its map in the same two forms.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from camlens.dense import DEFAULT_SCORE_THRESHOLD, DenseExplanation, explain_dense
from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.io import DEFAULT_MAX_PIXELS, resized_pixels
from camlens.io.samples import SAMPLES, sample_image
from camlens.methods import make_method, options_for
from camlens.models import Classifier
from camlens.render import colorize, colormap_indices, overlay, resize_mask
from camlens.serve.models import ModelStore
from camlens.serve.uploads import decode_upload
from camlens.targets import class_index

#: Longest side of the pictures a response carries (boxes are also given in original pixels).
DISPLAY_MAX_SIDE = 640

#: The most classes one request may explain ("top10"); each costs an overlay.
MAX_TOPK = 10

#: Colour maps the page offers (the API takes any matplotlib name).
PAGE_COLORMAPS = ("jet", "turbo", "viridis", "inferno", "magma", "gray")

#: Score-CAM and Ablation-CAM perturb only this many channels per image by default (the
#: "faster Score-CAM" selection, ``max_channels``): all 1280 channels of EfficientNet-Lite0
#: take minutes per image on a CPU, far too long for a page.
PERTURBATION_CHANNELS = 64

#: D-RISE draws this many random masks per image on the page (its default, 1,000 masked
#: forward passes, takes tens of seconds per image on a CPU).
PERTURBATION_MASKS = 200

#: Zhou et al. 2016: the box around the largest region above 20 % of the map's maximum.
BOX_THRESHOLD = 0.2

_TOPK = re.compile(r"^top([0-9]+)$", re.IGNORECASE)
_CLASS_ID = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class ExplainRequest:
    """A validated request: exactly one of ``upload`` (bytes) and ``sample`` (a name)."""

    model: str
    method: str
    target: str | int
    colormap: str = "jet"
    alpha: float = 0.5
    upload: bytes | None = None
    filename: str | None = None
    sample: str | None = None
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    method_is_default: bool = False


#: The tasks ``camlens.dense.explain_dense`` explains (one map per detection or class region).
DENSE_TASKS = ("detection", "segmentation")

#: A detector's or segmenter's method when the request asks for the server's default CAM,
#: which needs a classifier's head (an explicitly chosen CAM is refused).
DENSE_DEFAULT_METHOD = "gradcam"


def parse_target(text: str | None) -> str | int:
    """``"top1"`` .. ``"top10"``, a class id (``"285"`` -> 285) or a class name, as given.

    A class id is written with the ASCII digits 0-9 only: other digits (``"²"``, Arabic-Indic
    ``"٢"``, full-width ``"２"``) make a class name, looked up like any other.

    Raises:
        ConfigError: ``topK`` with K outside 1..MAX_TOPK.

    Example:
        >>> parse_target("top5"), parse_target(" 285 "), parse_target("espresso")
        ('top5', 285, 'espresso')
        >>> parse_target("²"), parse_target("٢")
        ('²', '٢')
    """
    text = (text or "").strip() or "top1"
    if match := _TOPK.match(text):
        digits = match.group(1).lstrip("0") or "0"
        if len(digits) > 2 or not 1 <= int(digits) <= MAX_TOPK:
            raise ConfigError(f"target {text!r}: K must be between 1 and {MAX_TOPK}")
        return f"top{int(digits)}"
    return int(text) if _CLASS_ID.match(text) else text


def check_colormap(name: str) -> str:
    """``name`` when matplotlib knows it; ConfigError otherwise."""
    try:
        colorize(np.zeros((1, 1)), name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return name


def check_sample(name: str) -> str:
    if name not in SAMPLES:
        raise ConfigError(f"no sample called {name!r}; choose one of: {', '.join(SAMPLES)}")
    return name


def run_request(
    store: ModelStore,
    request: ExplainRequest,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    method_options: dict[str, Any] | None = None,
    layer: str | None = None,
) -> dict[str, Any]:
    """Decode the image, explain it with the requested model and method, build the JSON.

    ``method_options`` (the server's ``max_channels``, ``smooth``) reach the methods that take
    them (``camlens.methods.options_for``); the response lists those used."""
    classifier = store.get(request.model, public=True)
    if request.upload is not None:
        needed = max(DISPLAY_MAX_SIDE, *classifier.input_size)
        image = decode_upload(
            request.upload, request.filename, max_pixels=max_pixels, needed_side=needed
        )
    else:
        image = sample_image(check_sample(request.sample or ""))
    wanted = {k: v for k, v in (method_options or {}).items() if v}
    task = store.task(request.model)
    if task in DENSE_TASKS:
        return _run_dense(store, request, image, task, wanted, layer)
    options = options_for(request.method, wanted)
    method = make_method(classifier, request.method, layer, **options)
    batch = _model_input(classifier, image)
    target = request.target
    if isinstance(target, str) and not _TOPK.match(target):
        # Looked up here, so that the library never reads a name as an id or "topK".
        target = class_index(target, classifier.labels)
    with store.lock(request.model):
        result = method.run(batch, target)
    explanation = Explanation.from_result(
        result,
        method.name,
        tuple(batch.shape[-2:]),
        classifier.labels,
        images=[image],
        sizes=[tuple(image.info.get("original_size", image.size))],
        multilabel=classifier.multilabel,
        threshold_prob=classifier.threshold_prob,
    )
    payload = explanation_payload(
        explanation, request.model, colormap=request.colormap, alpha=request.alpha
    )
    payload["method_options"] = options
    return payload


def _model_input(classifier: Classifier, image: Image.Image) -> torch.Tensor:
    """camlens.explain's steps on the decoded image itself: explain() would check it against
    the library's default pixel budget (not the server's) and copy it once more."""
    pixels = torch.from_numpy(np.stack([resized_pixels(image, classifier.input_size)]))
    return classifier.normalize(pixels.permute(0, 3, 1, 2))


def _run_dense(
    store: ModelStore,
    request: ExplainRequest,
    image: Image.Image,
    task: str,
    wanted: dict[str, Any],
    layer: str | None,
) -> dict[str, Any]:
    """A detector's or segmenter's request: ``explain_dense`` on the image (the request's
    ``target`` does not apply), then ``dense_payload``."""
    classifier = store.get(request.model, public=True)
    method = request.method
    if method == "cam" and request.method_is_default:
        method = DENSE_DEFAULT_METHOD
    options = options_for(method, wanted)
    options.pop("aug_smooth", None)  # a flipped image moves the detections and regions
    batch = _model_input(classifier, image)
    with store.lock(request.model):
        explanation = explain_dense(
            classifier,
            batch,
            task=task,
            method=method,
            layer=layer,
            method_options=options,
            score_threshold=request.score_threshold,
            image=image,
            size=tuple(image.info.get("original_size", image.size)),
        )
    payload = dense_payload(
        explanation, request.model, colormap=request.colormap, alpha=request.alpha
    )
    payload["method_options"] = options
    return payload


def dense_payload(
    explanation: DenseExplanation,
    model: str,
    *,
    colormap: str = "jet",
    alpha: float = 0.5,
    display_max_side: int = DISPLAY_MAX_SIDE,
) -> dict[str, Any]:
    """The API's JSON for a detector's or segmenter's explanation of one image.

    Returns:
        The keys of ``explanation_payload`` (``predictions`` and ``maps`` empty,
        ``identity_error`` null), ``task`` and ``objects``: per detection or class region
        ``index``, ``class``, ``label``, ``score`` (a detection's score; a region's summed
        logits), ``overlay`` and ``heatmap`` (as a class map's: PNG data URLs at display
        size; the overlay shows the detection's box or the region's outline), and
        detection: ``box`` [x0, y0, x1, y1] in original pixels and ``display_box``;
        segmentation: ``pixels`` (at the model's input), ``fraction`` (of the image),
        ``mean_prob``, ``region`` and ``mask`` (the region at display size, a gray PNG:
        255 inside).
    """
    photo = fit_within(explanation.display_image(0), display_max_side)
    shown = dataclasses.replace(explanation, images=[photo], sizes=None)
    detection = explanation.task == "detection"
    boxes = explanation.object_boxes(0)
    display_boxes = shown.object_boxes(0)
    pictures = shown.image_overlays(0, colormap=colormap, alpha=alpha)
    height, width = explanation.input_size
    objects = []
    for k, found in enumerate(explanation.objects):
        heat = shown.heatmap(0, k, original=True)
        entry: dict[str, Any] = {
            "index": k,
            "class": int(found["class"]),
            "label": str(found["label"]),
            "score": round(float(found["score"]), 6),
        }
        if detection:
            entry["box"] = _box(boxes[k])
            entry["display_box"] = _box(display_boxes[k])
        else:
            entry["pixels"] = int(found["pixels"])
            entry["fraction"] = round(found["pixels"] / (height * width), 6)
            entry["mean_prob"] = found["mean_prob"]
            entry["region"] = found["region"]
            if explanation.regions is not None:
                entry["mask"] = png_data_url(_mask_picture(explanation.regions[k], photo.size))
        entry["overlay"] = png_data_url(pictures[k])
        entry["heatmap"] = png_data_url(Image.fromarray(colormap_indices(heat)))
        objects.append(entry)
    original_width, original_height = explanation.original_size(0)
    return {
        "model": model,
        "task": explanation.task,
        "method": explanation.method,
        "layer": explanation.layer,
        "identity_error": None,
        "size": [original_width, original_height],
        "display": {"size": list(photo.size), "image": png_data_url(photo)},
        "colormap": colormap,
        "alpha": alpha,
        "predictions": [],
        "maps": [],
        "objects": objects,
    }


def _mask_picture(region: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A region (H, W) bool as a gray picture of ``size`` (nearest neighbour, as
    ``camlens.render.outline`` resizes it): 255 inside, 0 outside."""
    return Image.fromarray(resize_mask(region, size).astype(np.uint8) * 255)


def explanation_payload(
    explanation: Explanation,
    model: str,
    *,
    colormap: str = "jet",
    alpha: float = 0.5,
    display_max_side: int = DISPLAY_MAX_SIDE,
) -> dict[str, Any]:
    """The API's JSON for image 0 of ``explanation`` (see the module docstring).

    Returns:
        ``model``, ``method``, ``layer``, ``identity_error``, ``size`` (original [w, h]),
        ``display`` (``size`` and the photo as a PNG data URL at that size), ``colormap``,
        ``alpha``, ``predictions`` (top 5, or every class at or above the threshold for a
        multi-label model: ``class``, ``label``, ``prob``) and ``maps`` (per
        explained class: ``class``, ``label``, ``score`` (logit), ``prob``, ``box``
        [x0, y0, x1, y1] in original pixels or null, ``display_box`` the same at display
        size, ``overlay`` and ``heatmap`` PNG data URLs at display size).
    """
    photo = fit_within(explanation.display_image(0), display_max_side)
    shown = dataclasses.replace(explanation, images=[photo], sizes=None)
    boxes = explanation.boxes(BOX_THRESHOLD, original=True)[0]
    display_boxes = shown.boxes(BOX_THRESHOLD, original=True)[0]
    probs = explanation.probs[0]
    maps = []
    for k, class_id in enumerate(explanation.targets[0].tolist()):
        heat = shown.heatmap(0, k, original=True)
        picture = overlay(photo, heat, colormap=colormap, alpha=alpha, box=display_boxes[k])
        maps.append(
            {
                "class": class_id,
                "label": explanation.label(class_id),
                "score": round(float(explanation.scores[0, k]), 6),
                "prob": round(float(probs[class_id]), 6),
                "box": _box(boxes[k]),
                "display_box": _box(display_boxes[k]),
                "overlay": png_data_url(picture),
                "heatmap": png_data_url(Image.fromarray(colormap_indices(heat))),
            }
        )
    width, height = explanation.original_size(0)
    return {
        "model": model,
        "method": explanation.method,
        "layer": explanation.layer,
        "identity_error": explanation.identity_error,
        "size": [width, height],
        "display": {"size": list(photo.size), "image": png_data_url(photo)},
        "colormap": colormap,
        "alpha": alpha,
        "predictions": explanation.predictions(0),
        "maps": maps,
    }


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` scaled down (never up) so that its longer side is at most ``max_side``."""
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def png_data_url(image: Image.Image) -> str:
    """``image`` as a PNG ``data:`` URL (fast compression: a few % larger, 3x quicker)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _box(box: tuple[int, int, int, int] | None) -> list[int] | None:
    return [int(v) for v in box] if box is not None else None
