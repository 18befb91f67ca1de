"""The public Python API: load_model, explain, Explanation.save."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens.io.samples import write_samples
from tiny_models import SharedActNet


def test_load_model_wraps_a_module_with_default_preprocess():
    module = SharedActNet()
    model = camlens.load_model(module, labels=list("abcde"), input_size=(16, 20))
    assert model.module is module and module.training  # the caller's module keeps its mode
    assert model.labels == ["a", "b", "c", "d", "e"]
    batch = model.preprocess([Image.new("RGB", (7, 3), (255, 0, 0))])
    assert batch.shape == (1, 3, 16, 20)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(camlens.models.IMAGENET_MEAN)) / (
        torch.tensor(camlens.models.IMAGENET_STD)
    )
    torch.testing.assert_close(batch[0, :, 5, 5], expected)


def test_load_model_without_labels_names_classes_by_index():
    assert camlens.load_model(SharedActNet()).labels == ["0", "1", "2", "3", "4"]


def test_unknown_model_lists_available():
    with pytest.raises(camlens.ConfigError, match="efficientnet_lite0"):
        camlens.load_model("resnet9000")


def test_explain_paths_and_tensor_agree(builtin_model, tmp_path):
    (path,) = write_samples(tmp_path, ["coffee"])
    from_path = camlens.explain(builtin_model, path)
    tensor = builtin_model.preprocess([path])
    from_tensor = camlens.explain(builtin_model, tensor)
    torch.testing.assert_close(from_path.raw, from_tensor.raw)
    assert from_path.targets.tolist() == [[967]] and from_tensor.images is None
    assert from_path.original_size(0) == (600, 400)  # (width, height) of skimage coffee


def test_explanation_save_writes_contract_files(builtin_model, sample_photos, tmp_path):
    result = camlens.explain(builtin_model, sample_photos, target="top2")
    records = result.save(tmp_path, names=["cat.png", "coffee.png"])
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines == records and [r["input"] for r in lines] == ["cat.png", "coffee.png"]
    boxes = result.boxes(original=True)
    for i, record in enumerate(records):
        assert [m["class"] for m in record["maps"]] == result.targets[i].tolist()
        assert [tuple(m["box"]) for m in record["maps"]] == boxes[i]
        with np.load(tmp_path / record["raw"]) as raw:
            np.testing.assert_array_equal(raw["raw"], result.raw[i].numpy())
        with Image.open(tmp_path / record["maps"][0]["overlay"]) as overlay:
            assert overlay.size == sample_photos[i].size
    assert (tmp_path / "index.html").is_file()


def test_method_options_reach_the_method_and_bad_ones_are_config_errors():
    module = SharedActNet().eval()
    x = torch.randn(1, 3, 16, 16)
    fast = camlens.explain(module, x, method="scorecam", method_options={"max_channels": 2})
    full = camlens.explain(module, x, method="scorecam")
    assert fast.raw.shape == full.raw.shape and not torch.allclose(fast.raw, full.raw)
    with pytest.raises(camlens.ConfigError, match="does not take the option"):
        camlens.explain(module, x, method="cam", method_options={"max_channels": 2})


def test_torchscript_modules_are_refused_with_the_way_out():
    scripted = torch.jit.script(SharedActNet().eval())
    with pytest.raises(camlens.ConfigError, match="--weights"):
        camlens.CAM(scripted)


def test_explanation_repr_is_one_line_and_notebooks_see_overlays(builtin_model, sample_photos):
    result = camlens.explain(builtin_model, sample_photos, target="top2")
    text = repr(result)
    assert "\n" not in text and len(text) < 200
    assert text == (
        "Explanation(method='cam', layer='_swish', n=2, k=2, raw=7x7, input=224x224, "
        f"targets={result.targets.tolist()})"
    )
    html = result._repr_html_()
    assert html.count("<img") == 4 and "Egyptian cat" in html


def test_explanation_save_follows_the_folder_rules(builtin_model, sample_photos, tmp_path):
    result = camlens.explain(builtin_model, sample_photos)
    (tmp_path / "mine.txt").write_text("mine")
    with pytest.raises(camlens.ConfigError, match="overwrite=True"):
        result.save(tmp_path)  # not empty: refused, in Python's spelling
    records = result.save(tmp_path, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "mine"
    assert [r["input"] for r in records] == ["image0", "image1"]  # PIL images have no names
    assert (
        records[0]["maps"][0]["overlay"]
        == f"overlays/00000_image0_c{records[0]['maps'][0]['class']}.png"
    )


def test_explaining_a_users_module_changes_nothing_on_it():
    module = SharedActNet()
    module.train()
    module.dropout = torch.nn.Dropout(0.5)  # a module whose mode matters
    frozen = next(module.parameters())
    frozen.requires_grad_(False)
    for parameter in module.parameters():
        parameter.grad = torch.full_like(parameter, 0.25)
    hooks = {name: len(m._forward_hooks) for name, m in module.named_modules()}
    x = torch.randn(2, 3, 16, 16)
    camlens.load_model(module)
    for method in ("cam", "gradcam", "scorecam"):
        camlens.explain(module, x, method=method)
    assert all(m.training for m in module.modules())  # still in training mode
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in list(module.parameters())[1:])
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in module.parameters())
    assert {name: len(m._forward_hooks) for name, m in module.named_modules()} == hooks
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    assert {p.dtype for p in module.parameters()} == {torch.float32}
