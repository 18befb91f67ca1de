"""A network with random weights is refused unless asked for: load_model and every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens import ConfigError
from camlens.cli import main
from camlens.cli.common import ModelChoice, ModelFiles
from camlens.models.architectures import build_architecture
from camlens.training import make_network

tv = pytest.importorskip("torchvision")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _assert_refusal(message: str) -> None:
    """The message says what is wrong and both ways out, for the CLI and for Python."""
    assert "random weights" in message
    assert "--weights FILE" in message and "weights='FILE'" in message
    assert "--random-weights" in message and "random_weights=True" in message
    assert "tests and sanity checks" in message


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def resnet3_weights(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    module = tv.models.resnet18(weights=None, num_classes=3)
    path = tmp_path_factory.mktemp("weights") / "resnet3.safetensors"
    safetensors_torch.save_file(module.state_dict(), path)
    return path


# --- Python: load_model ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18"])
def test_library_architecture_without_weights_is_refused(spec):
    pytest.importorskip(spec.split(":")[0])
    with pytest.raises(ConfigError) as refused:
        camlens.load_model(spec)
    _assert_refusal(str(refused.value))
    assert spec in str(refused.value)
    with pytest.raises(ConfigError, match="random weights"):  # also with a class count
        camlens.load_model(spec, num_classes=3)


def test_builtin_model_with_other_classes_and_no_weights_is_refused():
    with pytest.raises(ConfigError) as refused:
        camlens.load_model("efficientnet_lite0", num_classes=4)
    _assert_refusal(str(refused.value))
    assert "4 classes instead of its 1000" in str(refused.value)
    # its own class count keeps its pretrained weights: nothing random
    model = camlens.load_model("efficientnet_lite0", num_classes=1000)
    assert model.labels[285] == camlens.load_model().labels[285]
    allowed = camlens.load_model("efficientnet_lite0", num_classes=4, random_weights=True)
    assert allowed.module._fc.out_features == 4 and allowed.labels == list("0123")


def test_random_weights_true_builds_the_architecture():
    torch.manual_seed(0)
    model = camlens.load_model("torchvision:resnet18", random_weights=True)
    assert model.module.fc.out_features == 1000 and not model.module.training
    assert model.labels[:3] == ["0", "1", "2"] and model.name == "torchvision:resnet18"
    with torch.no_grad():
        assert model.module(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)


def test_weights_file_needs_no_flag(resnet3_weights):
    model = camlens.load_model("torchvision:resnet18", weights=resnet3_weights)
    assert model.module.fc.out_features == 3 and model.labels == ["0", "1", "2"]
    expected = safetensors_torch.load_file(resnet3_weights)["fc.weight"]
    assert torch.equal(model.module.fc.weight, expected)


def test_unknown_architecture_is_named_before_weights_are_asked_for():
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet9000'"):
        camlens.load_model("torchvision:resnet9000")


def test_pretrained_models_and_modules_are_unaffected():
    assert camlens.load_model().labels[285] == "Egyptian cat"  # the built-in default
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    assert camlens.load_model(module).labels == ["0", "1"]


# --- training builds its backbone directly ----------------------------------------------------


def test_training_builds_library_backbones_without_load_model():
    network = make_network("torchvision:resnet18", 3)
    assert network.architecture["recipe"] == "replace-linear" and not network.pretrained
    assert network.module.fc.out_features == 3
    assert build_architecture("torchvision:resnet18", num_classes=5).module.fc.out_features == 5
    with pytest.raises(ConfigError, match="unknown architecture 'nope'"):
        make_network("nope", 3)


# --- command line ----------------------------------------------------------------------------


def test_cli_explain_refuses_random_weights_and_writes_nothing(photo, tmp_path):
    out = tmp_path / "o"
    args = ["explain", str(photo), "--out", str(out), "--model", "torchvision:resnet18"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "--weights" in result.output and "--random-weights" in result.output
    assert "random weights" in result.output
    assert not out.exists()


def test_cli_explain_with_random_weights_flag_runs(photo, tmp_path):
    out = tmp_path / "o"
    args = ["explain", str(photo), "--out", str(out), "--model", "torchvision:resnet18"]
    result = CliRunner().invoke(main, [*args, "--random-weights", "--method", "gradcam"])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert record["status"] == "ok"


def test_cli_explain_with_weights_file_needs_no_flag(photo, resnet3_weights, tmp_path):
    out = tmp_path / "o"
    args = ["explain", str(photo), "--out", str(out), "--model", "torchvision:resnet18"]
    result = CliRunner().invoke(main, [*args, "--weights", str(resnet3_weights)])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "results.jsonl").open()]
    assert sorted(p["label"] for p in record["predictions"]) == ["0", "1", "2"]


def test_cli_audit_refuses_random_weights(photo, tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.open(photo).save(tmp_path / "data" / name / "a.png")
    out = tmp_path / "audit"
    args = ["audit", str(tmp_path / "data"), "--out", str(out), "--model", "timm:resnet18"]
    pytest.importorskip("timm")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "--weights" in result.output and "--random-weights" in result.output
    assert not out.exists()


def test_help_lists_the_flag():
    assert "--random-weights" in CliRunner().invoke(main, ["explain", "--help"]).output


def test_the_model_choice_of_the_command_line_takes_the_flag():
    with pytest.raises(ConfigError, match="--random-weights"):
        ModelChoice("torchvision:resnet18").load("cpu")
    model = ModelChoice("torchvision:resnet18", ModelFiles(random_weights=True)).load("cpu")
    assert model.module.fc.out_features == 1000
