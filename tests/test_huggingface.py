"""Hugging Face ``transformers`` image classifiers: ``load_model("hf:FOLDER")``, offline.

The folders are written here by ``save_pretrained`` from tiny configs with seeded random
weights (no Hub access): labels from ``id2label``, logits from the output object, the
preprocessing from ``preprocessor_config.json``, CAM exact on ResNet, Grad-CAM against
autograd and pytorch-grad-cam, the error messages, and the command line and the server.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

import camlens
from camlens import CAM, ConfigError, GradCAM
from camlens.cli import main
from camlens.io import resized_pixels
from camlens.models.classifier import IMAGENET_MEAN, IMAGENET_STD

transformers = pytest.importorskip("transformers")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Not in alphabetical order, so that labels sorted by name would be wrong.
ID2LABEL = {0: "zebra", 1: "apple", 2: "mango"}
LABELS = ["zebra", "apple", "mango"]


def _resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], id2label=ID2LABEL
    )
    return transformers.ResNetForImageClassification(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=ID2LABEL,
    )
    return transformers.ViTForImageClassification(config)


def _deit_config() -> transformers.DeiTConfig:
    return transformers.DeiTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=ID2LABEL,
    )


def _deit() -> nn.Module:
    return transformers.DeiTForImageClassification(_deit_config())


def _deit_teacher() -> nn.Module:
    """DeiT's distilled head (the mean of a class-token and a distillation-token classifier):
    config.json's ``architectures`` picks it, not AutoModel's first DeiT class."""
    return transformers.DeiTForImageClassificationWithTeacher(_deit_config())


def _convnext() -> nn.Module:
    config = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], id2label=ID2LABEL
    )
    return transformers.ConvNextForImageClassification(config)


def _swin() -> nn.Module:
    config = transformers.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=4,
        id2label=ID2LABEL,
    )
    return transformers.SwinForImageClassification(config)


BUILDERS = {
    "resnet": _resnet,
    "vit": _vit,
    "deit": _deit,
    "deit_teacher": _deit_teacher,
    "convnext": _convnext,
    "swin": _swin,
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    """name -> (its folder, the model that wrote it), seeded random weights. ResNet and
    ConvNeXt get a 32 x 32 ``preprocessor_config.json`` (the others: config.json's size)."""
    root = tmp_path_factory.mktemp("hf")
    made = {}
    for seed, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(seed)
        model = build().eval()
        folder = root / name
        model.save_pretrained(folder, safe_serialization=True)
        if name in ("resnet", "convnext"):
            transformers.ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
        made[name] = (folder, model)
    return made


def _noise_png(path: Path, width: int = 40, height: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_labels_are_id2label_and_logits_are_the_models_own(hf, name):
    folder, model = hf[name]
    classifier = camlens.load_model(f"hf:{folder}")
    assert classifier.labels == LABELS
    assert classifier.output == "logits" and not classifier.module.training
    assert classifier.info["architecture"] == type(model).__name__
    x = torch.randn(2, 3, *classifier.input_size)
    with torch.no_grad():
        expected = model(x).logits
        ours = camlens.explain(classifier, x, method="gradcam").logits
    assert torch.equal(ours, expected)


def test_labels_given_replace_id2label_and_are_counted(hf):
    folder = hf["resnet"][0]
    assert camlens.load_model(f"hf:{folder}", labels=["a", "b", "c"]).labels == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="names 2 classes but the model has 3 outputs"):
        camlens.load_model(f"hf:{folder}", labels=["a", "b"])


def test_preprocessing_uses_the_saved_size_mean_and_std(tmp_path):
    folder = tmp_path / "vit"
    _vit().save_pretrained(folder)
    processor = transformers.ViTImageProcessor(
        size={"height": 24, "width": 40}, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.6, 0.7]
    )
    processor.save_pretrained(folder)
    classifier = camlens.load_model(f"hf:{folder}")
    assert classifier.input_size == (24, 40)
    assert classifier.info["preprocessing"] == "preprocessor_config.json"
    image = Image.open(_noise_png(tmp_path / "x.png", width=40, height=24)).convert("RGB")
    ours = classifier.preprocess([image])
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).double() / 255
    mean = torch.tensor([0.1, 0.2, 0.3], dtype=torch.double).view(3, 1, 1)
    std = torch.tensor([0.5, 0.6, 0.7], dtype=torch.double).view(3, 1, 1)
    torch.testing.assert_close(ours[0].double(), (pixels - mean) / std, rtol=0, atol=1e-5)
    theirs = processor(image, return_tensors="pt")["pixel_values"]  # the model's own processor
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    # a larger photo is resized whole to 24 x 40 (no crop)
    big = Image.open(_noise_png(tmp_path / "big.png", width=100, height=90)).convert("RGB")
    resized = torch.from_numpy(resized_pixels(big, (24, 40)).copy()).permute(2, 0, 1).double() / 255
    torch.testing.assert_close(
        classifier.preprocess([big])[0].double(), (resized - mean) / std, rtol=0, atol=1e-5
    )


