"""``camlens explain`` and ``camlens demo``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from camlens.cli.common import (
    ModelChoice,
    finish_run,
    job_options,
    method_options,
    out_option,
    run_options,
    run_or_exit,
    style_options,
)

if TYPE_CHECKING:
    from camlens.pipeline import RunOptions, RunResult
    from camlens.targets import Target


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@job_options("Output folder (created): overlays/, raw/, results.jsonl, index.html.", method=None)
@click.option(
    "--target",
    default="top1",
    show_default=True,
    help="What to explain: top1, top5, topK, a class id or a class name; positive (with "
    "--multilabel): every class whose sigmoid probability reaches --threshold-prob; "
    "similar:PATH: the regions that make each image similar to the image PATH (cosine "
    "similarity of their embeddings, the classifier's pooled features).",
)
@style_options
@click.option(
    "--threshold",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Box threshold: fraction of the map's maximum (Zhou 2016).",
)
@click.option(
    "--window",
    metavar="C,W",
    default=None,
    callback=lambda ctx, param, value: _window(value),
    help="Grey-level window (centre,width) of DICOM files and 16-bit PNG/TIFF images, in the "
    "file's units (Hounsfield units for CT), e.g. 40,400; overrides a DICOM file's own VOI "
    "LUT or window. Default: the file's window, else the image's min..max; a volume's "
    "0.5th..99.5th percentile.",
)
@click.option(
    "--keep-uid",
    is_flag=True,
    help="Write each DICOM input's SOP Instance UID into results.jsonl (sop_instance_uid). "
    "Without it the record names the file only; patient and private tags never reach any "
    "output.",
)
@click.option(
    "--volume-size",
    metavar="D,H,W",
    default=None,
    callback=lambda ctx, param, value: _volume_size(value),
    help="With a 3-D model (Conv3d; e.g. --model torchvision:r3d_18 --weights W.pt): the "
    "size every volume (.nii/.nii.gz, DICOM series folder, multi-frame DICOM) is resized to, "
    "slices,rows,columns. Default: 16,112,112 for torchvision models, else 16 slices of the "
    "model's input size.",
)
@click.option(
    "--task",
    type=click.Choice(["classification", "segmentation", "detection"]),
    default=None,
    help="What the model does. Default: found from its output (logits: classification; "
    "(N, C, H, W) maps or a dict with 'out': segmentation; a list of dicts with boxes, labels "
    "and scores: detection). Segmenters get a map per predicted class over its pixels, "
    "detectors a map per detection.",
)
@click.option(
    "--score-threshold",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Detection: explain the detections scoring at least this.",
)
@click.option(
    "--iou-threshold",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Detection: the IoU with the original box that a detection of the same class needs, "
    "on each perturbed or differentiated pass, to count as the same detection.",
)
@click.option(
    "--region",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Segmentation: a mask image (white = inside), resized to each input; every class "
    "predicted inside it is explained by its logits summed over the mask. Default: each "
    "class over the pixels predicted as that class.",
)
@click.option(
    "--classes",
    default=None,
    metavar="A,B",
    help="Segmentation: the classes to explain (names or ids, comma-separated), even where "
    "none of their pixels is predicted. Default: every predicted class but the background.",
)
@run_options
def explain(
    inputs: tuple[Path, ...],
    out_dir: Path,
    model: ModelChoice,
    method: str | None,
    method_options: dict,
    target: str,
    layer: str | None,
    colormap: str,
    alpha: float,
    overlay_size: int,
    threshold: float,
    window: tuple[float, float] | None,
    keep_uid: bool,
    volume_size: tuple[int, int, int] | None,
    task: str | None,
    score_threshold: float,
    iou_threshold: float,
    region: Path | None,
    classes: str | None,
    options: RunOptions,
) -> None:
    """Explain images: an overlay per explained class, raw maps, results.jsonl, index.html.

    INPUTS are image files (DICOM .dcm included: rescaled, windowed, MONOCHROME1 inverted;
    the overlay is drawn on the windowed image) or folders (searched recursively, DICOM
    files without a suffix included). Unreadable inputs are reported
    in results.jsonl and the rest are processed. With a 3-D model, NIfTI files and DICOM
    series folders are explained as volumes: a slice montage PNG and a NIfTI map per class
    (montages/, maps/), 3-D boxes in voxels and world mm in results.jsonl. Detectors
    (e.g. --model torchvision:fasterrcnn_mobilenet_v3_large_320_fpn --weights W) get a map
    per detection with its box drawn, segmenters (torchvision:lraspp_mobilenet_v3_large...)
    a map per class over its region with the outline drawn (see --task).
    A non-empty --out is refused unless --resume
    (same settings and inputs) or --overwrite (removes only what camlens wrote there).

    Exit status: 0 all inputs done, 1 some inputs failed, 2 usage or configuration error.
    """
    from camlens.api.explaining import DenseSettings, run_explain
    from camlens.tasks.explain import Style

    dense = DenseSettings(
        score_threshold,
        iou_threshold,
        None if region is None else str(region),
        None if classes is None else tuple(c.strip() for c in classes.split(",") if c.strip()),
    )

    style = run_or_exit(lambda: Style(colormap, alpha, threshold, overlay_size).check())
    result = run_or_exit(
        lambda: run_explain(
            lambda: model.load(options.device),
            list(inputs),
            out_dir,
            method=method,
            method_options=method_options,
            target=parse_target(target),
            layer=layer,
            style=style,
            options=options,
            window=window,
            keep_uid=keep_uid,
            volume_size=volume_size,
            task=task,
            dense=dense,
        )
    )
    finish_run(result, _summary(result))


def _window(text: str | None) -> tuple[float, float] | None:
    """``--window C,W`` as (centre, width); a bad value is a usage error (exit 2)."""
    from camlens.errors import ConfigError
    from camlens.io.medical import parse_window

    try:
        return parse_window(text)
    except ConfigError as error:
        raise click.BadParameter(str(error), param_hint="'--window'") from None


def _volume_size(text: str | None) -> tuple[int, int, int] | None:
    """``--volume-size D,H,W`` as three positive integers; else a usage error (exit 2).

    Example:
        >>> _volume_size("16,112,112"), _volume_size(None)
        ((16, 112, 112), None)
    """
    if text is None:
        return None
    try:
        sides = tuple(int(part) for part in text.split(","))
    except ValueError:
        sides = ()
    if len(sides) != 3 or min(sides) < 1:
        raise click.BadParameter(
            f"{text!r} is not three whole numbers >= 1 separated by commas (slices,rows,"
            "columns), e.g. --volume-size 16,112,112",
            param_hint="'--volume-size'",
        )
    return sides


@click.command()
@out_option("Output folder (created).", default="demo_out")
@method_options
@style_options
@run_options
def demo(
    out_dir: Path,
    method: str,
    method_options: dict,
    colormap: str,
    alpha: float,
    overlay_size: int,
    options: RunOptions,
) -> None:
    """The built-in EfficientNet-Lite0 on bundled photos: top-5 class maps per image.

    Writes one figure per photo with its five most likely classes side by side (like
    Figure 3 of the CAM paper), the overlays, raw maps, results.jsonl and index.html, and the
    photos themselves (samples/). The folder rules are those of explain: a non-empty --out
    needs --overwrite (which removes only what camlens wrote there) or --resume.
    """
    from camlens.api.explaining import run_explain
    from camlens.io.samples import SAMPLES, write_samples
    from camlens.pipeline import OutputFolder
    from camlens.tasks.explain import Style

    style = run_or_exit(lambda: Style(colormap, alpha, 0.2, overlay_size).check())

    def job() -> RunResult:
        folder = OutputFolder(out_dir, spell=options.spell)
        folder.check(resume=options.resume, overwrite=options.overwrite)
        classifier = ModelChoice().load(options.device)
        folder.prepare(resume=options.resume, overwrite=options.overwrite)
        samples = write_samples(lambda name: folder.path(f"samples/{name}"))
        return run_explain(
            classifier,
            samples,
            folder,
            method=method,
            method_options=method_options,
            target="top5",
            style=style,
            figures=True,
            title="camlens demo: where EfficientNet-Lite0 looks",
            options=options,
        )

    result = run_or_exit(job)
    click.echo(f"samples: {', '.join(SAMPLES)}")
    finish_run(result, _summary(result))


def _summary(result: RunResult) -> str:
    return (
        f"{result.n_inputs} inputs: {result.n_ok} ok, {result.n_error} failed -> "
        f"{result.out_dir / 'index.html'}"
    )


def parse_target(text: str) -> Target:
    """``--target``: a class id when it is a number (ASCII digits only), ``similar:PATH`` a
    ``camlens.targets.Similarity`` (PATH checked now: a ``ConfigError`` naming it if it cannot
    be read), else a name or topK.

    Example:
        >>> parse_target("285"), parse_target("Egyptian cat"), parse_target("²")
        (285, 'Egyptian cat', '²')
    """
    stripped = text.strip()
    if stripped.lower().startswith("similar:"):
        from camlens.targets import Similarity

        return Similarity.from_text(stripped)
    return int(stripped) if stripped.isascii() and stripped.isdigit() else text
