"""Deep Feature Factorization (``camlens.factorize``, ``camlens concepts``) against known concepts.

``ConceptNet`` is built so that its feature layer's activations are, at every position,
``r * RED + b * BLUE``: ``r`` and ``b`` are the pixel's red and blue values in [0, 1] and
``RED``, ``BLUE`` two unit-norm channel patterns. Its activations therefore hold exactly two
concepts, whose maps are the red and the blue regions and whose vectors are the two patterns;
its linear head names them ("red thing", "blue thing").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.decomposition import NMF
from torch import nn

import camlens
from camlens.cli import main
from camlens.localize import normalize_maps
from camlens.methods.concepts import (
    NMF_MAX_ITER,
    RANDOM_STATE,
    activation_matrix,
    capture_activations,
    fit_concepts,
)
from camlens.models import Classifier

RED = np.array([0.6, 0.8, 0.0, 0.0], dtype=np.float32)
BLUE = np.array([0.0, 0.0, 0.8, 0.6], dtype=np.float32)
LABELS = ["red thing", "blue thing", "nothing"]
FC_WEIGHT = torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
FC_BIAS = torch.tensor([0.0, 0.0, 0.3])


class ConceptNet(nn.Module):
    """masks (the pixel's red and blue values, ImageNet normalisation undone) -> features
    (1x1 conv: r * RED + b * BLUE) -> relu -> global average pooling -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.masks = nn.Conv2d(3, 2, 1)
        self.mask_relu = nn.ReLU()
        self.features = nn.Conv2d(2, 4, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.masks.weight.copy_(torch.tensor([[0.229, 0, 0], [0, 0, 0.225]]).view(2, 3, 1, 1))
            self.masks.bias.copy_(torch.tensor([0.485, 0.406]))
            patterns = torch.from_numpy(np.stack([RED, BLUE], axis=1))
            self.features.weight.copy_(patterns.view(4, 2, 1, 1))
            self.fc.weight.copy_(FC_WEIGHT)
            self.fc.bias.copy_(FC_BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.relu(self.features(self.mask_relu(self.masks(x))))
        return self.fc(features.mean(dim=(2, 3)))


def _classifier(size: int = 16) -> Classifier:
    return Classifier(ConceptNet().eval(), list(LABELS), input_size=(size, size))


def _pixels(red: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from red and blue masks in [0, 1] (green 0)."""
    rgb = np.zeros((*red.shape, 3), dtype=np.uint8)
    rgb[..., 0] = np.rint(255 * red)
    rgb[..., 2] = np.rint(255 * blue)
    return rgb


def _batch(classifier: Classifier, masks: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    pixels = np.stack([_pixels(r, b) for r, b in masks])
    return classifier.normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2))


def _fit_masks() -> list[tuple[np.ndarray, np.ndarray]]:
    """Two 16 x 16 images: red covers more positions in all than blue (concept 0 = red)."""
    r0, b0 = np.zeros((16, 16)), np.zeros((16, 16))
    r0[:8, :] = 1.0  # 128 red positions
    b0[10:, 4:12] = 1.0  # 48 blue positions
    r1, b1 = np.zeros((16, 16)), np.zeros((16, 16))
    r1[:, :4] = 1.0  # 64 red
    b1[:, 8:] = 1.0  # 128 blue
    return [(r0, b0), (r1, b1)]


def _softmax_top(vector: np.ndarray, top: int = 3) -> list[tuple[int, float]]:
    probs = torch.softmax(FC_WEIGHT @ torch.from_numpy(vector) + FC_BIAS, dim=0)
    values, ids = probs.topk(top)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


# --- the factorisation -------------------------------------------------------------------------


def test_two_planted_concepts_are_found_with_their_regions_vectors_and_classes():
    classifier = _classifier()
    masks = _fit_masks()
    found = camlens.factorize(classifier, _batch(classifier, masks), k=2)
    basis = found.basis
    assert basis.layer == "relu"
    # the vectors are the planted patterns (unit norm), red first: it covers more positions
    np.testing.assert_allclose(basis.vectors, np.stack([RED, BLUE]), atol=1e-3)
    np.testing.assert_allclose(basis.peaks, [1.0, 1.0], atol=1e-3)
    # each concept's map is its region: the coefficient is the pixel's red / blue value
    for n, (red, blue) in enumerate(masks):
        np.testing.assert_allclose(found.raw[n, 0].numpy(), red, atol=1e-3)
        np.testing.assert_allclose(found.raw[n, 1].numpy(), blue, atol=1e-3)
    assert basis.reconstruction_error < 1e-2
    # the head applied to each concept at its peak: softmax(fc(peak * vector))
    for k, pattern in enumerate((RED, BLUE)):
        got = [(t.id, t.prob) for t in found.top_classes[k]]
        expected = _softmax_top(pattern)
        assert [c for c, _ in got] == [c for c, _ in expected]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], atol=2e-3)
    assert [found.top_classes[k][0].label for k in range(2)] == ["red thing", "blue thing"]
    # shares of each image's map mass: 128 red vs 48 blue positions, then 64 vs 128
    np.testing.assert_allclose(
        found.shares.numpy(), [[128 / 176, 48 / 176], [1 / 3, 2 / 3]], atol=1e-3
    )
    # input-size maps: the contract's normalisation of the raw maps
    assert torch.equal(found.maps, normalize_maps(found.raw, (16, 16)))
    assert found.maps[0, 0, :8].min() > 0.99 and found.maps[0, 0, 8:].max() < 1e-3


def test_reconstruction_error_equals_sklearn_nmf_on_the_same_matrix():
    torch.manual_seed(3)
    module = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()
    classifier = Classifier(module, ["a", "b", "c"], input_size=(12, 12))
    x = torch.randn(3, 3, 12, 12)
    basis, raw = fit_concepts(classifier, x, k=3)
    activations, _ = capture_activations(classifier, x)
    matrix = activation_matrix(activations)
    reference = NMF(
        n_components=3, init="nndsvda", random_state=RANDOM_STATE, max_iter=NMF_MAX_ITER
    ).fit(matrix)
    assert basis.reconstruction_error == pytest.approx(reference.reconstruction_err_, rel=1e-6)
    # our unit-norm, reordered factors give the same product
    product = raw.permute(0, 2, 3, 1).reshape(-1, 3).numpy() @ basis.vectors
    error = np.linalg.norm(matrix - product)
    assert error == pytest.approx(reference.reconstruction_err_, rel=1e-4)
    np.testing.assert_allclose(np.linalg.norm(basis.vectors, axis=1), 1.0, atol=1e-6)
    sums = raw.sum(dim=(0, 2, 3)).numpy()
    assert list(sums) == sorted(sums, reverse=True)  # concepts ordered by total coefficient
    # the same activations give the same concepts (fixed random_state)
    again, _ = fit_concepts(classifier, x, k=3)
    assert again.fingerprint() == basis.fingerprint()


def test_new_images_get_their_coefficients_against_the_fitted_basis():
    classifier = _classifier()
    found = camlens.factorize(classifier, _batch(classifier, _fit_masks()), k=2)
    # a new image: half-intensity red, a purple square (both concepts), a blue stripe
    red, blue = np.zeros((16, 16)), np.zeros((16, 16))
    red[:6, :] = 128 / 255
    red[8:12, 8:12] = 1.0
    blue[8:12, 8:12] = 1.0
    blue[14:, :] = 1.0
    x_new = _batch(classifier, [(red, blue), _fit_masks()[1]])
    raw = found.basis.transform(classifier, x_new)
    np.testing.assert_allclose(raw[0, 0].numpy(), red, atol=2e-3)
    np.testing.assert_allclose(raw[0, 1].numpy(), blue, atol=2e-3)
    # an image's maps do not depend on the batch it is in
    alone = found.basis.transform(classifier, x_new[:1])
    np.testing.assert_allclose(alone.numpy(), raw[:1].numpy(), atol=1e-6)
    # and against arbitrary activations: known non-negative coefficients come back
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.0, 2.0, size=(2, 2, 5, 5)).astype(np.float32)
    activations = torch.from_numpy(np.einsum("nkhw,kc->nchw", truth, found.basis.vectors))
    np.testing.assert_allclose(found.basis.coefficients(activations).numpy(), truth, atol=1e-3)
    # Concepts.transform: paths / PIL images / tensors, the same basis
    again = found.transform(x_new)
    assert again.basis is found.basis and torch.equal(again.raw, raw)


def test_bad_k_and_layers_are_config_errors_and_other_layers_have_no_classes():
    classifier = _classifier()
    x = _batch(classifier, _fit_masks())
    with pytest.raises(camlens.ConfigError, match="k must be between 1 and 4"):
        camlens.factorize(classifier, x, k=5)  # 4 channels
    with pytest.raises(
        camlens.ConfigError, match=r"k \(the number of concepts\) must be an integer >= 1"
    ):
        camlens.factorize(classifier, x, k=0)
    with pytest.raises(camlens.ConfigError, match="no layer named 'nope'"):
        camlens.factorize(classifier, x, k=2, layer="nope")
    # a layer that does not feed the linear head (2 channels, the head takes 4): no classes
    early = camlens.factorize(classifier, x, k=2, layer="mask_relu")
    assert early.basis.layer == "mask_relu" and early.top_classes == ((), ())
    black = _batch(classifier, [(np.zeros((16, 16)), np.zeros((16, 16)))])
    with pytest.raises(camlens.ConfigError, match="all zero"):
        camlens.factorize(classifier, black, k=1)


def test_builtin_model_finds_the_cat_and_the_coffee(builtin_model, sample_photos):
    found = camlens.factorize(builtin_model, sample_photos, k=2)
    assert [top[0].label for top in found.top_classes] == ["Egyptian cat", "espresso"]
    assert found.shares.argmax(dim=1).tolist() == [0, 1]
    assert found.shares[0, 0] > 0.8 and found.shares[1, 1] > 0.8
    assert found.raw.shape == (2, 2, 7, 7) and found.maps.shape == (2, 2, 224, 224)


def test_public_names_are_the_functions():
    from camlens.api.factorizing import concepts, factorize
    from camlens.cli.concepts import FIT_IMAGES
    from camlens.tasks.concepts import DEFAULT_FIT_IMAGES

    assert camlens.factorize is factorize and camlens.concepts is concepts
    assert camlens.api.concepts is concepts
    assert FIT_IMAGES == DEFAULT_FIT_IMAGES


# --- the command -------------------------------------------------------------------------------


def _write_image(path: Path, red: np.ndarray, blue: np.ndarray) -> None:
    Image.fromarray(_pixels(red, blue)).save(path)


@pytest.fixture(scope="module")
def concept_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """224 px images (no resizing), a pickled ConceptNet and its labels."""
    root = tmp_path_factory.mktemp("concepts")
    images = root / "images"
    images.mkdir()
    z = np.zeros((224, 224))
    red, blue = z.copy(), z.copy()
    red[:112, :] = 1.0  # red 224 x 112, blue 56 x 112: red share 0.8
    blue[112:, :56] = 1.0
    _write_image(images / "a.png", red, blue)
    red, blue = z.copy(), z.copy()
    blue[:, :168] = 1.0  # blue 168 columns, red 56: blue share 0.75
    red[:, 168:] = 1.0
    _write_image(images / "b.png", red, blue)
    (images / "broken.png").write_bytes(b"not an image")
    red = z.copy()
    red[100:150, 100:150] = 1.0  # red only
    _write_image(images / "c.png", red, z)
    model = root / "concept_net.pth"
    torch.save(ConceptNet().eval(), model)
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return images, model


def _run(concept_inputs, out: Path, *extra: str):
    images, model = concept_inputs
    labels = model.parent / "labels.txt"
    args = ["concepts", str(images), "--out", str(out), "--model", str(model), "--trust-model"]
    args += ["--labels", str(labels), "-k", "2", "--fit-images", "3", "--batch-size", "2"]
    return CliRunner().invoke(main, [*args, *extra])


def test_cli_writes_pictures_records_and_the_concept_table(concept_inputs, tmp_path):
    out = tmp_path / "out"
    result = _run(concept_inputs, out)
    assert result.exit_code == 1, result.output  # broken.png failed, the rest was processed
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(r["input"]).name for r in records] == ["a.png", "b.png", "broken.png", "c.png"]
    assert [r["status"] for r in records] == ["ok", "ok", "error", "ok"]
    assert "broken.png" in records[2]["error"]
    # fitted on a and b (broken skipped): blue has more positions, so concept 0 is blue
    table = json.loads((out / "concepts.json").read_text())
    assert table["k"] == 2 and table["layer"] == "relu" and table["fit_images"] == 2
    rows = table["concepts"]
    assert [row["top_classes"][0]["label"] for row in rows] == ["blue thing", "red thing"]
    assert [row["color"] for row in rows] == ["#1f77b4", "#ff7f0e"]  # tab10
    expected = [_softmax_top(BLUE)[0][1], _softmax_top(RED)[0][1]]
    assert [row["top_classes"][0]["prob"] for row in rows] == pytest.approx(expected, abs=2e-3)
    assert [row["dominant_in"] for row in rows] == [1, 2]  # b; a and c
    shares = {Path(r["input"]).name: [c["share"] for c in r["concepts"]] for r in records}
    assert shares["a.png"] == pytest.approx([0.2, 0.8], abs=1e-3)
    assert shares["b.png"] == pytest.approx([0.75, 0.25], abs=1e-3)
    assert shares["c.png"] == pytest.approx([0.0, 1.0], abs=1e-3)
    assert [records[i]["dominant"] for i in (0, 1, 3)] == [1, 0, 1]
    csv_lines = (out / "concepts.csv").read_text().splitlines()
    assert csv_lines[0] == "concept,color,dominant_in,top_classes"
    assert csv_lines[1].startswith("0,#1f77b4,1,blue thing ")
    # the raw maps: the coefficients, i.e. the blue and red masks
    with np.load(out / records[0]["raw"]) as saved:
        assert saved["raw"].shape == (2, 224, 224)
        assert saved["raw"][1, :112].min() == pytest.approx(1.0, abs=2e-3)
        assert saved["raw"][0, 112:, :56].min() == pytest.approx(1.0, abs=2e-3)
        assert saved["raw"][0, :112].max() < 2e-3
    # the picture: the image at the top left, each region in its concept's colour, a legend
    picture = Image.open(out / records[0]["picture"]).convert("RGB")
    assert records[0]["picture"] == "concepts/00000_a.png"
    assert picture.width >= 224 and picture.height > 224

    def mix(image: tuple, color: tuple) -> tuple:  # alpha 0.5, the concept at its strongest
        return tuple(int(v) for v in np.rint(0.5 * np.array(image) + 0.5 * np.array(color)))

    assert picture.getpixel((50, 50)) == mix((255, 0, 0), (255, 127, 14))
    assert picture.getpixel((20, 200)) == mix((0, 0, 255), (31, 119, 180))
    assert picture.getpixel((150, 200)) == (0, 0, 0)  # no concept: the image itself
    legend = np.asarray(picture)[224:]
    assert (legend == (255, 127, 14)).all(axis=-1).any()  # the legend's colour patches
    assert (legend == (31, 119, 180)).all(axis=-1).any()
    # --resume with another k is refused, naming the setting; the same settings resume
    refused = _run(concept_inputs, out, "-k", "1", "--resume")
    assert refused.exit_code == 2 and "k: 2 then, 1 now" in refused.output, refused.output
    again = _run(concept_inputs, out, "--resume")
    assert again.exit_code == 1, again.output
    assert json.loads((out / "concepts.json").read_text()) == table


def test_cli_exit_codes(concept_inputs, tmp_path):
    images, _ = concept_inputs
    ok = _run((images / "c.png", concept_inputs[1]), tmp_path / "ok", "-k", "1")
    assert ok.exit_code == 0, ok.output
    assert "1 inputs: 1 ok, 0 failed" in ok.output
    nothing = _run((images / "broken.png", concept_inputs[1]), tmp_path / "none")
    assert nothing.exit_code == 2 and "none of the first 1 inputs" in nothing.output
    assert not (tmp_path / "none").exists()  # nothing left behind
    zero = _run(concept_inputs, tmp_path / "zero", "-k", "0")
    assert zero.exit_code == 2
    used = _run(concept_inputs, tmp_path / "ok")  # a non-empty --out without --resume
    assert used.exit_code == 2 and "not empty" in used.output
