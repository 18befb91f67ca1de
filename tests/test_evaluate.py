"""``camlens.evaluate`` and ``camlens evaluate``: exact values on the white-box network, the
real photos through the command line, parity between the two."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens import ConfigError
from camlens.api import evaluate, evaluating
from camlens.cli import main
from camlens.io.samples import write_samples
from camlens.metrics.registry import resolve_metrics
from camlens.pipeline import OutputFolder, RunOptions
from camlens.report import evaluate as report_evaluate
from whitebox import colour_classifier, red_logit, square_image

LOCALIZATION = ["maxboxacc", "maxboxacc_v2", "top1_loc", "gt_known_loc", "pointing_game"]

#: Red squares (x0, y0, x1, y1) of the synthetic images: 16 x 16, 16 x 16 and 8 x 8.
SQUARES = {"a.png": (4, 4, 20, 20), "b.png": (40, 10, 56, 26), "c.png": (20, 36, 28, 44)}


def write_csv(path: Path, rows: list[tuple[str, tuple, str]]) -> Path:
    lines = ["image,x0,y0,x1,y1,label"]
    lines += [f"{name},{','.join(str(v) for v in box)},{label}" for name, box, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def squares(tmp_path):
    for name, box in SQUARES.items():
        square_image(tmp_path / name, [("red", box)])
    return tmp_path


def test_white_box_localisation_and_faithfulness_are_exact(squares):
    csv = write_csv(squares / "boxes.csv", [(n, b, "red") for n, b in SQUARES.items()])
    result = evaluate(
        colour_classifier(),
        csv,
        methods=["cam", "gradcam"],
        steps=16,
        score="logit",
        insertion_baseline="zero",
    )
    assert result["n_images"] == 3 and result["n_instances"] == 3 and result["errors"] == []
    logits = np.array([red_logit(256), red_logit(256), red_logit(64)])
    for name in ("cam", "gradcam"):
        values = result["methods"][name]
        # The map is 1 on the square, 0 elsewhere: every box is the square at every threshold.
        assert {k: values[k] for k in LOCALIZATION} == dict.fromkeys(LOCALIZATION, 1.0)
        assert values["energy_pointing_game"] == 1.0 and values["maxboxacc_threshold"] == 0.0
        assert values["pxap"] is None and values["mask_iou"] is None  # no masks
        # Deletion step 1 removes 256 pixels, the whole square: [L, 0, ..., 0].
        assert values["deletion_auc"] == pytest.approx(np.mean(logits / 2 / 16))
        # Insertion from zeros: [0, L, ..., L]; the 8 x 8 square also fits in the first step.
        assert values["insertion_auc"] == pytest.approx(np.mean(logits * 15.5 / 16))
        # image x map = image: nothing drops, nothing rises.
        assert values["average_drop"] == 0.0 and values["increase_in_confidence"] == 0.0
        assert values["average_gain"] == 0.0
        assert [r["iou"] for r in result["per_image"][name]] == [1.0, 1.0, 1.0]
    curves = result["curves"]["cam"]
    assert curves["boxacc"]["0.5"] == [1.0] * 100 and len(curves["deletion"]) == 17


def test_misplaced_annotations_score_zero(squares):
    far = (44, 44, 60, 60)  # more than 15 px from every square
    csv = write_csv(squares / "boxes.csv", [(n, far, "red") for n in ("a.png", "b.png")])
    values = evaluate(colour_classifier(), csv, methods=["cam"], metrics="localization")["methods"][
        "cam"
    ]
    assert {k: values[k] for k in LOCALIZATION} == dict.fromkeys(LOCALIZATION, 0.0)
    assert values["energy_pointing_game"] == 0.0
    assert list(values) == [*resolve_metrics("localization"), "maxboxacc_threshold"]


def test_several_classes_per_image_and_masks(tmp_path):
    square_image(tmp_path / "two.png", [("red", (0, 0, 16, 16)), ("blue", (40, 40, 48, 48))])
    csv = write_csv(
        tmp_path / "boxes.csv",
        [("two.png", (0, 0, 16, 16), "red"), ("two.png", (40, 40, 48, 48), "BLUE")],
    )
    result = evaluate(colour_classifier(), csv, methods=["cam"], metrics="localization")
    assert result["n_images"] == 1 and result["n_instances"] == 2
    values = result["methods"]["cam"]
    assert values["top1_loc"] == 1.0  # top-1 is red (the larger square), its box is right
    assert values["maxboxacc"] == 1.0 and values["pointing_game"] == 1.0
    assert [(r["label"], r["class"], r["predicted"]) for r in result["per_image"]["cam"]] == [
        ("red", 0, 0),
        ("BLUE", 2, 0),
    ]
    # A mask folder (class subfolders): the map equals the mask, so PxAP = peak IoU = 1.
    root = tmp_path / "maskset"
    for colour, box in (("red", (8, 8, 24, 30)), ("green", (30, 2, 50, 12))):
        square_image(root / "images" / colour / "x.png", [(colour, box)])
        square_image(root / "masks" / colour / "x.png", [("red", box)])
    masked = evaluate(colour_classifier(), root, methods=["cam"], metrics="localization,mask")
    assert masked["methods"]["cam"]["pxap"] == 1.0 and masked["methods"]["cam"]["mask_iou"] == 1.0


def test_cam_beats_the_random_baseline(squares):
    if "random" not in camlens.METHODS:
        pytest.skip("the random baseline method is not registered")
    csv = write_csv(squares / "boxes.csv", [(n, b, "red") for n, b in SQUARES.items()])
    result = evaluate(colour_classifier(), csv, methods=["cam", "random"], steps=16)
    cam, rnd = result["methods"]["cam"], result["methods"]["random"]
    assert cam["deletion_auc"] < rnd["deletion_auc"]
    assert cam["insertion_auc"] > rnd["insertion_auc"]
    assert cam["maxboxacc"] == 1.0 > rnd["maxboxacc"]


def test_batch_size_does_not_change_the_numbers(squares):
    csv = write_csv(squares / "boxes.csv", [(n, b, "red") for n, b in SQUARES.items()])
    kw = {"methods": ["gradcam"], "steps": 8}
    one = evaluate(colour_classifier(), csv, options=RunOptions(batch_size=1), **kw)
    many = evaluate(colour_classifier(), csv, options=RunOptions(batch_size=3), **kw)
    one, many = one["methods"]["gradcam"], many["methods"]["gradcam"]
    assert one == pytest.approx(many)


def test_unreadable_images_are_reported_and_the_rest_evaluated(squares):
    (squares / "broken.png").write_bytes(b"not a png")
    csv = write_csv(
        squares / "boxes.csv",
        [("a.png", SQUARES["a.png"], "red"), ("broken.png", (0, 0, 4, 4), "red")],
    )
    result = evaluate(colour_classifier(), csv, methods=["cam"], metrics="maxboxacc")
    assert result["n_images"] == 1 and result["n_failed"] == 1
    assert result["errors"][0]["image"].endswith("broken.png")
    assert result["methods"]["cam"]["maxboxacc"] == 1.0


def test_configuration_errors(squares):
    csv = write_csv(squares / "boxes.csv", [("a.png", SQUARES["a.png"], "purple")])
    with pytest.raises(ConfigError, match=r"boxes\.csv' row 2: label 'purple' is not a class"):
        evaluate(colour_classifier(), csv)
    good = write_csv(squares / "good.csv", [("a.png", SQUARES["a.png"], "2")])  # a class id
    with pytest.raises(ConfigError, match="unknown method"):
        evaluate(colour_classifier(), good, methods=["nope"])
    with pytest.raises(ConfigError, match="unknown metric 'speed'"):
        evaluate(colour_classifier(), good, metrics=["speed"])
    assert resolve_metrics("maxboxacc, road") == [
        "maxboxacc",
        "road_morf",
        "road_lerf",
        "road_combined",
    ]


def test_road_and_sanity_through_the_api_leave_the_model_alone(squares):
    csv = write_csv(squares / "boxes.csv", [(n, b, "red") for n, b in SQUARES.items()])
    classifier = colour_classifier()
    before = copy.deepcopy(classifier.module.state_dict())
    result = evaluate(
        classifier,
        csv,
        methods=["cam"],
        metrics="road,sanity",
        road_fractions=(0.25, 0.5),
        sanity_images=2,
    )
    for key, value in classifier.module.state_dict().items():
        torch.testing.assert_close(value, before[key])
    values = result["methods"]["cam"]
    assert values["road_morf"] < values["road_lerf"]  # removing the square hurts most
    assert values["road_combined"] == pytest.approx((values["road_lerf"] - values["road_morf"]) / 2)
    stages = result["sanity"]["cam"]
    assert [s["stage"] for s in stages] == ["fc", "features"]
    assert values["sanity_spearman"] == stages[-1]["spearman"]


# --- the report --------------------------------------------------------------------------------


def test_the_report_draws_its_gallery_from_the_records_without_the_model(squares, monkeypatch):
    csv = write_csv(squares / "boxes.csv", [(n, b, "red") for n, b in SQUARES.items()])
    classifier = colour_classifier()
    pipeline_run = evaluating.run

    def run_then_break_the_model(*args, **kwargs):
        result = pipeline_run(*args, **kwargs)

        def broken(*_args, **_kwargs):
            raise AssertionError("the model ran after the pipeline")

        monkeypatch.setattr(classifier.module, "forward", broken)
        return result

    monkeypatch.setattr(evaluating, "run", run_then_break_the_model)
    out = squares / "out"
    result = evaluate(
        classifier, csv, methods=["cam", "gradcam"], metrics="localization", out_dir=out, gallery=2
    )
    assert result["methods"]["cam"]["maxboxacc"] == 1.0
    gallery = sorted((out / "gallery").rglob("*.png"))
    assert [p.parent.name for p in gallery] == ["cam", "cam", "gradcam", "gradcam"]
    html = (out / "report.html").read_text()
    assert all(str(p.relative_to(out)) in html for p in gallery)
    # The records store the raw maps of [top-1, annotated class]: CAM is GAIN on the square.
    records = list(OutputFolder(out).log("evaluation.jsonl").records())
    x0, y0, x1, y1 = SQUARES["a.png"]
    square = np.zeros((64, 64), dtype=np.float32)
    square[y0:y1, x0:x1] = 40.0
    np.testing.assert_allclose(records[0]["arrays"]["cam"], np.stack([square, square]), atol=1e-4)
    # The gallery card of a.png: the map (1 on the square) over the photo, its box in white and
    # the ground truth in green on the square's edge.
    with Image.open(next(p for p in gallery if "_a_c0" in p.name and p.parent.name == "cam")) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape == (64, 64, 3) and tuple(pixels[y0, x0 + 6]) == (0, 220, 0)
    # The report module draws from records and files only.
    source = Path(report_evaluate.__file__).read_text()
    imported = {
        node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
    } | {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    forbidden = ("camlens.api", "camlens.methods", "camlens.models")
    assert not [m for m in imported if m and m.startswith(forbidden)]


# --- command line ----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def sample_rows(names):
    lines = (REPO / "data" / "sample_boxes.csv").read_text().splitlines()
    rows = [line for line in lines[1:] if line.split(",")[0] in names]
    return "\n".join([lines[0], *rows]) + "\n"


def test_cli_on_two_photos_writes_metrics_and_report_equal_to_the_api(tmp_path, builtin_model):
    photos = tmp_path / "photos"
    write_samples(photos, ["chelsea", "coffee"])
    csv = photos / "boxes.csv"
    csv.write_text(sample_rows({"chelsea.png", "coffee.png"}))
    out = tmp_path / "out"
    chosen = "localization,deletion,insertion"
    args = ["evaluate", str(csv), "--out", str(out), "--steps", "2", "--metrics", chosen]
    result = CliRunner().invoke(main, [*args, "--gallery", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and list(metrics["methods"]) == ["cam", "gradcam"]
    api = evaluate(builtin_model, csv, methods="cam,gradcam", steps=2, metrics=chosen)
    for name in ("cam", "gradcam"):
        assert metrics["methods"][name] == pytest.approx(api["methods"][name], abs=1e-9)
        assert metrics["methods"][name]["pointing_game"] == 1.0  # both peaks on the object
    html = (out / "report.html").read_text()
    assert "Metrics x methods" in html and "maxboxacc" in html
    for figure in ("curves/deletion.png", "curves/insertion.png", "curves/thresholds.png"):
        assert figure in html and (out / figure).stat().st_size > 0
    gallery = sorted((out / "gallery").rglob("*.png"))
    assert [p.parent.name for p in gallery] == ["cam", "gradcam"]
    assert all(str(p.relative_to(out)) in html for p in gallery)
    assert "cam" in result.output and "maxboxacc" in result.output


def test_cli_samples_flag_runs_the_shipped_annotations(tmp_path):
    out = tmp_path / "out"
    args = ["evaluate", str(REPO / "data" / "sample_boxes.csv"), "--samples", "--out", str(out)]
    options = ["--metrics", "localization", "--method", "cam", "--gallery", "0"]
    result = CliRunner().invoke(main, [*args, *options])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 5 and metrics["n_instances"] == 6 and metrics["n_failed"] == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "motorcycle.png",
        "rocket.png",
    ]


def test_cli_configuration_errors_exit_2(tmp_path):
    write_samples(tmp_path, ["chelsea"])
    csv = write_csv(tmp_path / "bad.csv", [("chelsea.png", (0, 0, 10, 10), "flying saucer")])
    result = CliRunner().invoke(main, ["evaluate", str(csv), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "row 2: label 'flying saucer'" in result.output
    both = ["evaluate", str(csv), "--samples", "--images", str(tmp_path), "--out", str(tmp_path)]
    result = CliRunner().invoke(main, both)
    assert result.exit_code == 2 and "either --samples or --images" in result.output


def test_cli_exit_status_1_when_some_or_all_images_fail(tmp_path):
    write_samples(tmp_path, ["chelsea"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [("chelsea.png", (0, 0, 10, 10), "285"), ("broken.png", (0, 0, 4, 4), "285")]
    csv = write_csv(tmp_path / "boxes.csv", rows)
    options = ["--metrics", "maxboxacc", "--method", "cam", "--gallery", "1"]
    result = CliRunner().invoke(
        main, ["evaluate", str(csv), "--out", str(tmp_path / "a"), *options]
    )
    assert result.exit_code == 1, result.output
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (metrics["n_images"], metrics["n_failed"]) == (1, 1)
    csv = write_csv(tmp_path / "bad.csv", rows[1:])
    result = CliRunner().invoke(
        main, ["evaluate", str(csv), "--out", str(tmp_path / "b"), *options]
    )
    # All images failing is still "some inputs failed" (as in explain), not a usage error.
    assert result.exit_code == 1 and "no image could be evaluated" in result.output
    # --max-channels reaches the methods that take it, and is refused when none does.
    args = ["evaluate", str(csv), "--out", str(tmp_path / "c"), "--max-channels", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "takes the option(s) max_channels" in result.output
    assert not (tmp_path / "c").exists()
