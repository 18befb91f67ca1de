"""Models users bring: checkpoints, TorchScript, pickled modules, labels, many architectures."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens import ConfigError, GradCAM
from camlens.cli import main
from camlens.models.labels import read_labels

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

X = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


def _logits(classifier: camlens.Classifier) -> torch.Tensor:
    with torch.no_grad():
        return classifier.module(X)


@pytest.fixture(scope="module")
def resnet3(tmp_path_factory):
    """A torchvision ResNet-18 with 3 classes, its logits on X, and its files on disk."""
    torch.manual_seed(3)
    module = tv.models.resnet18(weights=None, num_classes=3).eval()
    folder = tmp_path_factory.mktemp("resnet3")
    files = {
        "pt": folder / "weights.pt",
        "safetensors": folder / "weights.safetensors",
        "pickled": folder / "whole_model.pth",
        "torchscript": folder / "scripted.pt",
    }
    torch.save(module.state_dict(), files["pt"])
    safetensors_torch.save_file(module.state_dict(), files["safetensors"])
    torch.save(module, files["pickled"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        torch.jit.script(module).save(files["torchscript"])
    with torch.no_grad():
        expected = module(X)
    return module, expected, files


# --- state dicts for named architectures --------------------------------------------------


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_torchvision_state_dict_gives_identical_logits_and_three_classes(resnet3, kind):
    _, expected, files = resnet3
    model = camlens.load_model("torchvision:resnet18", weights=files[kind])
    assert torch.equal(_logits(model), expected)
    assert model.labels == ["0", "1", "2"]
    assert model.module.fc.out_features == 3 and not model.module.training


def test_timm_state_dict_gives_identical_logits(tmp_path):
    torch.manual_seed(4)
    module = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    torch.save(module.state_dict(), tmp_path / "timm.pt")
    safetensors_torch.save_file(module.state_dict(), tmp_path / "timm.safetensors")
    with torch.no_grad():
        expected = module(X)
    for name in ("timm.pt", "timm.safetensors"):
        model = camlens.load_model("timm:resnet18", weights=tmp_path / name)
        assert torch.equal(_logits(model), expected)
        assert model.labels == ["0", "1", "2"]


def test_nested_and_prefixed_checkpoint_loads(resnet3, tmp_path):
    module, expected, _ = resnet3
    lightning_style = {
        "epoch": 7,
        "state_dict": {f"model.{k}": v for k, v in module.state_dict().items()},
    }
    torch.save(lightning_style, tmp_path / "last.ckpt")
    model = camlens.load_model("torchvision:resnet18", weights=tmp_path / "last.ckpt")
    assert torch.equal(_logits(model), expected)


def test_builtin_model_takes_fine_tuned_weights_with_its_own_class_count(tmp_path):
    fine_tuned = camlens.load_model("efficientnet_lite0", num_classes=4, random_weights=True).module
    with torch.no_grad():
        fine_tuned._fc.weight.normal_()
    safetensors_torch.save_file(fine_tuned.state_dict(), tmp_path / "lite4.safetensors")
    model = camlens.load_model(weights=tmp_path / "lite4.safetensors")
    assert model.module._fc.out_features == 4 and model.labels == ["0", "1", "2", "3"]
    with torch.no_grad():
        torch.testing.assert_close(model.module(X), fine_tuned.eval()(X), rtol=0, atol=0)


def test_weights_of_another_architecture_are_refused_with_the_names(resnet3):
    _, _, files = resnet3
    with pytest.raises(ConfigError, match=r"torchvision:resnet34: missing \(96\): layer1\.2"):
        camlens.load_model("torchvision:resnet34", weights=files["pt"])


def test_num_classes_conflicting_with_the_weights(resnet3):
    _, _, files = resnet3
    with pytest.raises(ConfigError, match=r"num_classes=5 but the weights .* have 3 classes"):
        camlens.load_model("torchvision:resnet18", weights=files["pt"], num_classes=5)


def test_num_classes_without_weights_builds_that_head():
    model = camlens.load_model("torchvision:resnet18", num_classes=7, random_weights=True)
    assert model.labels == list("0123456")


# --- whole-model files ------------------------------------------------------------------


def test_state_dict_alone_as_model_asks_for_an_architecture(resnet3):
    _, _, files = resnet3
    for kind in ("pt", "safetensors"):
        with pytest.raises(ConfigError, match="--model torchvision:resnet18 --weights"):
            camlens.load_model(files[kind])


def test_torchscript_round_trip_gives_identical_logits(resnet3):
    _, expected, files = resnet3
    model = camlens.load_model(files["torchscript"])
    assert torch.equal(_logits(model), expected)
    assert model.labels == ["0", "1", "2"] and model.info["format"] == "torchscript"
    # its weights also serve a named architecture, which camlens can hook and explain
    named = camlens.load_model("torchvision:resnet18", weights=files["torchscript"])
    assert torch.equal(_logits(named), expected)


def test_pickled_module_refused_unless_trusted(resnet3):
    _, expected, files = resnet3
    with pytest.raises(ConfigError) as refused:
        camlens.load_model(files["pickled"])
    message = str(refused.value)
    assert "--trust-model" in message and "trust_model=True" in message
    assert "torchvision.models.resnet.ResNet" in message and "runs code" in message
    with pytest.raises(ConfigError, match="--trust-model"):  # also as weights
        camlens.load_model("torchvision:resnet18", weights=files["pickled"])
    trusted = camlens.load_model(files["pickled"], trust_model=True)
    assert torch.equal(_logits(trusted), expected)
    as_weights = camlens.load_model(
        "torchvision:resnet18", weights=files["pickled"], trust_model=True
    )
    assert torch.equal(_logits(as_weights), expected)


@pytest.mark.parametrize("content", [b"hello, not a model\n", bytes(range(256)) * 4])
def test_unreadable_file_is_not_blamed_on_trust(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"cannot read .*broken.pt") as error:
        camlens.load_model(path)
    assert "--trust-model" not in str(error.value)


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet9000'"):
        camlens.load_model("torchvision:resnet9000")
    with pytest.raises(ConfigError, match="timm has no model 'resnet9000'"):
        camlens.load_model("timm:resnet9000")
    with pytest.raises(ConfigError, match=r"no such file or folder.*efficientnet_lite0"):
        camlens.load_model("missing_model.pt")


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match=r"without config.json.*camlens train"):
        camlens.load_model(tmp_path)


def test_folder_with_config_json_goes_to_the_trained_model_loader(tmp_path, monkeypatch):
    trained = pytest.importorskip("camlens.models.trained")
    (tmp_path / "config.json").write_text("{}")
    built = camlens.Classifier(module=tv.models.resnet18(weights=None, num_classes=2), labels=[])
    seen = []
    monkeypatch.setattr(trained, "load_trained", lambda path: seen.append(path) or built)
    model = camlens.load_model(str(tmp_path), labels=["cat", "dog"])
    assert seen == [tmp_path] and model is built and model.labels == ["cat", "dog"]
    with pytest.raises(ConfigError, match="own weights"):
        camlens.load_model(tmp_path, weights=tmp_path / "config.json")


# --- labels -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("labels.txt", "  cat\n\ndog \n bird\n\n"),
        ("labels.json", '["cat", "dog", "bird"]'),
        ("labels.json", '{"2": "bird", "0": "cat", "1": "dog"}'),
        ("labels.json", '{"dog": 1, "bird": 2, "cat": 0}'),
    ],
)
def test_labels_from_text_and_json(resnet3, tmp_path, name, text):
    _, _, files = resnet3
    (tmp_path / name).write_text(text)
    assert read_labels(tmp_path / name) == ["cat", "dog", "bird"]
    model = camlens.load_model("torchvision:resnet18", weights=files["pt"], labels=tmp_path / name)
    assert model.labels == ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    "text", ['{"0": "cat", "2": "dog"}', '{"cat": 0, "dog": 0}', '{"a": "b"}', "[1, 2]"]
)
def test_bad_json_labels(tmp_path, text):
    (tmp_path / "labels.json").write_text(text)
    with pytest.raises(ConfigError, match="labels file"):
        read_labels(tmp_path / "labels.json")


def test_label_count_must_match_the_classes(resnet3, tmp_path):
    _, _, files = resnet3
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    with pytest.raises(ConfigError, match="names 2 classes but the model has 3 outputs"):
        camlens.load_model("torchvision:resnet18", weights=files["pt"], labels=tmp_path / "two.txt")
    with pytest.raises(ConfigError, match="names 4 classes but the model has 3 outputs"):
        camlens.load_model("torchvision:resnet18", weights=files["pt"], labels=list("abcd"))


# --- command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _explain(*args: str):
    return CliRunner().invoke(main, ["explain", *map(str, args)])


def test_cli_refuses_pickled_module_with_exit_2_and_loads_it_when_trusted(resnet3, photo, tmp_path):
    _, _, files = resnet3
    refused = _explain(photo, "--out", tmp_path / "a", "--model", files["pickled"])
    assert refused.exit_code == 2 and "--trust-model" in refused.output
    assert not (tmp_path / "a" / "results.jsonl").exists()
    trusted = _explain(photo, "--out", tmp_path / "b", "--model", files["pickled"], "--trust-model")
    assert trusted.exit_code == 0, trusted.output


def test_cli_weights_and_labels_reach_the_predictions(resnet3, photo, tmp_path):
    _, _, files = resnet3
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    result = _explain(
        photo,
        "--out",
        tmp_path / "out",
        "--model",
        "torchvision:resnet18",
        "--weights",
        files["safetensors"],
        "--labels",
        tmp_path / "labels.txt",
    )
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()]
    model = camlens.load_model("torchvision:resnet18", weights=files["safetensors"])
    with torch.no_grad():
        probs = model.module(model.preprocess(photo)).softmax(1)[0]
    names = ["cat", "dog", "bird"]
    assert [p["label"] for p in record["predictions"]] == [
        names[int(i)] for i in probs.argsort(descending=True)
    ]
    assert [p["prob"] for p in record["predictions"]] == pytest.approx(
        probs.sort(descending=True).values.tolist(), abs=1e-5
    )


def test_cli_label_count_mismatch_exits_2(resnet3, photo, tmp_path):
    _, _, files = resnet3
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    result = _explain(
        photo,
        "--out",
        tmp_path / "out",
        "--model",
        "torchvision:resnet18",
        "--weights",
        files["pt"],
        "--labels",
        tmp_path / "labels.txt",
    )
    assert result.exit_code == 2 and "names 2 classes but the model has 3 outputs" in result.output


def test_cli_torchscript_refused_with_the_way_to_explain_it(resnet3, photo, tmp_path):
    _, _, files = resnet3
    result = _explain(photo, "--out", tmp_path / "out", "--model", files["torchscript"])
    assert result.exit_code == 2
    assert "TorchScript" in result.output and "--weights" in result.output


# --- architectures through load_model ---------------------------------------------------------

ARCHITECTURES = [
    "torchvision:resnet18",
    "torchvision:vgg11",
    "torchvision:densenet121",
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:convnext_tiny",
    "torchvision:regnet_y_400mf",
    "timm:efficientnet_b0",
]
CAM_REFUSED = {"torchvision:vgg11", "torchvision:mobilenet_v3_small", "torchvision:convnext_tiny"}


@pytest.fixture(scope="module")
def architectures():
    torch.manual_seed(0)
    return {spec: camlens.load_model(spec, random_weights=True) for spec in ARCHITECTURES}


@pytest.mark.parametrize("spec", ARCHITECTURES)
def test_architecture_through_load_model(architectures, spec):
    """Grad-CAM via the API equals Grad-CAM on the module; CAM is exact or clearly refused."""
    model = architectures[spec]
    x = X[:1]
    result = camlens.explain(model, x, method="gradcam")
    direct = GradCAM(model.module).run(x, "top1")
    torch.testing.assert_close(result.raw, direct.raw, rtol=0, atol=0)
    torch.testing.assert_close(result.logits, direct.logits)
    assert result.raw.shape[-2:] != (1, 1) and result.raw.abs().sum() > 0
    assert result.maps.shape[-2:] == (64, 96)
    if spec in CAM_REFUSED:
        with pytest.raises(ConfigError, match="gradcam"):
            camlens.explain(model, x, method="cam")
        return
    cam = camlens.explain(model, x, method="cam")
    assert cam.identity_error / float(cam.logits.abs().max()) < 1e-4
    assert torch.equal(cam.targets, result.targets)


@pytest.mark.parametrize(
    "name",
    ["lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "fcn_resnet50"],
)
def test_torchvision_builders_with_a_pretrained_backbone_default_stay_offline(name, monkeypatch):
    """Detection and segmentation builders default ``weights_backbone`` to ImageNet weights:
    building one must not try to download them (here, any download raises)."""
    import torch.hub

    from camlens.models.architectures import module_builder

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    module = module_builder(f"torchvision:{name}")()
    assert sum(p.numel() for p in module.parameters()) > 1_000_000
