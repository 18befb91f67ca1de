"""``camlens.explain`` (in memory) and ``camlens.run_explain`` (many inputs into a folder)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from camlens.dense import DEFAULT_SCORE_THRESHOLD, DenseExplanation
from camlens.dense import explain_dense as run_dense
from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.io import collect_inputs, load_image, parse_window
from camlens.io.volumes import NIFTI_SUFFIXES, collect_volumes, is_volume_path
from camlens.layers import is_volume_model
from camlens.methods import CAMMethod, check_method, get_method, make_method, volume_methods
from camlens.models import Classifier, check_threshold_prob, load_model
from camlens.models.dense import DEFAULT_IOU_THRESHOLD, TASKS, detect_task
from camlens.pipeline import OutputFolder, RunOptions, RunResult, run
from camlens.report.gallery import write_gallery
from camlens.targets import Target, bind_target
from camlens.tasks.common import output_stem
from camlens.tasks.dense import DenseExplainTask, read_region
from camlens.tasks.explain import ExplainTask, Style, write_image_outputs
from camlens.tasks.volumes import VolumeExplainTask

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
    window: str | tuple[float, float] | None = None,
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
        window: ``(center, width)`` or ``"C,W"``: the grey-level window of 16-bit images and
            DICOM files, in the file's units (Hounsfield units for CT); default: a DICOM
            file's own VOI LUT or window, else the image's min..max.

    Returns:
        An ``Explanation`` (``raw``, ``maps``, ``targets``, ``logits``, ``probs``, ``boxes()``,
        ``overlays()``, ``save()``).

    Raises:
        ConfigError: unknown method, layer or class, CAM on a model without a GAP head, or
            a window that is not two numbers with a width of at least 1.
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
    dense = classifier.info.get("task")
    if dense in ("detection", "segmentation"):
        raise ConfigError(
            f"{classifier.name} is a {dense} model: explain it per "
            f"{'detection' if dense == 'detection' else 'class region'} with "
            "camlens.explain_dense(model, image) (command line: camlens explain, which does so)"
        )
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
        bounds = parse_window(window)
        originals = [load_image(item, window=bounds) for item in items]
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
        tuple(batch.shape[2:]),
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
    method: str | None = None,
    target: Target = "top1",
    layer: str | None = None,
    method_options: dict[str, Any] | None = None,
    style: Style | None = None,
    figures: bool = False,
    title: str = "camlens explain",
    options: RunOptions | None = None,
    window: str | tuple[float, float] | None = None,
    keep_uid: bool = False,
    volume_size: tuple[int, int, int] | None = None,
    task: str | None = None,
    dense: DenseSettings | None = None,
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
        method, target, layer, method_options: as in :func:`explain`; ``method`` None:
            ``"cam"`` for a classifier, ``"gradcam"`` for a detector or segmenter.
        style: colormap, opacity and box threshold of the overlays.
        figures: also write one figure per input with all its maps side by side.
        title: the gallery's title.
        options: batch size, device, engine, resume/overwrite, progress (``RunOptions``).
        window: ``(center, width)`` or ``"C,W"``, as in :func:`explain` (``--window``).
        keep_uid: a DICOM input's record also holds its ``"sop_instance_uid"`` (``--keep-uid``);
            by default the record names the file only. Patient, study and private tags never
            reach any output.
        volume_size: with a 3-D model (one with ``nn.Conv3d`` layers), NIfTI files, DICOM
            series folders and multi-frame DICOM files are explained as volumes
            (:func:`run_explain_volumes`), resized to this (D, H, W) (``--volume-size``).
        task: ``"classification"``, ``"segmentation"`` or ``"detection"`` (``--task``);
            None: from the model (``camlens.models.dense.detect_task``). A segmenter or
            detector is explained per class region or per detection
            (``camlens.tasks.dense``; ``target`` does not apply; ``method`` "cam" is refused
            there, None means "gradcam").
        dense: a detector's or segmenter's options (``DenseSettings``: score and IoU
            thresholds, a region mask, the classes).

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
    if task is not None and task not in TASKS:
        raise ConfigError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if method is not None:
        check_method(method, method_options)
    style = (style or Style()).check()
    bounds = parse_window(window)
    as_volumes = functools.partial(
        run_explain_volumes,
        inputs=inputs,
        out_dir=folder,
        method=method or "cam",
        target=target,
        layer=layer,
        method_options=method_options,
        style=style,
        title=title,
        options=options,
        window=bounds,
        volume_size=volume_size,
    )
    model, volumes = _volume_model(model, inputs, options.device)
    if volumes:
        return as_volumes(model)
    paths = collect_inputs(inputs)
    if not paths:
        raise ConfigError("no images found in the given inputs")
    classifier = job_model(model, options.device)
    if is_volume_model(classifier.module):  # e.g. multi-frame DICOM files for a 3-D model
        return as_volumes(classifier)
    task = task or model_task(classifier)
    if task != "classification":
        dense_task = DenseExplainTask(
            classifier,
            task,
            method or "gradcam",
            layer,
            dict(method_options or {}),
            style,
            **asdict(dense or DenseSettings()),
            max_pixels=options.max_pixels,
        )
        subtitle = f"model {classifier.name} · {task} · method {dense_task.method}"
        return _run_with_gallery(dense_task, paths, folder, options, title=title, subtitle=subtitle)
    method = method or "cam"
    task = ExplainTask(
        classifier,
        method,
        target,
        layer,
        dict(method_options or {}),
        style,
        figures,
        max_pixels=options.max_pixels,
        window=bounds,
        keep_uid=keep_uid,
    )
    subtitle = f"model {classifier.name} · method {method} · target {target}"
    return _run_with_gallery(task, paths, folder, options, title=title, subtitle=subtitle)


def run_explain_volumes(
    model: Classifier | nn.Module | str | Callable[[], Classifier],
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | OutputFolder,
    *,
    method: str = "cam",
    target: Target = "top1",
    layer: str | None = None,
    method_options: dict[str, Any] | None = None,
    style: Style | None = None,
    title: str = "camlens explain",
    options: RunOptions | None = None,
    window: str | tuple[float, float] | None = None,
    volume_size: tuple[int, int, int] | None = None,
    montage_step: int | None = None,
) -> RunResult:
    """Explain 3-D volumes with a Conv3d classifier (what ``camlens explain`` does with a 3-D
    model): per volume and explained class a slice montage PNG and the map as NIfTI aligned
    with the input, raw maps, ``results.jsonl`` (``kind: "volume"``, 3-D boxes in voxels and
    world millimetres) and ``index.html``. See ``camlens.tasks.volumes``.

    Parameters:
        model: a ``Classifier`` of a network with ``nn.Conv3d`` layers (or a spec, a module,
            or a function that loads it).
        inputs: NIfTI files (``.nii``, ``.nii.gz``), DICOM series folders, multi-frame DICOM
            files, and folders holding them (searched recursively, sorted).
        out_dir, method, target, layer, method_options, style, title, options: as in
            :func:`run_explain`; the method must explain volumes (cam, gradcam, gradcam++,
            hirescam, xgradcam, layercam, gradcamelementwise, random).
        window: ``(center, width)`` or ``"C,W"``: the grey levels shown and fed to the model;
            default each volume's 0.5th .. 99.5th percentile.
        volume_size: the model's input (D, H, W); default
            ``camlens.tasks.volumes.default_volume_size``.
        montage_step: every how many slices the montage shows (default: at most 16 tiles).

    Returns:
        A ``RunResult``.

    Raises:
        ConfigError: a method that cannot explain volumes, a model without ``nn.Conv3d``,
            no volumes in ``inputs``, or an output folder the rules refuse.

    Example:
        >>> import nibabel
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 6)), np.eye(4)), "ct.nii.gz")
        >>> result = run_explain_volumes(net, ["ct.nii.gz"], "out", volume_size=(6, 8, 8),
        ...                              options=camlens.RunOptions(progress=False))
        >>> result.n_ok, sorted(os.listdir("out/maps")), sorted(os.listdir("out/montages"))[0][:8]
        (1, ['00000_ct.nii_c0.nii.gz'], '00000_ct')
    """
    options = options or RunOptions()
    folder = job_folder(out_dir, options)
    if not check_method(method, method_options).volumes:
        raise ConfigError(
            f"{get_method(method).name} cannot explain 3-D volumes; methods that explain "
            f"volumes: {', '.join(volume_methods())}"
        )
    style = (style or Style()).check()
    paths = collect_volumes([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)
    if not paths:
        raise ConfigError("no volumes (NIfTI files, DICOM series) found in the given inputs")
    classifier = job_model(model, options.device)
    task = VolumeExplainTask(
        classifier,
        method,
        target,
        layer,
        dict(method_options or {}),
        style,
        size=None if volume_size is None else tuple(int(v) for v in volume_size),
        window=parse_window(window),
        montage_step=montage_step,
    )
    subtitle = f"model {classifier.name} · method {method} · target {target} · volumes"
    return _run_with_gallery(task, paths, folder, options, title=title, subtitle=subtitle)


@dataclass(frozen=True)
class DenseSettings:
    """What a detector's or segmenter's explanation needs beyond the method
    (``camlens.tasks.dense.DenseExplainTask``).

    Attributes:
        score_threshold: explain the detections scoring at least this (``--score-threshold``).
        iou_threshold: the IoU that matches a detection to its reference on each pass.
        region: a mask image: each class predicted inside it is explained over it
            (``--region``); None: each class over its predicted pixels.
        classes: the classes to explain (``--classes``); None: every predicted class but the
            background.
    """

    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    region: str | None = None
    classes: tuple[str, ...] | None = None


def model_task(classifier: Classifier) -> str:
    """The task of a loaded model: what it records (``info["task"]``), else what its output
    on a blank input means (``camlens.models.dense.detect_task``); a model that fails on that
    probe (another number of channels...) or whose output means nothing is taken for a
    classifier, whose own checks then explain what is wrong."""
    known = classifier.info.get("task")
    if known:
        return str(known)
    height, width = classifier.input_size
    example = torch.zeros((1, 3, height, width), device=classifier.device, dtype=classifier.dtype)
    try:
        return detect_task(classifier.module, example)
    except Exception:
        # own errors are reported by the classifier path, with its messages)
        return "classification"


def _run_with_gallery(
    task: ExplainTask | VolumeExplainTask | DenseExplainTask,
    paths: Sequence[Path],
    folder: OutputFolder,
    options: RunOptions,
    *,
    title: str,
    subtitle: str,
) -> RunResult:
    """Run an explain task into ``folder``, then write its gallery (``index.html``) from the
    records, and close the folder."""
    result = run(task, paths, folder.root, options, folder=folder)
    write_gallery(folder, folder.log(task.records_file).records(), title=title, subtitle=subtitle)
    folder.close()
    return result


def _volume_model(
    model: Classifier | nn.Module | str | Callable[[], Classifier],
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    device: str | None,
) -> tuple[Classifier | nn.Module | str | Callable[[], Classifier], bool]:
    """``(model, True)`` when ``inputs`` name volumes (NIfTI files, DICOM series folders) and
    the model, loaded here, is a 3-D one; else the model (loaded or not) and False.

    Raises:
        ConfigError: a NIfTI file for a 2-D model (a folder of DICOM files may hold 2-D
            images: it is read as images then).
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not any(is_volume_path(item) for item in items):
        return model, False
    classifier = job_model(model, device)
    if is_volume_model(classifier.module):
        return classifier, True
    nifti = next((item for item in items if os.fspath(item).lower().endswith(NIFTI_SUFFIXES)), None)
    if nifti is not None:
        raise ConfigError(
            f"{os.fspath(nifti)!r} is a NIfTI volume, but model {classifier.name!r} is a 2-D "
            "image classifier (no nn.Conv3d layer); explain volumes with a 3-D model, e.g. "
            "--model torchvision:r3d_18 --weights W.pt"
        )
    return classifier, False


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


