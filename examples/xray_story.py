"""The hospital token, end to end: a radiograph model that reads the marker, and how camlens
shows it.

Zech et al. (2018) found that pneumonia models scored well by recognising the hospital a film
came from (by its laterality marker and other tokens) where hospitals differed in how
often the disease was seen. This example reproduces that in small, from DICOM files to the
audit:

1. ``camlens make-dataset xray`` (``make_xray_dataset``): chest-radiograph-like 12-bit DICOM
   films from two hospitals. Hospital A puts a lead "L" on its films and sees the finding (an
   opacity in a lung) on 80 % of them; hospital B burns in a boxed "R" and sees it on 20 %.
   The marker sits at a different place along the film's edge on every film. A second data
   set has the same films' kind with equal prevalence (50 % at both): the clean control.
2. ``camlens train`` (``train_classifier``) on each: the ``simple`` CAM network.
3. On the *same* validation films of the first set, for both models: accuracy, accuracy with
   the two hospitals' markers swapped (the same films redrawn with the other marker), and
   where the CAM of the predicted class looks, per hospital (and the finding class's CAM on
   every film): its share of energy inside the lung fields and on the marker, and how often
   its peak falls in the lungs or on the marker; and ``camlens evaluate``'s energy pointing
   game against the lung boxes (``OUT/lungs.csv``), the map of each film's true class.
4. ``camlens audit`` of the shortcut model with the lung fields as the region a finding model
   should use: the moving marker comes out as a confirmed ``moving-pattern`` flag.

Run (about ten minutes on two CPU cores)::

    python examples/xray_story.py --out docs/images

Writes ``OUT/xray_maps.png`` (the two models' maps on the same films) and, in ``--work``
(default ``xray_story_work``), the data sets, both models, the audit (``audit/report.html``)
and ``summary.json`` with every number printed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

import camlens
from camlens.data.xray import XrayConfig, make_xray_dataset, render_xray_image
from camlens.io.annotations import load_annotations
from camlens.render import overlay, save_figure
from camlens.training import TrainConfig, train_classifier
from camlens.writers import write_json, write_png

FINDING = "finding"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="figure folder")
    parser.add_argument("--work", type=Path, default=Path("xray_story_work"))
    parser.add_argument("--n", type=int, default=600, help="films per data set")
    parser.add_argument("--size", type=int, default=128, help="film side in pixels")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64, help="the model's input side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=4, help="films per figure row")
    args = parser.parse_args()

    shortcut_data, films = make_data(args, "shortcut", (0.8, 0.2), args.seed)
    clean_data, _ = make_data(args, "clean", (0.5, 0.5), args.seed + 1)
    models = {
        "shortcut": train(args, shortcut_data, args.work / "shortcut_model"),
        "clean": train(args, clean_data, args.work / "clean_model"),
    }
    val = validation_films(films, args.work / "shortcut_model")
    swapped = swapped_films(args, val, args.work / "swapped")
    summary = {
        name: {
            **measure(model, shortcut_data, val, swapped),
            "evaluate_energy_in_lung_boxes": lung_energy(model, shortcut_data, val),
        }
        for name, model in models.items()
    }
    summary["validation_films"] = len(val)
    summary["audit"] = audit(models["shortcut"], shortcut_data, args.work / "audit")
    figure = maps_figure(models, shortcut_data, val, args.examples)
    save_figure(figure, args.out / "xray_maps.png", dpi=120)
    write_json(args.work / "summary.json", summary)
    print(json.dumps(summary, indent=2))


def make_data(
    args: argparse.Namespace, name: str, prevalence: tuple[float, float], seed: int
) -> tuple[Path, list[dict]]:
    """A DICOM data set in ``work/<name>``; returns its folder and its per-film records."""
    config = XrayConfig(n=args.n, size=args.size, seed=seed, format="dicom", prevalence=prevalence)
    folder = args.work / name
    info = make_xray_dataset(folder, config, overwrite=True)
    films = [{**record, "index": i} for i, record in enumerate(info["images"])]
    return folder, films


def train(args: argparse.Namespace, data: Path, out: Path) -> camlens.Classifier:
    config = TrainConfig(epochs=args.epochs, image_size=args.image_size, seed=args.seed)
    train_classifier(data / "images", out, config, overwrite=True, progress=False)
    return camlens.load_model(out)


def validation_films(films: list[dict], model_dir: Path) -> list[dict]:
    """The films the shortcut model held out (the clean model never saw any of them)."""
    held_out = {f"images/{p}" for p in json.loads((model_dir / "split.json").read_text())["val"]}
    return [film for film in films if film["image"] in held_out]


def swapped_films(args: argparse.Namespace, films: list[dict], folder: Path) -> list[Path]:
    """The same films redrawn with the other hospital's marker (16-bit PNGs): only the
    marker's pixels differ."""
    config = XrayConfig(n=args.n, size=args.size, seed=args.seed, prevalence=(0.8, 0.2))
    markers = {"A": 0, "B": 1}
    paths = []
    for film in films:
        hospital = markers[film["hospital"]]
        other = config.validated().markers[1 - hospital]
        sample = render_xray_image(config, film["index"], film["label"], hospital, marker=other)
        path = folder / f"xray_{film['index']:04d}.png"
        write_png(path, Image.fromarray(sample.pixels))
        paths.append(path)
    return paths


