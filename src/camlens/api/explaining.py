"""``camlens.explain`` (in memory) and ``camlens.run_explain`` (many inputs into a folder)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from torch import nn

from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.io import collect_inputs, load_image
from camlens.methods import CAMMethod, check_method, make_method
from camlens.models import Classifier, check_threshold_prob, load_model
from camlens.pipeline import OutputFolder, RunOptions, RunResult, run
from camlens.report.gallery import write_gallery
from camlens.targets import Target, bind_target
from camlens.tasks.common import output_stem
from camlens.tasks.explain import ExplainTask, Style, write_image_outputs

Images = str | os.PathLike | Image.Image | torch.Tensor | Sequence[str | os.PathLike | Image.Image]


def explain(
    model: Classifier | nn.Module | str,
    images: Images,
    *,
    method: str | CAMMethod = "cam",
    target: Target = "top1",
    layer: str | None = None,
    method_options: dict[str, Any] | None = None,
    multilabel: bool | None = None,
    threshold_prob: float | None = None,
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
            callable (see ``camlens.targets.resolve_targets``); or
            ``camlens.targets.Similarity(reference)``: the cosine similarity of each image's
            embedding with a reference image's (not a class; ``targets`` are -1).
        layer: qualified name of the feature layer (default: found automatically); Layer-CAM
            also takes several, ``"layer3,layer4"``.
        method_options: keyword arguments of the method's class, e.g. ``{"max_channels": 64}``
            for Score-CAM, ``{"smooth": 8}`` for gradient methods.
        multilabel: the model's classes are independent (sigmoid outputs): ``probs`` and
            ``predictions`` use the sigmoid and ``target="positive"`` explains every class at
            or above ``threshold_prob`` (default: the model's own, ``Classifier.multilabel``).
        threshold_prob: the multi-label threshold (default: the model's, 0.5).

    Returns:
        An ``Explanation`` (``raw``, ``maps``, ``targets``, ``logits``, ``probs``, ``boxes()``,
        ``overlays()``, ``save()``).

    Raises:
        ConfigError: unknown method, layer or class, or CAM on a model without a GAP head.
        ImageLoadError: an image cannot be read.

    Example:
        >>> import camlens
        >>> result = camlens.explain("efficientnet_lite0", "cat.jpg", target="top5")
        >>> [result.labels[c] for c in result.targets[0, :3].tolist()]
        ['Egyptian cat', 'tiger cat', 'tabby']
        >>> result.raw.shape, result.maps.shape  # signed at 7 x 7; in [0, 1] at 224 x 224
        (torch.Size([1, 5, 7, 7]), torch.Size([1, 5, 224, 224]))
        >>> result.boxes(original=True)[0][0]  # the Egyptian cat, in the photo's pixels
        (0, 0, 415, 300)
    """
    classifier = model if isinstance(model, Classifier) else load_model(model)
    if multilabel is not None or threshold_prob is not None:  # the caller's model is untouched
        classifier = replace(
            classifier,
            multilabel=classifier.multilabel if multilabel is None else bool(multilabel),
            threshold_prob=check_threshold_prob(
                classifier.threshold_prob if threshold_prob is None else threshold_prob
            ),
        )
    originals = sources = None
    if isinstance(images, torch.Tensor):
        batch = images.to(device=classifier.device)
    else:
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        originals = [load_image(item) for item in items]
        sources = [
            str(item) if isinstance(item, (str, os.PathLike)) else f"image{i}"
            for i, item in enumerate(items)
        ]
        batch = classifier.preprocess(originals)
    instance = (
        method
        if isinstance(method, CAMMethod)
        else make_method(classifier, method, layer, **(method_options or {}))
    )
    bound = bind_target(
        target, multilabel=classifier.multilabel, threshold_prob=classifier.threshold_prob
    )
    return Explanation.from_result(
        instance.run(batch, bound),
        instance.name,
        tuple(batch.shape[-2:]),
        classifier.labels,
        images=originals,
        sources=sources,
        multilabel=classifier.multilabel,
        threshold_prob=classifier.threshold_prob,
    )


