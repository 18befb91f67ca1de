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
@click.argument("kind", type=click.Choice(["shapes"]))
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
@click.option("--size", default=64, show_default=True, type=click.IntRange(min=16), help="Side.")
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
    "horse source tag), stripe (a band along an edge), token (an 'L' marker anywhere).",
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
    help="Corner of the tag (the stripe uses top/bottom; the token goes anywhere).",
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