def measure(model: camlens.Classifier, data: Path, films: list[dict], swapped: list[Path]) -> dict:
    """Accuracy (as drawn, and with the markers swapped) and where the maps look on
    ``films``: the map of the class the model predicts (what its decision used), per
    hospital, and the finding class's map on every film."""
    paths = [data / f["image"] for f in films]
    decision = camlens.explain(model, paths, target="top1")
    finding = camlens.explain(model, paths, target=model.labels.index(FINDING))
    truth = np.array([model.labels.index(f["label"]) for f in films])
    predicted = decision.targets[:, 0].numpy()
    after_swap = predictions(model, swapped)
    by_hospital = {}
    for hospital in sorted({f["hospital"] for f in films}):
        chosen = [i for i, f in enumerate(films) if f["hospital"] == hospital]
        by_hospital[hospital] = where_maps_look(decision, data, films, chosen)
    return {
        "accuracy": round(float((predicted == truth).mean()), 3),
        "accuracy_markers_swapped": round(float((after_swap == truth).mean()), 3),
        "predictions_flipped_by_the_swap": round(float((predicted != after_swap).mean()), 3),
        "predicted_class_maps_by_hospital": by_hospital,
        "finding_maps": where_maps_look(finding, data, films, range(len(films))),
        "identity_error": max(decision.identity_error, finding.identity_error),
    }


def lung_energy(model: camlens.Classifier, data: Path, films: list[dict]) -> float:
    """``camlens evaluate``'s energy pointing game of CAM against the lung boxes
    (``OUT/lungs.csv``, each film labelled with its own class) on ``films``: the share of the
    true class's map inside the two lung fields' boxes."""
    chosen = {film["image"] for film in films}
    annotations = [
        a for a in load_annotations(data / "lungs.csv") if relative(a.image, data) in chosen
    ]
    scores = camlens.evaluate(
        model, annotations, methods=["cam"], metrics="energy_pointing_game", image_root=data,
        options=camlens.RunOptions(progress=False),
    )  # fmt: skip
    return round(scores["methods"]["cam"]["energy_pointing_game"], 3)


def relative(path: Path, root: Path) -> str:
    return Path(path).resolve().relative_to(root.resolve()).as_posix()