def run_explain(
    model: Classifier | nn.Module | str | Callable[[], Classifier],
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | OutputFolder,
    *,
    method: str = "cam",
    target: Target = "top1",
    layer: str | None = None,
    method_options: dict[str, Any] | None = None,
    style: Style | None = None,
    figures: bool = False,
    title: str = "camlens explain",
    options: RunOptions | None = None,
) -> RunResult:
    """Explain every input and write overlays, raw maps, ``results.jsonl`` and ``index.html``
    (what ``camlens explain`` does).

    Parameters:
        model: a ``Classifier``, a ``load_model`` spec or an ``nn.Module`` (or a function
            that loads it: called once the folder and the inputs are checked).
        inputs: image files and folders (folders are searched recursively, sorted).
        out_dir: the output folder (created), or an ``OutputFolder`` (the caller's files in
            it are kept with the run's). A non-empty folder is refused unless
            ``options.resume`` (continue an interrupted run with the same settings and inputs)
            or ``options.overwrite`` (remove what camlens wrote there before; nothing else).
        method, target, layer, method_options: as in :func:`explain`.
        style: colormap, opacity and box threshold of the overlays.
        figures: also write one figure per input with all its maps side by side.
        title: the gallery's title.
        options: batch size, device, engine, resume/overwrite, progress (``RunOptions``).

    Returns:
        A ``RunResult``: ``n_inputs``, ``n_ok``, ``n_error`` (inputs that could not be read),
        ``n_skipped`` (done before a resume), ``exit_code``.

    Raises:
        ConfigError: bad configuration (checked before anything is written), no images in
            ``inputs``, or an output folder the rules refuse.

    Example:
        >>> import camlens, os
        >>> result = camlens.run_explain("efficientnet_lite0", ["photos/"], "out",
        ...                              options=camlens.RunOptions(batch_size=32))
        >>> result.n_ok, result.exit_code
        (3, 0)
        >>> sorted(os.listdir("out")), sorted(os.listdir("out/overlays"))[1]
        (['.camlens', 'index.html', 'overlays', 'raw', 'results.jsonl'], '00001_cat_c285.png')
    """
    options = options or RunOptions()
    folder = job_folder(out_dir, options)
    check_method(method, method_options)
    style = (style or Style()).check()
    paths = collect_inputs(inputs)
    if not paths:
        raise ConfigError("no images found in the given inputs")
    classifier = job_model(model, options.device)
    task = ExplainTask(
        classifier,
        method,
        target,
        layer,
        dict(method_options or {}),
        style,
        figures,
        max_pixels=options.max_pixels,
    )
    result = run(task, paths, folder.root, options, folder=folder)
    write_gallery(
        folder,
        folder.log(ExplainTask.records_file).records(),
        title=title,
        subtitle=f"model {classifier.name} · method {method} · target {target}",
    )
    folder.close()
    return result


def save_explanation(
    explanation: Explanation,
    directory: str | os.PathLike,
    *,
    names: list[str] | None = None,
    overwrite: bool = False,
    colormap: str = "jet",
    alpha: float = 0.5,
    threshold: float = 0.2,
) -> list[dict[str, Any]]:
    """``Explanation.save``: the explain task's files for an in-memory result, under the folder
    rules of ``camlens explain``."""
    style = Style(colormap, alpha, threshold).check()
    names = (
        list(names)
        if names is not None
        else [explanation.source(i) for i in range(len(explanation))]
    )
    if len(names) != len(explanation):
        raise ConfigError(f"names has {len(names)} entries for {len(explanation)} images")
    named = replace(explanation, sources=names)
    folder = OutputFolder(directory)
    settings = {"method": explanation.method, "layer": explanation.layer, "saved": True}
    folder.open(ExplainTask.name, settings, resume=False, overwrite=overwrite)
    records = [
        write_image_outputs(named, i, output_stem(i, names[i]), folder, style)
        for i in range(len(named))
    ]
    folder.log(ExplainTask.records_file).append(records, 0)
    write_gallery(folder, records, title=f"camlens {explanation.method}")
    folder.close()
    return records


def job_folder(out_dir: str | os.PathLike | OutputFolder, options: RunOptions) -> OutputFolder:
    """The output folder of a job, checked against the folder rules before any work."""
    folder = out_dir if isinstance(out_dir, OutputFolder) else OutputFolder(out_dir)
    folder.spell = options.spell
    if not folder.prepared:
        folder.check(resume=options.resume, overwrite=options.overwrite)
    return folder


def job_model(
    model: Classifier | nn.Module | str | Callable[[], Classifier], device: str | None
) -> Classifier:
    """The ``Classifier`` of a job: given, loaded from a spec (on ``device``), or made by a
    loader function."""
    if isinstance(model, Classifier):
        return model
    if callable(model) and not isinstance(model, nn.Module):
        return model()
    return load_model(model, device=device)