def test_rescale_factor_and_no_normalisation_are_folded_into_mean_and_std(tmp_path):
    folder = tmp_path / "resnet"
    _resnet().save_pretrained(folder)
    settings = {"size": {"shortest_edge": 16}, "rescale_factor": 1 / 127.5, "do_normalize": False}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    classifier = camlens.load_model(f"hf:{folder}")
    assert classifier.input_size == (16, 16)
    pixels = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(
        classifier.normalize(pixels).flatten(), torch.tensor([0.0, 2.0, 0.4]), atol=1e-6, rtol=0
    )


def test_without_preprocessor_config_the_config_size_and_imagenet_statistics(hf):
    classifier = camlens.load_model(f"hf:{hf['vit'][0]}")
    assert classifier.input_size == (32, 32)
    assert (classifier.mean, classifier.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert classifier.info["preprocessing"] == "config.json and ImageNet defaults"


# --- maps ------------------------------------------------------------------------------------


def test_cam_on_hf_resnet_is_exact_and_equals_gradcam_times_hw(hf):
    classifier = camlens.load_model(f"hf:{hf['resnet'][0]}")
    x = torch.randn(2, 3, 32, 32)
    result = CAM(classifier.module, output="logits").run(x, "top3")
    assert result.layer == "resnet.encoder.stages.1"
    assert result.identity_error / float(result.logits.abs().max()) < 1e-4
    grad = GradCAM(classifier.module, output="logits")(x, "top3")
    h, w = result.raw.shape[-2:]
    torch.testing.assert_close(grad * h * w, result.raw, rtol=1e-4, atol=1e-5)


def _gradcam_by_hand(model: nn.Module, layer: nn.Module, x, cls: int, prefix: int | None):
    """Grad-CAM by autograd at ``layer``: tokens (prefix dropped, 4 x 4 grid) or maps."""
    kept = {}
    handle = layer.register_forward_hook(lambda m, i, o: kept.setdefault("a", o))
    try:
        logits = model(x).logits
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(logits[0, cls], kept["a"])
    a, g = kept["a"][0].detach(), grads[0]
    if prefix is not None:  # (T, C) -> (C, 4, 4)
        a, g = (t[prefix:].T.reshape(-1, 4, 4) for t in (a, g))
    return (a * g.mean(dim=(1, 2), keepdim=True)).sum(0)


def test_gradcam_on_hf_resnet_equals_autograd(hf):
    model = hf["resnet"][1]
    classifier = camlens.load_model(f"hf:{hf['resnet'][0]}")
    x = torch.randn(1, 3, 32, 32)
    raw = camlens.explain(classifier, x, method="gradcam", target=[[2]]).raw
    expected = _gradcam_by_hand(model, model.resnet.encoder.stages[-1], x, 2, None)
    torch.testing.assert_close(raw[0, 0], expected, rtol=1e-4, atol=1e-6)


class _Logits(nn.Module):
    """The logits tensor of a Hugging Face model (what pytorch-grad-cam needs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


@pytest.mark.parametrize(("name", "prefix"), [("vit", 1), ("deit", 2)])
def test_gradcam_on_hf_vit_and_deit_at_the_last_blocks_first_norm(hf, name, prefix):
    folder, model = hf[name]
    classifier = camlens.load_model(f"hf:{folder}")
    norm = model.base_model.get_submodule(classifier.layer.split(".", 1)[1])
    assert classifier.layer.endswith(".1.layernorm_before")  # the last of 2 blocks
    x = torch.randn(1, 3, 32, 32)
    result = camlens.explain(classifier, x, method="gradcam", target=[[1]])
    assert result.layer == classifier.layer and result.raw.shape == (1, 1, 4, 4)
    expected = _gradcam_by_hand(model, norm, x, 1, prefix)
    torch.testing.assert_close(result.raw[0, 0], expected, rtol=1e-4, atol=1e-7)
    if name == "vit":  # and pytorch-grad-cam with its ViT reshape, 4 x 4 grid
        with pgc.GradCAM(
            model=_Logits(model),
            target_layers=[norm],
            reshape_transform=lambda t: vit_reshape_transform(t, 4, 4),
        ) as cam:
            theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(1)])[0]
        ours = result.raw[0, 0].double().relu()
        ours = (ours - ours.min()) / (1e-7 + (ours - ours.min()).max())
        ours = F.interpolate(ours[None, None], size=(32, 32), mode="bilinear")[0, 0]
        assert np.corrcoef(ours.numpy().ravel(), theirs.ravel())[0, 1] >= 0.99


def test_cam_refused_on_hf_convnext_and_vit_exact_on_hf_swin(hf):
    x = torch.randn(1, 3, 32, 32)
    convnext = camlens.load_model(f"hf:{hf['convnext'][0]}")
    with pytest.raises(ConfigError, match=r"normalisation \('convnext.layernorm'.*gradcam"):
        camlens.explain(convnext, x, method="cam")
    assert camlens.explain(convnext, x, method="gradcam").layer == "convnext.encoder.stages.1"
    vit = camlens.load_model(f"hf:{hf['vit'][0]}")
    with pytest.raises(ConfigError, match="CAM would not be exact; use method='gradcam'"):
        camlens.explain(vit, x, method="cam")
    swin = camlens.load_model(f"hf:{hf['swin'][0]}")
    result = CAM(swin.module, output="logits").run(x, "top3")
    assert result.raw.shape == (1, 3, 4, 4)  # 32 px / (patch 4 x merging 2) = 4 x 4 tokens
    assert result.identity_error / float(result.logits.abs().max()) < 1e-4


# --- errors ----------------------------------------------------------------------------------


def test_a_missing_folder_or_config_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"nope does not exist; .*save_pretrained") as error:
        camlens.load_model(f"hf:{tmp_path / 'nope'}")
    assert str(tmp_path / "nope") in str(error.value)
    with pytest.raises(ConfigError, match=r"'hf:' names no folder"):
        camlens.load_model("hf:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty has no config.json.*save_pretrained"):
        camlens.load_model(f"hf:{tmp_path / 'empty'}")


def test_a_model_that_is_not_an_image_classifier_is_refused(tmp_path):
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.ViTModel(config).save_pretrained(tmp_path / "backbone")
    with pytest.raises(ConfigError, match=r"describes a ViTModel, not an image classifier") as e:
        camlens.load_model(f"hf:{tmp_path / 'backbone'}")
    assert str(tmp_path / "backbone" / "config.json") in str(e.value)
    assert "ViTForImageClassification" in str(e.value)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"type 'bert'.*not an image classifier"):
        camlens.load_model(f"hf:{bert}")


def test_missing_or_pickled_or_partial_weights_are_refused(tmp_path, hf):
    folder = tmp_path / "no_weights"
    shutil.copytree(hf["resnet"][0], folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"no_weights has no weights \(model.safetensors"):
        camlens.load_model(f"hf:{folder}")
    assert camlens.load_model(f"hf:{folder}", random_weights=True).labels == LABELS
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"pytorch_model.bin, pickled weights.*safetensors"):
        camlens.load_model(f"hf:{folder}")
    other = tmp_path / "other"  # ResNet weights, a deeper config: some weights are missing
    shutil.copytree(hf["resnet"][0], other)
    config = json.loads((other / "config.json").read_text())
    config["depths"] = [2, 1]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"does not hold every weight .*random weights"):
        camlens.load_model(f"hf:{other}")
    damaged = tmp_path / "damaged"
    shutil.copytree(hf["resnet"][0], damaged)
    (damaged / "model.safetensors").write_bytes(b"\x08" + b"\0" * 20)
    with pytest.raises(ConfigError, match=r"damaged from model.safetensors: .*save_pretrained"):
        camlens.load_model(f"hf:{damaged}")


def test_without_transformers_the_message_names_the_extra(hf, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    with pytest.raises(ConfigError, match=r"need the 'hf' extra .*pip install 'camlens\[hf\]'"):
        camlens.load_model(f"hf:{hf['resnet'][0]}")


def test_a_hf_folder_without_the_prefix_suggests_it(hf):
    folder = hf["resnet"][0]
    with pytest.raises(ConfigError, match=rf"load it with --model hf:{folder}"):
        camlens.load_model(folder)
    with pytest.raises(ConfigError, match="own weights and classes"):
        camlens.load_model(f"hf:{folder}", num_classes=3)


# --- command line and server ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "method"), [("resnet", "cam"), ("vit", "gradcam")])
def test_cli_explain_writes_maps_with_the_hf_labels(hf, tmp_path, name, method):
    photo = _noise_png(tmp_path / "photo.png")
    out = tmp_path / "out"
    args = ["explain", str(photo), "--model", f"hf:{hf[name][0]}", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--method", method, "--target", "top3"])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["method"] == method
    assert sorted(p["label"] for p in record["predictions"]) == sorted(LABELS)
    assert [m["label"] for m in record["maps"]] == [p["label"] for p in record["predictions"]]
    for entry in record["maps"]:
        assert LABELS[entry["class"]] == entry["label"]
        assert (out / entry["overlay"]).is_file()
    assert (out / record["raw"]).is_file()


@pytest.mark.parametrize(("name", "method"), [("resnet", "cam"), ("vit", "gradcam")])
def test_serve_explains_with_a_hf_model(hf, tmp_path, monkeypatch, name, method):
    served = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: served.setdefault("app", app))
    spec = f"hf:{hf[name][0]}"
    result = CliRunner().invoke(main, ["serve", "--model", spec, "--method", method])
    assert result.exit_code == 0, result.output
    with TestClient(served["app"], base_url="http://localhost") as client:
        assert client.get("/api/labels").json()["labels"] == LABELS
        picture = _noise_png(tmp_path / "x.png").read_bytes()
        response = client.post(
            "/api/explain",
            data={"model": spec, "target": "top2"},
            files={"file": ("x.png", picture, "image/png")},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == spec and body["method"] == method
    assert len(body["maps"]) == 2
    assert all(m["label"] == LABELS[m["class"]] for m in body["maps"])
    assert all(m["overlay"].startswith("data:image/png;base64,") for m in body["maps"])
    if name == "vit":
        assert body["layer"].endswith(".1.layernorm_before")
    else:
        assert body["identity_error"] < 1e-4