def where_maps_look(
    explained: camlens.Explanation, data: Path, films: list[dict], chosen: Iterable[int]
) -> dict:
    """Means over the ``chosen`` films: the map's share of energy inside the lung fields and
    on the marker, how often its peak falls in each, and the lung fields' share of the film
    (what energy spread evenly would give)."""
    rows = []
    for i in chosen:
        heat = explained.heatmap(i, 0, original=True).astype(np.float64)
        lungs = np.asarray(Image.open(data / films[i]["lung_mask"])) > 0
        marker = np.zeros_like(lungs)
        x0, y0, x1, y1 = films[i]["marker_box"]
        marker[y0:y1, x0:x1] = True
        total = max(heat.sum(), 1e-12)
        peak = np.unravel_index(np.argmax(heat), heat.shape)
        rows.append(
            (heat[lungs].sum() / total, heat[marker].sum() / total, lungs[peak], marker[peak],
             lungs.mean())
        )  # fmt: skip
    means = np.mean(np.array(rows, dtype=np.float64), axis=0)
    keys = ("energy_in_lungs", "energy_on_marker", "peak_in_lungs", "peak_on_marker",
            "lung_area_share")  # fmt: skip
    return {key: round(float(value), 3) for key, value in zip(keys, means, strict=True)}


def predictions(model: camlens.Classifier, paths: list[Path]) -> np.ndarray:
    return camlens.explain(model, paths, target="top1").targets[:, 0].numpy()


def audit(model: camlens.Classifier, data: Path, out: Path) -> dict:
    """``camlens audit`` with the lung boxes as the region a finding model should use."""
    options = camlens.RunOptions(overwrite=True, progress=False)
    result = camlens.audit(
        model, data / "images", out, annotations=data / "lungs.csv", options=options
    )
    confirmed = [flag for flag in result["flags"] if flag.get("confirmed")]
    moving = [flag for flag in confirmed if flag.get("kind") == "moving-pattern"]
    return {
        "confirmed_flags": len(confirmed),
        "moving_pattern_flags": [
            {
                "class": flag["class"],
                "flip_rate": flag["flip_rate"],
                "baseline_flip_rate": flag["baseline_flip_rate"],
                "locations": len(flag["locations"]),
                "locations_on_marker": on_marker(flag["locations"], data),
            }
            for flag in moving
        ],
    }


def on_marker(locations: list[dict], data: Path) -> float:
    """Share of an audit flag's locations that overlap the film's planted marker."""
    records = json.loads((data / "dataset.json").read_text())["images"]
    boxes = {Path(r["image"]).name: r["marker_box"] for r in records}
    size = json.loads((data / "dataset.json").read_text())["parameters"]["size"]
    hits = 0
    for location in locations:
        x0, y0, x1, y1 = (v * size for v in location["box"])
        m0, n0, m1, n1 = boxes[Path(location["image"]).name]
        hits += x0 < m1 and m0 < x1 and y0 < n1 and n0 < y1
    return round(hits / len(locations), 3) if locations else 0.0


def maps_figure(
    models: dict[str, camlens.Classifier], data: Path, films: list[dict], k: int
) -> Figure:
    """Row per model: the map of its predicted class on the same films, half from hospital A
    (lead "L"; findings), half from hospital B (boxed "R"; normal), the marker outlined."""
    shown = [f for f in films if f["hospital"] == "A" and f["label"] == FINDING][: k // 2]
    shown += [f for f in films if f["hospital"] == "B" and f["label"] != FINDING][: k - len(shown)]
    figure = Figure(figsize=(2.2 * len(shown), 2.4 * len(models)), layout="constrained")
    axes = figure.subplots(len(models), len(shown), squeeze=False)
    for row, (name, model) in enumerate(models.items()):
        explained = camlens.explain(model, [data / f["image"] for f in shown], target="top1")
        for j, film in enumerate(shown):
            ax = axes[row, j]
            image, heat = explained.display_image(j), explained.heatmap(j, 0, original=True)
            ax.imshow(np.asarray(overlay(image, heat, alpha=0.45)), interpolation="nearest")
            x0, y0, x1, y1 = film["marker_box"]
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="white", linewidth=1.2))  # fmt: skip
            predicted = int(explained.targets[j, 0])
            prob = explained.probs[j, predicted].item()
            ax.set_title(
                f"{name} model, hospital {film['hospital']}\n"
                f"says {model.labels[predicted]} ({prob:.2f})",
                fontsize=8,
            )
            ax.set_axis_off()
    return figure


if __name__ == "__main__":
    main()
