"""``camlens train`` and ``camlens make-dataset``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from camlens.cli.common import device_option, out_option, run_or_exit
from camlens.data.catalog import DEFAULT_CLASSES, POSITIONS, SHAPES, SHORTCUTS


@click.command()
@click.argument("data", type=click.Path(path_type=Path))
@out_option("Model folder to write (model.safetensors, config.json, metrics.json...).")
@click.option(
    "--backbone",
    default="simple",
    show_default=True,
    help="simple (small CNN from scratch), efficientnet_lite0 (pretrained), "
    "torchvision:<name> or timm:<name> (trained from random weights; no --weights needed).",
)
@click.option(
    "--epochs",
    default=None,
    type=click.IntRange(min=1),
    help="Passes over the training set; default 40 for simple, else 10.",
)
@click.option(
    "--image-size",
    default=None,
    type=click.IntRange(min=8),
    help="Training image side; default 64 for simple, else the backbone's (224).",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--lr",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Peak learning rate (AdamW, cosine schedule); default 3e-3, or 3e-4 to fine-tune "
    "a pretrained backbone.",
)
@click.option("--weight-decay", default=1e-4, show_default=True, type=click.FloatRange(min=0))
@click.option(
    "--val-split",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Fraction of each class held out for validation.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same run.")
@click.option(
    "--freeze-backbone/--finetune",
    default=None,
    help="Train only the new head, or the whole network; default: freeze pretrained "
    "backbones, train random ones.",
)
@click.option("--no-augment", is_flag=True, help="Turn off flips, crops and colour jitter.")
@click.option(
    "--head-channels",
    default=1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Channels of the 3x3 convolution added by Zhou's recipe (non-GAP backbones).",
)
@click.option(
    "--multilabel",
    is_flag=True,
    help="Several classes per image: DATA is a CSV image,labels (labels separated by ';', "
    "paths relative to the CSV), trained with binary cross-entropy per class; accuracy is "
    "exact-match (the predicted set of classes equals the true set).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last epoch (same parameters and data, checked; "
    "--epochs and --device may change).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Remove what camlens wrote in --out before (nothing else), then start again.",
)
@device_option
def train(
    data: Path,
    out_dir: Path,
    backbone: str,
    epochs: int | None,
    image_size: int | None,
    batch_size: int,
    lr: float | None,
    weight_decay: float,
    val_split: float,
    seed: int,
    freeze_backbone: bool | None,
    no_augment: bool,
    head_channels: int,
    multilabel: bool,
    resume: bool,
    overwrite: bool,
    device: str,
) -> None:
    """Train a CAM-ready classifier (GAP + one linear layer) on an ImageFolder data set.

    DATA has one subfolder of images per class (with --multilabel: a CSV image,labels, e.g.
    the labels.csv of `camlens make-dataset shapes --per-image 2`). Writes
    --out/model.safetensors (the best epoch by validation accuracy), config.json,
    metrics.json and split.json; load the model with --model OUT in every command, or camlens.load_model(OUT) in Python. Unreadable
    images are skipped and counted. A non-empty --out is refused unless --resume (same
    parameters and data) or --overwrite (removes only what camlens wrote there); nothing is
    created before the data set is checked. Exit status: 0 done, 2 usage or data-set error.
    """
    from camlens.training import TrainConfig, train_classifier

    config = TrainConfig(
        backbone=backbone,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        val_split=val_split,
        seed=seed,
        freeze_backbone=freeze_backbone,
        augment=not no_augment,
        head_channels=head_channels,
        device=device,
        multilabel=multilabel,
    )
    with _warnings_to_stderr():
        result = run_or_exit(
            lambda: train_classifier(
                data, out_dir, config, resume=resume, overwrite=overwrite, cli=True
            )
        )
    best = result.metrics["best_val_accuracy"]
    best_text = f"{100 * best:.1f} %" if best is not None else "n/a (no validation set)"
    if multilabel and best is not None:
        best_text += " exact-match"
    click.echo(
        f"trained on {result.n_train} images, validated on {result.n_val}"
        + (f", skipped {len(result.skipped)} unreadable" if result.skipped else "")
        + f"; best validation accuracy {best_text} (epoch {result.metrics['best_epoch']}) "
        f"-> {out_dir}"
    )


@contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show camlens' warnings (skipped images...) as plain ``Warning: ...`` lines."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_args, **_kwargs: click.echo(
            f"Warning: {message}", err=True
        )
        yield


class _UnlistedArgument(click.Argument):
    """A positional argument left out of the usage line: an old spelling kept for a release."""

    def get_usage_pieces(self, ctx: click.Context) -> list[str]:
        return []


#: The line ``camlens make-dataset KIND OUT`` (the old spelling of ``--out``) prints.
OUT_ARGUMENT_DEPRECATED = "Warning: camlens make-dataset KIND OUT is deprecated; use --out OUT"


@click.command("make-dataset")
@click.argument("kind", type=click.Choice(["shapes", "xray"]))
@click.argument("out", required=False, type=click.Path(path_type=Path), cls=_UnlistedArgument)
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Output folder (required; created): images/, masks/, annotations.csv, dataset.json.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Remove what camlens wrote in --out before (nothing else), then generate.",
)
@click.option("--n", default=600, show_default=True, type=click.IntRange(min=2), help="Images.")
@click.option(
    "--size",
    default=None,
    type=click.IntRange(min=16),
    help="Side in pixels; default 64 (shapes), 128 (xray).",
)
@click.option(
    "--classes",
    default=",".join(DEFAULT_CLASSES),
    show_default=True,
    help=f"Comma-separated shapes from: {', '.join(SHAPES)}.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same files.")
@click.option(
    "--shortcut",
    type=click.Choice(SHORTCUTS),
    default=None,
    help="Plant a shortcut on one class: corner-tag (a tag in a fixed corner, like the "
    "horse source tag), stripe (a band along an edge), token (an 'L' marker anywhere), "
    "coin (a bright ring anywhere).",
)
@click.option("--shortcut-class", default=None, help="Class that carries it (default: first).")
@click.option(
    "--shortcut-rate",
    default=0.9,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Fraction of that class's images with the shortcut.",
)
@click.option(
    "--shortcut-other-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Fraction of the other classes' images with it.",
)
@click.option(
    "--shortcut-position",
    default="bottom-left",
    show_default=True,
    type=click.Choice(POSITIONS),
    help="Corner of the tag (the stripe uses top/bottom; the token and coin go anywhere).",
)
@click.option(
    "--max-rotation",
    default=15.0,
    show_default=True,
    type=click.FloatRange(0.0, 180.0),
    help="Shapes turn up to this many degrees from upright (180: any orientation).",
)
@click.option(
    "--per-image",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Shapes per image, of different classes. 2 or more: multi-label data "
    "(OUT/labels.csv for camlens train --multilabel; no shortcut).",
)
@click.option(
    "--format",
    "image_format",
    default="png",
    show_default=True,
    type=click.Choice(["png", "dicom"]),
    help="xray: 16-bit PNG or DICOM (MONOCHROME2, 12 bits stored, no patient data).",
)
@click.option(
    "--hospitals",
    default=2,
    show_default=True,
    type=click.IntRange(2, 6),
    help="xray: hospitals A, B, ...; image i comes from hospital i mod HOSPITALS.",
)
@click.option(
    "--prevalence",
    default=None,
    help="xray: share of finding images per hospital, comma-separated "
    "(default 0.8,0.2; evenly spaced from 0.8 to 0.2 for more hospitals).",
)
@click.option(
    "--markers",
    default=None,
    help="xray: marker style per hospital, comma-separated from L, box-R, X, ring, R, box-L "
    "(lead letters, or box-*: a burned-in label; default: in this order).",
)
@click.option(
    "--finding-contrast",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="xray: peak brightness of the opacity, as a share of the full range.",
)
def make_dataset(
    kind: str,
    out: Path | None,
    out_dir: Path | None,
    overwrite: bool,
    n: int,
    size: int,
    classes: str,
    seed: int,
    shortcut: str | None,
    shortcut_class: str | None,
    shortcut_rate: float,
    shortcut_other_rate: float,
    shortcut_position: str,
    max_rotation: float,
    per_image: int,
    image_format: str,
    hospitals: int,
    prevalence: str | None,
    markers: str | None,
    finding_contrast: float,
) -> None:
    """Generate a synthetic data set with ground truth into --out OUT.

    \b
    shapes: coloured shapes on textured, noisy backgrounds, with object masks:
      OUT/images/<class>/*.png   OUT/masks/<class>/*.png
      OUT/annotations.csv        image,x0,y0,x1,y1,label (paths relative to OUT)
      OUT/dataset.json           all parameters, the shortcut and one record per image
    Train on it with: camlens train OUT/images --out MODEL_DIR
    \b
    With --per-image 2 (multi-label): OUT/images/image_0000.png, one mask per object
    (OUT/masks/image_0000_<class>.png), annotations.csv (one row per object) and
    OUT/labels.csv (image,labels; classes separated by ';').
    Train on it with: camlens train OUT/labels.csv --multilabel --out MODEL_DIR
    \b
    xray: chest-radiograph-like 12-bit images (16-bit PNG, or DICOM with --format dicom)
    of class finding (an opacity in a lung) or normal, from --hospitals hospitals that each
    put their own laterality marker (L, box-R...) at a varying place along the film's edge and
    have their own share of findings (--prevalence): a shortcut a model can learn.
      OUT/images/<class>/xray_NNNN.png    OUT/masks/finding/xray_NNNN.png
      OUT/lungs/masks/<class>/*.png       OUT/markers/masks/<class>/*.png
      OUT/annotations.csv (finding boxes) OUT/lungs.csv (both lung boxes per image)
      OUT/dataset.json (hospital, marker box and text, masks and boxes per image)
    Train: camlens train OUT/images --out MODEL_DIR
    camlens evaluate ANNOTATIONS against
      the finding:     OUT/annotations.csv (boxes), or OUT (its masks)
      the lung fields: OUT/lungs.csv (energy in the lung boxes), or
                       OUT/lungs --images OUT/images (lung masks: --metrics mask)
      the markers:     OUT/markers --images OUT/images

    A non-empty --out is refused unless --overwrite (removes only what camlens wrote there,
    so no image of an older data set is mixed into the new one). Exit status: 0 done, 2 usage
    or configuration error.
    """
    from camlens.data.shapes import ShapesConfig, make_shapes_dataset

    if out is not None:
        click.echo(OUT_ARGUMENT_DEPRECATED, err=True)
        if out_dir is not None and out_dir != out:
            raise click.UsageError(
                f"two output folders given ({out} and --out {out_dir}); give one"
            )
        out_dir = out
    if out_dir is None:
        raise click.UsageError("Missing option '--out'.")
    _refuse_options_of_the_other_kind(kind)
    if kind == "xray":
        _make_xray(
            out_dir,
            overwrite,
            n=n,
            size=size or 128,
            seed=seed,
            format=image_format,
            hospitals=hospitals,
            prevalence=_floats(prevalence, "--prevalence"),
            markers=tuple(markers.split(",")) if markers else None,
            finding_contrast=finding_contrast,
        )
        return
    size = size or 64

    config = ShapesConfig(
        n=n,
        size=size,
        classes=tuple(classes.split(",")),
        seed=seed,
        shortcut=shortcut,
        shortcut_class=shortcut_class,
        shortcut_rate=shortcut_rate,
        shortcut_other_rate=shortcut_other_rate,
        shortcut_position=shortcut_position,
        max_rotation=max_rotation,
        per_image=per_image,
    )
    info = run_or_exit(lambda: make_shapes_dataset(out_dir, config, overwrite=overwrite, cli=True))
    summary = info["shortcut"]
    planted = (
        f"; {summary['kind']} shortcut on {summary['n_images']} images "
        f"({', '.join(f'{c}: {k}' for c, k in summary['per_class'].items())})"
        if summary
        else ""
    )
    click.echo(
        f"{len(info['images'])} images of {', '.join(info['classes'])}{planted} -> {out_dir}"
    )


_SHAPES_ONLY = (
    "classes", "shortcut", "shortcut_class", "shortcut_rate", "shortcut_other_rate",
    "shortcut_position", "max_rotation", "per_image",
)  # fmt: skip
_XRAY_ONLY = ("image_format", "hospitals", "prevalence", "markers", "finding_contrast")


def _refuse_options_of_the_other_kind(kind: str) -> None:
    """A usage error for an option of the other kind given on the command line."""
    ctx = click.get_current_context()
    foreign = _SHAPES_ONLY if kind == "xray" else _XRAY_ONLY
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name in foreign
        and ctx.get_parameter_source(param.name or "") != click.core.ParameterSource.DEFAULT
    ]
    if given:
        other = "shapes" if kind == "xray" else "xray"
        what = "is an option" if len(given) == 1 else "are options"
        raise click.UsageError(
            f"{', '.join(given)} {what} of make-dataset {other}, not {kind}; leave "
            f"{'it' if len(given) == 1 else 'them'} out"
        )


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """``"0.8,0.2"`` -> ``(0.8, 0.2)``; a usage error naming ``option`` for bad text."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise click.UsageError(
            f"{option} {text!r}: give comma-separated numbers, e.g. 0.8,0.2"
        ) from None


def _make_xray(out_dir: Path, overwrite: bool, **parameters: object) -> None:
    """``camlens make-dataset xray``: generate, then print the summary line."""
    from camlens.data.xray import XrayConfig, make_xray_dataset

    config = XrayConfig(**parameters)  # type: ignore[arg-type]
    info = run_or_exit(lambda: make_xray_dataset(out_dir, config, overwrite=overwrite, cli=True))
    counts = {c: sum(1 for r in info["images"] if r["label"] == c) for c in info["classes"]}
    hospitals = "; ".join(
        f"{h['name']}: {h['marker']} marker, {h['findings']}/{h['images']} finding"
        for h in info["hospitals"]
    )
    click.echo(
        f"{len(info['images'])} x-ray images ({', '.join(f'{c}: {k}' for c, k in counts.items())})"
        f" from {len(info['hospitals'])} hospitals ({hospitals}) -> {out_dir}"
    )
