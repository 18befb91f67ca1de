"""Similarity targets: maps of cos(e(x), e(reference)) instead of a class's logit.

Oracles by hand on tiny models whose embedding (the classifier's input, the pooled features)
is known, and an autograd reference for Grad-CAM.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from camlens.cli import main
from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.methods import CAM, AblationCAM, GradCAM, ScoreCAM
from camlens.methods.base import similarity_methods
from camlens.targets import NOT_A_CLASS, Similarity, describe_target
from tiny_models import TinyCAMNet


def _constant(channels: list[float], size: int = 2) -> torch.Tensor:
    """A (1, C, size, size) image whose channel k is ``channels[k]`` everywhere."""
    return torch.tensor(channels).view(1, -1, 1, 1).expand(1, -1, size, size).clone()


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


# --- the score is the hand-computed cosine -------------------------------------------------


@pytest.mark.parametrize("layer", [None, "features"])
def test_score_is_the_cosine_of_the_pooled_features(layer):
    # TinyCAMNet: features are the input (identity 1x1 conv), the classifier's input their
    # spatial mean. e(X) = (mean [[1, 2], [3, 4]], mean [[0, 1], [0, -1]]) = (2.5, 0).
    # The output of "features" is 4-D: Similarity averages it spatially, the same vector.
    model, x = TinyCAMNet(), TinyCAMNet.X
    by_hand = {(1.0, 1.0): 2.5 / (2.5 * math.sqrt(2)), (3.0, 4.0): 7.5 / (2.5 * 5.0)}
    for channels, cosine in by_hand.items():
        result = GradCAM(model).run(x, Similarity(_constant(channels), layer=layer))
        assert result.scores.shape == (1, 1)
        assert float(result.scores[0, 0]) == pytest.approx(cosine, abs=1e-6)
        assert result.targets.tolist() == [[NOT_A_CLASS]]
        assert result.target_labels == ("similar:reference",)
        assert torch.equal(result.logits, model(x).detach())  # the logits stay the model's


# --- Grad-CAM: the gradient of the cosine, GAP-weighted --------------------------------------


def test_gradcam_of_a_similarity_equals_an_autograd_reference():
    torch.manual_seed(3)
    features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3))
    head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4))
    model = nn.Sequential(features, head).eval()
    x, reference = torch.randn(3, 3, 12, 12), torch.randn(1, 3, 12, 12)

    result = GradCAM(model, layer="0.2").run(x, Similarity(reference))

    # By hand: A = the layer's output, e = GAP(relu(A)), s = cos(e, e_r);
    # alpha_k = mean_ij ds/dA_k[i, j]; map = sum_k alpha_k A_k.
    with torch.no_grad():
        e_ref = head[:3](features(reference))
    activation = features(x).detach().requires_grad_(True)
    e = head[:3](activation)
    s = nn.functional.cosine_similarity(e, e_ref.expand_as(e), dim=1)
    (grad,) = torch.autograd.grad(s.sum(), activation)
    expected = (grad.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1).detach()

    assert result.layer == "0.2"
    torch.testing.assert_close(result.raw[:, 0], expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(result.raw[:, 0].relu(), expected.relu(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(result.scores[:, 0], s.detach(), atol=1e-6, rtol=1e-5)
    assert expected.abs().max() > 1e-4  # a map, not zeros


# --- a constructed example: the map lights the region the two images share -----------------


def _colour_model() -> nn.Module:
    """Channel k of the features is colour k of the input (identity 1x1 conv, ReLU); the
    embedding is their spatial mean: how much red, green and blue the image holds."""
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))


def _red_green() -> torch.Tensor:
    """8 x 8: the left half red, the right half green."""
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, :, :4] = 1.0
    image[0, 1, :, 4:] = 1.0
    return image


@pytest.mark.parametrize("method", [GradCAM, ScoreCAM, AblationCAM])
def test_against_half_of_the_image_the_map_lights_that_half(method):
    # The reference is the image's left half alone (a red 8 x 4 image): only that region is
    # shared. Grad-CAM by hand: e = (.5, .5, 0), e_r = (1, 0, 0), ds/de = e_r/(|e||e_r|) -
    # s e/|e|^2 = (.707, -.707, 0): red counts for, green against.
    model, image = _colour_model(), _red_green()
    left_half = image[:, :, :, :4]
    explanation = _explanation(method(model).run(image, Similarity(left_half)))
    heat = explanation.maps[0, 0]
    assert float(explanation.scores[0, 0]) == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert float(heat[:, :4].mean()) > 0.9
    assert float(heat[:, 4:].max()) < 0.05


def test_against_itself_score_cam_lights_the_whole_image_against_a_half_only_that_half():
    # Score-CAM's weights are similarities of masked inputs: against the image itself both
    # colour channels keep half of what it shares (cos = .707 each): both halves lit alike.
    model, image = _colour_model(), _red_green()
    itself = _explanation(ScoreCAM(model).run(image, Similarity(image)))
    half = _explanation(ScoreCAM(model).run(image, Similarity(image[:, :, :, :4])))
    assert float(itself.scores[0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert float(itself.maps[0, 0, :, :4].mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(itself.maps[0, 0, :, 4:].mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(half.maps[0, 0, :, 4:].max()) < 0.05


@pytest.mark.parametrize("options", [{"smooth": 2, "smooth_sigma": 0.01}, {"aug_smooth": True}])
def test_smoothed_maps_keep_the_similarity_target(options):
    # every noisy / flipped pass explains the same similarity (not a class); the scores are
    # the clean input's
    model, image = _colour_model(), _red_green()
    explanation = _explanation(GradCAM(model, **options).run(image, Similarity(image[..., :4])))
    assert float(explanation.scores[0, 0]) == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert float(explanation.maps[0, 0, :, :4].mean()) > 0.8
    assert float(explanation.maps[0, 0, :, 4:].mean()) < 0.1


def _explanation(result) -> Explanation:
    return Explanation.from_result(result, "m", (8, 8), ["a", "b"])


# --- Score-CAM uses the similarity as its score (hand-checked) ------------------------------


def test_score_cam_weights_are_the_similarities_of_the_masked_inputs():
    # TinyCAMNet, A = X (2 channels, 2 x 2); the masks are the min-max normalised channels:
    #   H_0 = [[0, 1/3], [2/3, 1]],  H_1 = [[.5, 1], [.5, 0]].
    # e(X * H_0) = (mean [[0, 2/3], [2, 4]], mean [[0, 1/3], [0, -1]]) = (5/3, -1/6)
    # e(X * H_1) = (mean [[.5, 2], [1.5, 0]], mean [[0, 1], [0, 0]])  = (1, 1/4)
    # The reference's embedding is (1, 1); w_k = cos(e(X * H_k), (1, 1)).
    def cos(a: tuple[float, float]) -> float:
        return (a[0] + a[1]) / (math.hypot(*a) * math.sqrt(2))

    w0, w1 = cos((5 / 3, -1 / 6)), cos((1.0, 0.25))
    assert (round(w0, 4), round(w1, 4)) == (0.6332, 0.8575)
    a0, a1 = TinyCAMNet.X[0]
    result = ScoreCAM(TinyCAMNet(), batch_size=1).run(TinyCAMNet.X, Similarity(_constant([1, 1])))
    torch.testing.assert_close(result.raw[0, 0], w0 * a0 + w1 * a1, atol=1e-5, rtol=1e-5)


# --- CAM refuses, with the methods that work -------------------------------------------------


def test_cam_refuses_a_similarity_naming_the_methods_that_work():
    with pytest.raises(ConfigError, match=r"cam cannot explain the similarity target") as error:
        CAM(TinyCAMNet()).run(TinyCAMNet.X, Similarity(_constant([1, 1])))
    message = str(error.value)
    assert "a class's weights in the final linear layer" in message
    for name in ("gradcam", "scorecam", "ablationcam"):
        assert name in message
    assert "cam" not in similarity_methods() and "gradcam++" in similarity_methods()


# --- hooks are removed, also after an exception ----------------------------------------------


class _Raising(nn.Module):
    """conv -> GAP -> fc, raising after the feature layer when ``explode`` is set; ``grid``
    sees the flattened feature maps (a size that depends on the input's)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.grid = nn.Identity()
        self.fc = nn.Linear(4, 2)
        self.explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        pooled = features.mean(dim=(2, 3)) + 0 * self.grid(features.flatten(1)).sum(1, keepdim=True)
        if self.explode:
            raise RuntimeError("boom")
        return self.fc(pooled)


@pytest.mark.parametrize("method", [GradCAM, ScoreCAM])
def test_hooks_are_removed_after_an_exception(method):
    model, x = _Raising(), torch.rand(2, 3, 8, 8)
    explainer = method(model)
    explainer.run(x, Similarity(torch.rand(1, 3, 8, 8)))  # the reference is embedded now
    assert _no_hooks(model)
    model.explode = True
    with pytest.raises(RuntimeError, match="boom"):
        explainer.run(x, Similarity(torch.rand(1, 3, 8, 8)))
    assert _no_hooks(model)
    # an error of the similarity itself, after the forward pass: a layer whose output size
    # depends on the input's, and a reference of another size
    model.explode = False
    with pytest.raises(ConfigError, match="at the images' size"):
        explainer.run(x, Similarity(torch.rand(1, 3, 10, 10), layer="grid"))
    assert _no_hooks(model)


def test_a_bad_reference_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'nowhere.png' cannot be read"):
        Similarity.from_text("similar:nowhere.png")
    with pytest.raises(ConfigError, match="one preprocessed image"):
        Similarity(torch.rand(2, 3, 8, 8))
    image = tmp_path / "ref.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(ConfigError, match="no preprocessing"):  # a bare module: no Classifier
        GradCAM(TinyCAMNet()).run(TinyCAMNet.X, Similarity(str(image)))
    assert describe_target(Similarity(str(image), layer="fc")) == {
        "similar": str(image),
        "layer": "fc",
    }


# --- the command line ------------------------------------------------------------------------


def test_cli_explains_a_similarity_and_names_the_reference(tmp_path, sample_photos):
    photo, reference = tmp_path / "cat.png", tmp_path / "coffee.png"
    sample_photos[0].save(photo)
    sample_photos[1].save(reference)
    out = tmp_path / "out"
    args = ["explain", str(photo), "--target", f"similar:{reference}", "--method", "gradcam"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (entry,) = record["maps"]
    assert entry["label"] == f"similar:{reference}"
    assert entry["class"] is None and entry["prob"] is None
    assert -1.0 <= entry["score"] <= 1.0
    overlay = np.asarray(Image.open(out / entry["overlay"]))
    assert overlay.shape[:2] == sample_photos[0].size[::-1]
    raw = np.load(out / record["raw"])
    assert raw["targets"].tolist() == [NOT_A_CLASS]

    missing = CliRunner().invoke(
        main,
        ["explain", str(photo), "--target", "similar:missing.png", "--out", str(tmp_path / "o")],
    )
    assert missing.exit_code == 2
    assert "'missing.png' cannot be read" in missing.output
    assert not (tmp_path / "o").exists()  # refused before any work
