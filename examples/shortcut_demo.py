"""A CAM model learns a planted shortcut, and class activation maps show it.

The "horse" classifier of Lapuschkin et al. 2019 recognised horses by a source tag in the
corner of the photos. This example reproduces that in small, end to end:

1. ``make_shapes_dataset``: 600 coloured shapes (circle, square, triangle) at 64 px; 90 % of
   the squares carry a small checkered tag in the bottom-left corner, nothing else does.
2. ``train_classifier``: the ``simple`` CAM network (convolutions -> GAP -> linear).
3. ``camlens.explain`` on validation images: the square class's map lights up the tag;
   pasting the tag on circles and triangles turns them into "squares", and the same squares
   drawn without their tag lose their label.
4. The same on clean data (no tag): the maps light up the shapes, and ``camlens.evaluate``
   scores their boxes against the ground truth (MaxBoxAcc, pointing game).

Run (about two minutes on two CPU cores)::

    python examples/shortcut_demo.py --out docs/images

Writes ``OUT/train_shortcut_cam.png``, ``OUT/train_clean_cam.png`` and, in ``--work``
(default ``shortcut_demo_work``), the data sets, both models, an HTML gallery per model
(``explain_*/index.html``) and ``summary.json`` with every number printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

import camlens
from camlens.data.shapes import (
    ShapesConfig,
    corner_box,
    make_shapes_dataset,
    render_shape_image,
    shortcut_patch,
)
from camlens.io.annotations import load_annotations
from camlens.render import overlay, save_figure
from camlens.training import TrainConfig, train_classifier
from camlens.writers import write_json

SHORTCUT_CLASS = "square"
CORNER = "bottom-left"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="figure folder")
    parser.add_argument("--work", type=Path, default=Path("shortcut_demo_work"))
    parser.add_argument("--n", type=int, default=600, help="images per data set")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=None, help="default: camlens' (40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=4, help="images per figure row")
    args = parser.parse_args()

    summary = {
        "shortcut": shortcut_part(args),
        "clean": clean_part(args),
    }
    write_json(args.work / "summary.json", summary)
    print(json.dumps(summary, indent=2))


def shortcut_part(args: argparse.Namespace) -> dict:
    """Train on data with a planted corner tag; measure and draw what the model learned."""
    config = ShapesConfig(
        n=args.n,
        size=args.size,
        seed=args.seed,
        shortcut="corner-tag",
        shortcut_class=SHORTCUT_CLASS,
        shortcut_rate=0.9,
        shortcut_position=CORNER,
    )
    data, model_dir = args.work / "shortcut", args.work / "shortcut_model"
    info = make_shapes_dataset(data, config, overwrite=True)
    result = train_classifier(
        data / "images", model_dir, TrainConfig(epochs=args.epochs, seed=args.seed), overwrite=True
    )
    model = camlens.load_model(model_dir)
    square = model.labels.index(SHORTCUT_CLASS)
    records = {r["image"]: (i, r) for i, r in enumerate(info["images"])}
    val = [f"images/{p}" for p in json.loads((model_dir / "split.json").read_text())["val"]]
    tagged = [p for p in val if records[p][1]["shortcut"]]
    others = [p for p in val if records[p][1]["label"] != SHORTCUT_CLASS]

    # Where the square class's map puts its mass on tagged squares.
    tagged_images = [Image.open(data / p).convert("RGB") for p in tagged]
    explained = camlens.explain(model, tagged_images, target=square)
    half = args.size // 2
    maps = explained.maps[:, 0]
    quarter = (maps[:, half:, :half].sum(dim=(1, 2)) / maps.sum(dim=(1, 2))).mean().item()
    x0, y0, x1, y1 = corner_box(args.size, CORNER)
    in_tag = (maps[:, y0:y1, x0:x1].sum(dim=(1, 2)) / maps.sum(dim=(1, 2))).mean().item()

    # Counterfactuals: the tag pasted on other shapes, and the tagged squares drawn without it.
    patch = shortcut_patch("corner-tag", x1 - x0)
    originals = [Image.open(data / p).convert("RGB") for p in others]
    pasted = [_paste(image, patch, (x0, y0)) for image in originals]
    before = camlens.explain(model, originals).targets[:, 0]
    after = camlens.explain(model, pasted, target="top1")
    untagged = [
        Image.fromarray(render_shape_image(config, records[p][0], SHORTCUT_CLASS, False).image)
        for p in tagged
    ]
    without = camlens.explain(model, untagged).targets[:, 0]

    figure = _shortcut_figure(explained, after, pasted, before, model.labels, args.examples)
    save_figure(figure, args.out / "train_shortcut_cam.png", dpi=120)
    quiet = camlens.RunOptions(overwrite=True, progress=False)
    camlens.run_explain(model, [data / p for p in tagged[:8] + others[:8]],
                        args.work / "explain_shortcut", options=quiet)  # fmt: skip
    return {
        "best_val_accuracy": result.best_val_accuracy,
        "tagged_val_squares": len(tagged),
        "square_map_mass_in_tag_quarter": round(quarter, 3),
        "square_map_mass_in_tag_box": round(in_tag, 3),
        "tag_box_area_share": round((x1 - x0) * (y1 - y0) / args.size**2, 4),
        "others_predicted_square_before_paste": _share(before, square),
        "others_predicted_square_after_paste": _share(after.targets[:, 0], square),
        "tagged_squares_still_square_without_tag": _share(without, square),
        "identity_error": explained.identity_error,
    }


def clean_part(args: argparse.Namespace) -> dict:
    """Train on the same kind of data without a shortcut; the maps find the shapes."""
    config = ShapesConfig(n=args.n, size=args.size, seed=args.seed + 1)
    data, model_dir = args.work / "clean", args.work / "clean_model"
    make_shapes_dataset(data, config, overwrite=True)
    result = train_classifier(
        data / "images", model_dir, TrainConfig(epochs=args.epochs, seed=args.seed), overwrite=True
    )
    model = camlens.load_model(model_dir)
    val = set(json.loads((model_dir / "split.json").read_text())["val"])
    annotations = [
        a for a in load_annotations(data / "annotations.csv") if _relative(a.image) in val
    ]
    scores = camlens.evaluate(
        model, annotations, methods=["cam"], metrics="localization", image_root=data
    )["methods"]["cam"]

    shown = annotations[: args.examples * 2]
    explained = camlens.explain(model, [str(a.image) for a in shown])
    figure = _clean_figure(explained, shown, model.labels, args.examples)
    save_figure(figure, args.out / "train_clean_cam.png", dpi=120)
    quiet = camlens.RunOptions(overwrite=True, progress=False)
    camlens.run_explain(model, [a.image for a in shown], args.work / "explain_clean",
                        options=quiet)  # fmt: skip
    keys = ("maxboxacc", "maxboxacc_threshold", "top1_loc", "gt_known_loc", "pointing_game",
            "energy_pointing_game")  # fmt: skip
    return {
        "best_val_accuracy": result.best_val_accuracy,
        "val_images": len(annotations),
        **{k: scores.get(k) for k in keys},
        "identity_error": explained.identity_error,
    }


def _paste(image: Image.Image, patch: np.ndarray, at: tuple[int, int]) -> Image.Image:
    pixels = np.array(image)
    x, y = at
    pixels[y : y + patch.shape[0], x : x + patch.shape[1]] = patch
    return Image.fromarray(pixels)


def _share(predicted: torch.Tensor, label: int) -> float:
    return round((predicted == label).float().mean().item(), 3)


def _relative(path: Path) -> str:
    return "/".join(Path(path).parts[-2:])


def _panel(ax, image: Image.Image, heatmap: np.ndarray, title: str, boxes=()) -> None:
    ax.imshow(np.asarray(overlay(image, heatmap, alpha=0.5)), interpolation="nearest")
    for (x0, y0, x1, y1), colour in boxes:
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               edgecolor=colour, linewidth=1.5))  # fmt: skip
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _shortcut_figure(tagged, pasted, pasted_images, before, labels, k: int) -> Figure:
    figure = Figure(figsize=(2.2 * k, 5.0), layout="constrained")
    axes = figure.subplots(2, k, squeeze=False)
    for j in range(min(k, len(tagged))):
        prob = tagged.probs[j, tagged.targets[j, 0]].item()
        _panel(axes[0, j], tagged.display_image(j), tagged.heatmap(j, 0, original=True),
               f"square: p={prob:.2f}")  # fmt: skip
    for j in range(min(k, len(pasted))):
        predicted = pasted.targets[j, 0].item()
        title = (
            f"{labels[before[j]]} + tag\n-> {labels[predicted]} p={pasted.probs[j, predicted]:.2f}"
        )
        _panel(axes[1, j], pasted_images[j], pasted.heatmap(j, 0, original=True), title)
    figure.suptitle(
        "Trained with a tag on 90 % of the squares: the square map lights up its corner"
    )
    return figure


def _clean_figure(explained, annotations, labels, k: int) -> Figure:
    rows = (len(annotations) + k - 1) // k
    figure = Figure(figsize=(2.2 * k, 2.5 * rows), layout="constrained")
    axes = figure.subplots(rows, k, squeeze=False)
    boxes = explained.boxes(0.2, original=True)
    for i, annotation in enumerate(annotations):
        predicted = explained.targets[i, 0].item()
        prob = explained.probs[i, predicted].item()
        title = f"{labels[predicted]} p={prob:.2f}"
        drawn = [(annotation.boxes[0], "lime")]
        if boxes[i][0] is not None:
            drawn.append((boxes[i][0], "white"))
        _panel(axes[i // k, i % k], explained.display_image(i),
               explained.heatmap(i, 0, original=True), title, drawn)  # fmt: skip
    for ax in axes.flat[len(annotations) :]:
        ax.set_axis_off()
    figure.suptitle("Clean data: the class maps light up the shapes (green: truth, white: CAM box)")
    return figure


if __name__ == "__main__":
    main()