def explain_dense(
    model: Classifier | nn.Module | str,
    image: str | os.PathLike | Image.Image | torch.Tensor,
    *,
    task: str | None = None,
    method: str = "gradcam",
    layer: str | Sequence[str] | None = None,
    method_options: dict[str, Any] | None = None,
    settings: DenseSettings | None = None,
) -> DenseExplanation:
    """Explain one image of a detector (a map per detection) or a segmenter (a map per class
    over its region): ``camlens.dense.explain_dense`` on a path, a PIL image or a tensor.

    Parameters:
        model: a ``Classifier``, a ``load_model`` spec or an ``nn.Module``.
        image: a path or PIL image (preprocessed as the model wants), or a preprocessed
            tensor (C, H, W) or (1, C, H, W).
        task: ``"detection"`` or ``"segmentation"``; None: found from the model.
        method, layer, method_options: as in ``camlens.dense.explain_dense``.
        settings: thresholds, region mask file and classes (``DenseSettings``).

    Returns:
        A ``camlens.dense.DenseExplanation``: ``objects`` (the detections or class regions),
        ``maps`` (1, K, H, W), ``image_overlays(0)``.

    Example:
        >>> from torch import nn
        >>> segmenter = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                           nn.Conv2d(8, 2, 1))  # (N, 2, H, W) logits
        >>> model = camlens.load_model(segmenter, labels=["background", "cat"], input_size=64)
        >>> result = camlens.explain_dense(model, "cat.jpg",
        ...                                settings=camlens.DenseSettings(classes=("cat",)))
        >>> result.task, result.layer, [o["label"] for o in result.objects], result.maps.shape
        ('segmentation', '1', ['cat'], torch.Size([1, 1, 64, 64]))

        A detector: ``camlens.load_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
        weights="detector.safetensors")``; ``result.objects`` then lists each detection's
        ``box``, ``label`` and ``score``.
    """
    classifier = model if isinstance(model, Classifier) else load_model(model)
    settings = settings or DenseSettings()
    picture, source, size = None, None, None
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image[None]
    else:
        picture = load_image(image)
        source = str(image) if not isinstance(image, Image.Image) else None
        size = picture.size
        x = classifier.preprocess(picture)
    region = None if settings.region is None else read_region(settings.region)
    return run_dense(
        classifier,
        x.to(device=classifier.device, dtype=classifier.dtype),
        task=task,
        method=method,
        layer=layer,
        method_options=method_options,
        score_threshold=settings.score_threshold,
        iou_threshold=settings.iou_threshold,
        region=region,
        classes=settings.classes,
        image=picture,
        source=source,
        size=size,
    )
