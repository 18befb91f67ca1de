"""Training CAM-ready classifiers: files, exactness, determinism, resume, bad data, shortcuts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens.cli import main
from camlens.data.shapes import ShapesConfig, corner_box, make_shapes_dataset, shortcut_patch
from camlens.errors import ConfigError
from camlens.layers import find_cam_head
from camlens.metrics.localization import energy_pointing_game
from camlens.models.trained import load_trained
from camlens.training import TrainConfig, augment_batch, train_classifier

TINY = TrainConfig(epochs=2, image_size=32, batch_size=16, seed=0)


def _train(data: Path, out: Path, config: TrainConfig = TINY, **kwargs):
    return train_classifier(data, out, config, progress=False, **kwargs)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, ShapesConfig(n=60, size=32, seed=1))
    return root / "images"


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model"
    return out, _train(shapes, out)


def _val_paths(out: Path, data: Path) -> list[Path]:
    split = json.loads((out / "split.json").read_text())
    return [data / p for p in split["val"]]


def test_a_run_writes_weights_config_metrics_and_split(run, shapes):
    out, result = run
    assert sorted(p.name for p in out.iterdir()) == [
        ".camlens",  # the run's settings and the list of files camlens wrote
        "config.json",
        "metrics.json",
        "model.safetensors",
        "split.json",
        "training_state.pt",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for epoch in metrics["epochs"]:
        assert {"epoch", "train_loss", "train_accuracy", "val_accuracy"} <= set(epoch)
        assert epoch["val_accuracy"] * 12 == pytest.approx(round(epoch["val_accuracy"] * 12))
    best = max(metrics["epochs"], key=lambda e: (e["val_accuracy"], -e["val_loss"]))
    assert metrics["best_val_accuracy"] == best["val_accuracy"]
    assert metrics["best_epoch"] == best["epoch"]
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == ["circle", "square", "triangle"]
    assert config["input_size"] == [32, 32]
    assert config["architecture"]["recipe"] == "simple"
    assert config["camlens_version"] == camlens.__version__
    assert config["training"]["n_train"] == 48 and config["training"]["n_val"] == 12
    assert config["training"]["epochs"] == 2 and config["training"]["seed"] == 0
    split = json.loads((out / "split.json").read_text())
    every = sorted(p.relative_to(shapes).as_posix() for p in shapes.rglob("*.png"))
    assert sorted(split["train"] + split["val"]) == every
    assert [p.split("/")[0] for p in split["val"]].count("square") == 4  # stratified


def test_loaded_model_is_cam_exact_and_matches_the_training_validation(run, shapes):
    out, result = run
    model = camlens.load_model(str(out))
    assert isinstance(model.module, torch.nn.Module) and not model.module.training
    assert (model.labels, model.input_size) == (["circle", "square", "triangle"], (32, 32))
    paths = _val_paths(out, shapes)
    batch = model.preprocess(paths)
    head = find_cam_head(model.module, batch)
    assert head.cam_exact and head.classifier == "fc"
    explanation = camlens.explain(model, [str(p) for p in paths], method="cam")
    assert explanation.identity_error < 1e-4
    # Classifier.preprocess feeds the network the pixels training validated on.
    with torch.no_grad():
        predicted = model.module(batch).argmax(1)
    truth = torch.tensor([model.labels.index(p.parent.name) for p in paths])
    accuracy = (predicted == truth).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["best_val_accuracy"])


def test_explain_command_takes_the_model_folder(run, shapes, tmp_path):
    out, _ = run
    paths = [str(p) for p in _val_paths(out, shapes)[:3]]
    result = CliRunner().invoke(
        main, ["explain", *paths, "--model", str(out), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 0, result.output
    records = [
        json.loads(line) for line in (tmp_path / "x" / "results.jsonl").read_text().splitlines()
    ]
    assert [r["status"] for r in records] == ["ok"] * 3
    labels = {p["label"] for r in records for p in r["predictions"]}
    assert labels == {"circle", "square", "triangle"}


def test_same_seed_gives_identical_runs_and_another_seed_a_different_one(run, shapes, tmp_path):
    out, _ = run
    _train(shapes, tmp_path / "again")
    for name in ("metrics.json", "model.safetensors", "split.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    _train(shapes, tmp_path / "other", TrainConfig(**{**TINY.__dict__, "seed": 1}))
    assert (tmp_path / "other" / "metrics.json").read_bytes() != (out / "metrics.json").read_bytes()
    assert (
        json.loads((tmp_path / "other" / "split.json").read_text())["val"]
        != json.loads((out / "split.json").read_text())["val"]
    )


def test_resume_after_an_interruption_equals_an_uninterrupted_run(shapes, tmp_path):
    config = TrainConfig(epochs=4, image_size=32, batch_size=16, seed=3)
    _train(shapes, tmp_path / "whole", config)

    def interrupt(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(shapes, tmp_path / "cut", config, on_epoch_end=interrupt)
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert [e["epoch"] for e in cut["epochs"]] == [1, 2]
    torch.manual_seed(1234)  # the resumed run must restore every random state itself
    _train(shapes, tmp_path / "cut", config, resume=True)
    for name in ("metrics.json", "model.safetensors"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_previous_run_is_kept_unless_resumed_or_overwritten(run, shapes, tmp_path):
    out, _ = run
    before = _files(out)
    with pytest.raises(ConfigError, match=r"not empty.*resume=True.*overwrite=True.*another out"):
        _train(shapes, out)
    with pytest.raises(
        ConfigError, match=r"settings differ.*\(batch_size\) - batch_size: 16 then, 8 now"
    ):
        _train(shapes, out, TrainConfig(**{**TINY.__dict__, "batch_size": 8}), resume=True)
    assert _files(out) == before  # refused runs touch nothing
    with pytest.warns(UserWarning, match="nothing to resume"):
        _train(
            shapes, tmp_path / "fresh", TrainConfig(**{**TINY.__dict__, "epochs": 1}), resume=True
        )
    first = (tmp_path / "fresh" / "metrics.json").read_text()
    _train(
        shapes, tmp_path / "fresh", TrainConfig(**{**TINY.__dict__, "epochs": 1}), overwrite=True
    )
    assert (tmp_path / "fresh" / "metrics.json").read_text() == first


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _folder(root: Path, counts: dict[str, int], size=(20, 20)) -> Path:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_bad_data_sets_give_clear_errors(tmp_path):
    one = _folder(tmp_path / "one", {"cat": 3})
    with pytest.raises(ConfigError, match="at least two classes"):
        _train(one, tmp_path / "m1")
    assert not (tmp_path / "m1").exists()
    empty = _folder(tmp_path / "empty", {"cat": 3, "dog": 3})
    (empty / "bird").mkdir()
    with pytest.raises(ConfigError, match=r"'bird'.*contain no image files"):
        _train(empty, tmp_path / "m2")
    assert not (tmp_path / "m2").exists()
    broken = _folder(tmp_path / "broken", {"cat": 3, "dog": 0})
    (broken / "dog" / "x.png").write_bytes(b"not an image")
    with (
        pytest.warns(UserWarning, match="skipped 1 unreadable image"),
        pytest.raises(ConfigError, match=r"no readable image in class folder.*'dog'"),
    ):
        _train(broken, tmp_path / "m3")
    assert not (tmp_path / "m3").exists()  # nothing written for a data set that cannot train


def test_unreadable_images_are_skipped_and_counted_and_sizes_may_mix(tmp_path):
    data = _folder(tmp_path / "data", {"cat": 4, "dog": 2})
    _folder(tmp_path / "data", {"dog": 2}, size=(50, 13))  # overwrites dog/0, dog/1: mixed sizes
    (data / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (data / "dog" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\)") as caught:
        result = _train(data, tmp_path / "m", TrainConfig(epochs=1, image_size=16, val_split=0.25))
    assert any("bad.png" in str(w.message) for w in caught)
    assert sorted(p.name for p, _ in result.skipped) == ["bad.png", "empty.jpg"]
    assert (result.n_train, result.n_val) == (4, 2)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["training"]["n_skipped"] == 2 and config["training"]["n_images"] == 6
    split = json.loads((tmp_path / "m" / "split.json").read_text())
    assert sorted(Path(s["path"]).name for s in split["skipped"]) == ["bad.png", "empty.jpg"]


def test_train_command(shapes, tmp_path):
    runner = CliRunner()
    args = ["train", str(shapes), "--out", str(tmp_path / "m"), "--epochs", "1"]
    args += ["--image-size", "32", "--batch-size", "16", "--no-augment"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "trained on 48 images, validated on 12; best validation accuracy" in result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["training"]["augment"] is False
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "is not empty" in again.output
    (tmp_path / "one" / "cat").mkdir(parents=True)
    bad = runner.invoke(main, ["train", str(tmp_path / "one"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "Error:" in bad.output and "at least two classes" in bad.output
    assert not (tmp_path / "x").exists()  # a data set that cannot train leaves no --out


# --- the output folder's rules (those of every camlens command) ---------------------------


def test_refusals_name_the_options_of_the_interface_they_come_from(run, shapes, tmp_path):
    out, _ = run
    with pytest.raises(ConfigError) as python:
        _train(shapes, out)
    assert "resume=True" in str(python.value) and "overwrite=True" in str(python.value)
    assert "--resume" not in str(python.value) and "--overwrite" not in str(python.value)
    base = ["train", str(shapes), "--out", str(out), "--image-size", "32"]
    cli = CliRunner().invoke(main, [*base, "--epochs", "1"])
    assert cli.exit_code == 2
    assert "--resume" in cli.output and "--overwrite" in cli.output and "--out" in cli.output
    assert "=True" not in cli.output
    other = CliRunner().invoke(main, [*base, "--batch-size", "8", "--resume"])
    assert other.exit_code == 2 and "batch_size: 16 then, 8 now" in other.output
    assert "start again with --overwrite" in other.output
    both = CliRunner().invoke(main, [*base, "--resume", "--overwrite"])
    assert both.exit_code == 2 and "--resume and --overwrite exclude each other" in both.output
    (tmp_path / "file").write_text("mine")
    a_file = CliRunner().invoke(main, ["train", str(shapes), "--out", str(tmp_path / "file")])
    assert a_file.exit_code == 2 and "is a file" in a_file.output
    assert (tmp_path / "file").read_text() == "mine"


def test_overwrite_removes_the_old_run_and_keeps_the_users_files(shapes, tmp_path):
    out = tmp_path / "m"
    args = ["train", str(shapes), "--out", str(out), "--image-size", "32", "--batch-size", "16"]
    assert CliRunner().invoke(main, [*args, "--epochs", "2"]).exit_code == 0
    first_manifest = sorted((out / ".camlens" / "written").iterdir())
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"mine too")
    again = CliRunner().invoke(main, [*args, "--epochs", "1", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "plots" / "loss.png").read_bytes() == b"mine too"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1]  # the new run's, not the old one's
    manifest = sorted((out / ".camlens" / "written").iterdir())
    assert len(manifest) == 1 and manifest != first_manifest  # the old run's list is gone too
    fresh = tmp_path / "fresh"
    assert CliRunner().invoke(main, [*args, "--epochs", "1", "--out", str(fresh)]).exit_code == 0
    for name in ("metrics.json", "model.safetensors", "split.json"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name


def test_a_file_camlens_did_not_write_is_never_replaced(shapes, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("mine")  # e.g. a model folder of an older camlens
    with pytest.raises(ConfigError, match=r"config.json.*did not write"):
        _train(shapes, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # nothing else left
    assert (out / "config.json").read_text() == "mine"


def test_resume_with_other_data_is_refused_naming_what_differs(run, tmp_path):
    out, _ = run
    before = _files(out)
    other = _folder(tmp_path / "other", {"cat": 4, "dog": 4}, size=(32, 32))
    with pytest.raises(ConfigError, match=r"settings differ.*classes.*data.*n_images") as error:
        _train(other, out, resume=True)
    assert "overwrite=True" in str(error.value)
    assert _files(out) == before


def test_augmentation_is_seeded_and_scales_a_grey_image_by_its_brightness():
    grey = torch.full((5, 3, 8, 8), 100, dtype=torch.uint8)
    out = augment_batch(grey, torch.Generator().manual_seed(7))
    draws = torch.rand(5, 8, generator=torch.Generator().manual_seed(7))
    brightness = 0.8 + 0.4 * draws[:, 5]
    # Flip, crop, saturation and contrast leave a uniform grey image as it is.
    expected = (100 / 255 * brightness).clamp(0, 1).view(5, 1, 1, 1).expand(5, 3, 8, 8)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    pattern = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    first = augment_batch(pattern, torch.Generator().manual_seed(1))
    assert torch.equal(first, augment_batch(pattern, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, augment_batch(pattern, torch.Generator().manual_seed(2)))
    assert first.min() >= 0 and first.max() <= 1


@pytest.mark.parametrize(
    ("backbone", "recipe", "feature_layer", "in_channels"),
    [
        ("torchvision:resnet18", "replace-linear", None, None),
        ("torchvision:mobilenet_v3_small", "zhou", "features", 576),  # head: pool, MLP
        ("timm:mobilenetv3_small_050", "zhou", "blocks", 288),  # head: pool, 1x1 conv, linear
    ],
)
def test_other_backbones_become_cam_exact(
    shapes, tmp_path, backbone, recipe, feature_layer, in_channels
):
    pytest.importorskip(backbone.split(":")[0])
    config = TrainConfig(backbone=backbone, epochs=1, image_size=32, head_channels=16, seed=0)
    result = _train(shapes, tmp_path / "m", config)
    architecture = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]
    assert architecture["recipe"] == recipe
    assert architecture.get("feature_layer") == feature_layer
    assert architecture.get("in_channels") == in_channels
    model = camlens.load_model(tmp_path / "m")  # a trained folder: no random_weights needed
    assert model.module.get_submodule("fc").out_features == 3
    x = model.preprocess(_val_paths(tmp_path / "m", shapes)[:4])
    head = find_cam_head(model.module, x)
    assert head.cam_exact and head.classifier == "fc"
    if recipe == "zhou":
        assert head.feature_layer == "relu" and model.module.conv.out_channels == 16
    assert camlens.explain(model, x).identity_error < 1e-4
    assert result.metrics["best_val_accuracy"] is not None


def test_frozen_pretrained_backbone_trains_only_the_new_head(shapes, tmp_path):
    config = TrainConfig(backbone="efficientnet_lite0", epochs=1, image_size=32, seed=0)
    _train(shapes, tmp_path / "m", config)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["training"]["freeze_backbone"] is True and saved["training"]["lr"] == 3e-3
    assert saved["mean"] == [127 / 255] * 3
    trained = load_trained(tmp_path / "m").module.state_dict()
    pretrained = camlens.load_model("efficientnet_lite0").module.state_dict()
    changed = sorted(
        k
        for k in trained
        if not k.startswith("_fc.") and not torch.equal(trained[k], pretrained[k])
    )
    assert changed == []  # weights and batch-norm statistics of the backbone are untouched
    assert trained["_fc.weight"].shape == (3, 1280)


def test_a_model_trained_on_a_corner_tag_learns_the_tag(tmp_path):
    """The horse source-tag problem in small: every square carries a tag, nothing else does."""
    config = ShapesConfig(n=90, size=32, seed=0, shortcut="corner-tag", shortcut_class="square",
                          shortcut_rate=1.0)  # fmt: skip
    make_shapes_dataset(tmp_path / "data", config)
    _train(
        tmp_path / "data" / "images", tmp_path / "m", TrainConfig(epochs=10, image_size=32, seed=0)
    )
    model = load_trained(tmp_path / "m")
    square = model.labels.index("square")
    val = _val_paths(tmp_path / "m", tmp_path / "data" / "images")
    tagged = [p for p in val if p.parent.name == "square"]
    others = [p for p in val if p.parent.name != "square"]

    # On tagged squares the class map piles up in the tag's quarter of the image.
    maps = camlens.explain(model, [str(p) for p in tagged], target=square).maps[:, 0]
    quarter = maps[:, 16:, :16].sum(dim=(1, 2)) / maps.sum(dim=(1, 2))
    assert quarter.mean() > 0.4  # a uniform map would give 0.25

    # Pasting the tag on circles and triangles turns them into squares.
    x0, y0, x1, y1 = corner_box(32, "bottom-left")
    pasted = []
    for path in others:
        pixels = np.array(Image.open(path).convert("RGB"))
        pixels[y0:y1, x0:x1] = shortcut_patch("corner-tag", x1 - x0)
        pasted.append(Image.fromarray(pixels))
    before = camlens.explain(model, [str(p) for p in others]).targets[:, 0]
    after = camlens.explain(model, pasted).targets[:, 0]
    assert (before == square).float().mean() < 0.2
    assert (after == square).float().mean() > 0.8


def test_on_clean_data_the_class_map_concentrates_on_the_object(tmp_path):
    info = make_shapes_dataset(
        tmp_path / "data", ShapesConfig(n=200, size=32, seed=0, classes=("circle", "cross"))
    )
    result = _train(
        tmp_path / "data" / "images", tmp_path / "m", TrainConfig(epochs=12, image_size=32, seed=0)
    )
    assert result.metrics["best_val_accuracy"] >= 0.8
    model = load_trained(tmp_path / "m")
    boxes = {r["image"]: r["box"] for r in info["images"]}
    val = json.loads((tmp_path / "m" / "split.json").read_text())["val"]
    truth = [[model.labels.index(p.split("/")[0])] for p in val]
    paths = [str(tmp_path / "data" / "images" / p) for p in val]
    explanation = camlens.explain(model, paths, target=truth)
    inside, area = [], []
    for i, path in enumerate(val):
        box = boxes[f"images/{path}"]
        inside.append(energy_pointing_game(explanation.heatmap(i, 0, original=True), [box]))
        area.append((box[2] - box[0]) * (box[3] - box[1]) / 32**2)
    # The share of the map's mass on the object's box, over the share of the image the box
    # covers: 1 for a map that ignores the object (measured here: 1.76; data seeds 1, 2: 2.31,
    # 2.27).
    assert np.mean(inside) / np.mean(area) > 1.4
