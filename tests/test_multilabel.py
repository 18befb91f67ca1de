"""Multi-label models: sigmoid probabilities, ``--target positive``, training with BCE on
generated two-shape images, and maps that point at each positive's shape."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tests.tiny_models import TinyCAMNet

import camlens
from camlens.cli import main
from camlens.data.shapes import ShapesConfig, make_shapes_dataset
from camlens.errors import ConfigError
from camlens.explanation import Explanation
from camlens.io.imagefolder import scan_label_csv
from camlens.models import Classifier, class_probabilities
from camlens.targets import Positive, bind_target, distinct_targets, resolve_targets
from camlens.training import TrainConfig, train_classifier

#: The two-shape data set and the training run of the end-to-end tests: 1000 images of 32 px,
#: four classes (each present in half of the images), upright shapes; 10 epochs. About 35 s on
#: 2 busy cores with one torch thread (two threads took 4 times longer while other jobs ran).
DATA = ShapesConfig(
    n=1000, size=32, seed=0, per_image=2, max_rotation=0.0, noise=0.02,
    classes=("circle", "square", "triangle", "cross"),
)  # fmt: skip
TRAIN = TrainConfig(epochs=10, image_size=32, batch_size=32, lr=5e-3, seed=0, multilabel=True)


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def _explanation(logits: list[list[float]], threshold: float = 0.5) -> Explanation:
    n, classes = len(logits), len(logits[0])
    return Explanation(
        raw=torch.zeros(n, 1, 2, 2),
        targets=torch.zeros(n, 1, dtype=torch.long),
        logits=torch.tensor(logits),
        method="cam",
        layer="features",
        input_size=(8, 8),
        labels=["circle", "square", "triangle"][:classes],
        multilabel=True,
        threshold_prob=threshold,
    )


# --- probabilities and predictions ---------------------------------------------------------------


def test_probabilities_are_sigmoids_for_multilabel_models_and_softmax_otherwise():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    sigmoid = [_sigmoid(v) for v in (2.0, -1.0, 0.5)]
    e = [math.exp(v) for v in (2.0, -1.0, 0.5)]
    softmax = [v / sum(e) for v in e]
    assert class_probabilities(logits, multilabel=True)[0].tolist() == pytest.approx(sigmoid)
    assert class_probabilities(logits)[0].tolist() == pytest.approx(softmax)
    model = Classifier(TinyCAMNet(), ["a", "b", "c"], multilabel=True)
    assert model.probabilities(logits)[0].tolist() == pytest.approx(sigmoid)


def test_multilabel_predictions_list_every_class_at_or_above_the_threshold():
    result = _explanation([[2.0, -1.0, 0.5], [-3.0, 0.1, -2.0], [-1.0, -2.0, -3.0]])
    assert result.predictions(0) == [
        {"class": 0, "label": "circle", "prob": round(_sigmoid(2.0), 6)},  # 0.880797
        {"class": 2, "label": "triangle", "prob": round(_sigmoid(0.5), 6)},  # 0.622459
    ]
    assert result.predictions(1) == [{"class": 1, "label": "square", "prob": 0.524979}]
    assert result.predictions(2) == []  # nothing reaches 0.5
    stricter = _explanation([[2.0, -1.0, 0.5], [-3.0, 0.1, -2.0]], threshold=0.7)
    assert [p["class"] for p in stricter.predictions(0)] == [0]
    assert stricter.predictions(1) == []
    single = Explanation(
        torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, dtype=torch.long),
        torch.tensor([[2.0, -1.0, 0.5]]), "cam", "features", (8, 8), ["a", "b", "c"],
    )  # fmt: skip
    assert [p["class"] for p in single.predictions(0)] == [0, 2, 1]  # softmax top 5 (all 3)


def test_a_threshold_outside_zero_one_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"strictly between 0 and 1, got 1\.5"):
        camlens.load_model(TinyCAMNet(), multilabel=True, threshold_prob=1.5)


# --- the "positive" target ----------------------------------------------------------------------


def test_positive_gives_exactly_the_classes_above_the_threshold_per_image():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.1, -2.0], [-1.0, -2.0, -3.0]])
    targets = resolve_targets("positive", logits)
    # Image 0 has two positives (best first), image 1 one (padded with a repeat of it),
    # image 2 none (its top-1).
    assert targets.tolist() == [[0, 2], [1, 1], [0, 0]]
    assert distinct_targets(targets).tolist() == [[True, True], [True, False], [True, False]]
    assert resolve_targets(Positive(0.6), logits).tolist() == [[0, 2], [1, 1], [0, 0]]
    assert resolve_targets(Positive(0.7), logits).tolist() == [[0], [1], [0]]
    # sigmoid: [.881, .269, .622], [.047, .525, .119], [.269, .119, .047]
    assert resolve_targets(Positive(0.2), logits).tolist() == [[0, 2, 1], [1, 1, 1], [0, 0, 0]]


def test_positive_is_refused_for_a_single_label_model_with_what_to_do():
    with pytest.raises(ConfigError, match="needs a multi-label model: pass --multilabel"):
        bind_target("positive", multilabel=False)
    assert bind_target("positive", multilabel=True, threshold_prob=0.3) == Positive(0.3)
    assert bind_target("top1", multilabel=False) == "top1"
    single = camlens.load_model(TinyCAMNet(), labels=["a", "b", "c"])
    with pytest.raises(ConfigError, match="needs a multi-label model"):
        camlens.explain(single, TinyCAMNet.X, target="positive")
    result = camlens.explain(single, TinyCAMNet.X, target="positive", multilabel=True)
    assert result.targets.tolist() == [[0, 2]] and not single.multilabel  # the model untouched


def test_the_cam_of_each_positive_equals_the_single_class_cam():
    # TinyCAMNet on X: logits [2.6, -2.3, 1.55]; on -X: [-2.4, 2.7, -1.25] (by hand: M_c
    # changes sign, the bias stays): positives {0, 2} and {1}.
    model = camlens.load_model(TinyCAMNet(), labels=["a", "b", "c"], multilabel=True)
    x = torch.cat([TinyCAMNet.X, -TinyCAMNet.X])
    result = camlens.explain(model, x, method="cam", target="positive")
    assert result.targets.tolist() == [[0, 2], [1, 1]]
    assert [result.explained(i) for i in range(2)] == [[0, 1], [0]]
    for i, classes in enumerate([[0, 2], [1]]):
        for k, c in enumerate(classes):
            single = camlens.explain(model, x[i : i + 1], method="cam", target=c)
            assert torch.allclose(result.raw[i, k], single.raw[0, 0], atol=1e-6)
    assert torch.allclose(result.raw[0, 0], TinyCAMNet.M[0], atol=1e-6)  # the oracle
    assert torch.allclose(result.raw[0, 1], TinyCAMNet.M[2], atol=1e-6)
    assert torch.allclose(result.raw[1, 0], -TinyCAMNet.M[1], atol=1e-6)
    assert result.probs[0].tolist() == pytest.approx([_sigmoid(v) for v in (2.6, -2.3, 1.55)])


def test_explain_saves_the_positives_with_sigmoid_probs_and_no_padding(tmp_path):
    model = camlens.load_model(TinyCAMNet(), labels=["a", "b", "c"], multilabel=True)
    x = torch.cat([TinyCAMNet.X, -TinyCAMNet.X])
    records = camlens.explain(model, x, target="positive").save(tmp_path / "out")
    assert [[m["class"] for m in r["maps"]] for r in records] == [[0, 2], [1]]
    assert [[p["class"] for p in r["predictions"]] for r in records] == [[0, 2], [1]]
    assert records[0]["maps"][1]["prob"] == round(_sigmoid(1.55), 6)
    assert all(m["positive"] for r in records for m in r["maps"])


# --- data -------------------------------------------------------------------------------------


def test_make_dataset_per_image_2_draws_two_shapes_of_different_classes(tmp_path):
    out = tmp_path / "multi"
    cli = CliRunner().invoke(
        main, ["make-dataset", "shapes", "--out", str(out), "--n", "12", "--size", "32",
               "--per-image", "2"],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    data = scan_label_csv(out / "labels.csv")
    assert data.classes == ["circle", "square", "triangle"] and len(data.paths) == 12
    assert all(sum(t) == 2 for t in data.targets)
    with (out / "annotations.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24  # one row per object
    info = json.loads((out / "dataset.json").read_text())
    for record in info["images"]:
        assert len({o["label"] for o in record["objects"]}) == 2
        for obj in record["objects"]:
            mask = np.asarray(Image.open(out / obj["mask"])) > 0
            ys, xs = np.nonzero(mask)
            assert mask.any()
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == obj["box"]
        first, second = (np.asarray(Image.open(out / o["mask"])) > 0 for o in record["objects"])
        assert not (first & second).any()  # the shapes do not overlap


def test_a_label_csv_is_read_relative_to_its_folder_and_bad_ones_are_refused(tmp_path):
    (tmp_path / "labels.csv").write_text("image,labels\na.png,square;circle\nb.png,\n")
    data = scan_label_csv(tmp_path / "labels.csv")
    assert data.classes == ["circle", "square"] and data.targets == [[1, 1], [0, 0]]
    assert data.paths == [tmp_path / "a.png", tmp_path / "b.png"] and data.multilabel
    (tmp_path / "bad.csv").write_text("path,classes\na.png,circle\n")
    with pytest.raises(ConfigError, match="needs a header with the columns image,labels"):
        scan_label_csv(tmp_path / "bad.csv")
    (tmp_path / "one.csv").write_text("image,labels\na.png,circle\n")
    with pytest.raises(ConfigError, match="names 1 class"):
        scan_label_csv(tmp_path / "one.csv")


def test_train_refuses_a_folder_with_multilabel_and_a_csv_without_it(tmp_path):
    make_shapes_dataset(tmp_path / "multi", ShapesConfig(n=6, size=32, per_image=2))
    with pytest.raises(ConfigError, match="is a folder; pass its CSV"):
        train_classifier(tmp_path / "multi", tmp_path / "m", TrainConfig(multilabel=True))
    with pytest.raises(ConfigError, match="add multilabel=True"):
        train_classifier(tmp_path / "multi" / "labels.csv", tmp_path / "m", TrainConfig())
    assert not (tmp_path / "m").exists()


# --- training with BCE, end to end ---------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    info = make_shapes_dataset(root / "data", DATA)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_classifier(
            root / "data" / "labels.csv", root / "model", TRAIN, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    return root, info, result


def test_a_multilabel_training_run_is_recorded_and_loads_back_as_multilabel(trained):
    root, _, result = trained
    config = json.loads((root / "model" / "config.json").read_text())
    assert config["multilabel"] is True and config["training"]["multilabel"] is True
    assert config["labels"] == ["circle", "cross", "square", "triangle"]  # sorted
    model = camlens.load_model(root / "model")
    assert model.multilabel and model.threshold_prob == 0.5
    assert camlens.load_model(root / "model", multilabel=False).multilabel is False
    assert result.best_val_accuracy is not None and result.best_val_accuracy >= 0.6  # exact match


def test_each_positive_map_points_at_its_shape_on_validation_images(trained):
    root, info, _ = trained
    model = camlens.load_model(root / "model")
    split = json.loads((root / "model" / "split.json").read_text())
    records = {r["image"]: r for r in info["images"]}
    objects = [records[relative]["objects"] for relative in split["val"]]
    paths = [str(root / "data" / relative) for relative in split["val"]]
    truth = [[model.labels.index(o["label"]) for o in objs] for objs in objects]
    # The pointing game (Zhang et al. 2018) on the two annotated classes of every image.
    maps = camlens.explain(model, paths, target=truth).maps
    hits = [
        _peak_in(maps[i, k], obj["box"]) for i, objs in enumerate(objects)
        for k, obj in enumerate(objs)
    ]  # fmt: skip
    # "positive": the model finds both shapes, and each found shape's map points at it.
    positive = camlens.explain(model, paths, target="positive")
    found = []
    for i, objs in enumerate(objects):
        explained = {int(positive.targets[i, k]): k for k in positive.explained(i)}
        for obj in objs:
            k = explained.get(model.labels.index(obj["label"]))
            found.append(k is not None)
            if k is not None:  # the same map as the class's own
                column = truth[i].index(int(positive.targets[i, k]))
                assert torch.allclose(positive.maps[i, k], maps[i, column], atol=1e-5)
    pointing, recall = sum(hits) / len(hits), sum(found) / len(found)
    print(f"pointing game {pointing:.3f} on {len(hits)} shapes; positives found {recall:.3f}")
    assert len(hits) == 2 * len(split["val"]) >= 300
    assert pointing >= 0.8
    assert recall >= 0.85


def _peak_in(heat: torch.Tensor, box: list[int]) -> bool:
    y, x = divmod(int(heat.argmax()), heat.shape[1])
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def test_cli_explain_multilabel_positive_writes_the_positives_with_sigmoid_probs(trained, tmp_path):
    root, info, _ = trained
    image = root / "data" / info["images"][0]["image"]
    out = tmp_path / "out"
    cli = CliRunner().invoke(
        main, ["explain", str(image), "--model", str(root / "model"), "--multilabel",
               "--target", "positive", "--threshold-prob", "0.4", "--out", str(out)],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    record = json.loads((out / "results.jsonl").read_text())
    model = camlens.load_model(root / "model")
    with torch.no_grad():
        logits = model.module(model.preprocess(str(image)))[0]
    probs = torch.sigmoid(logits).tolist()
    expected = sorted((c for c, p in enumerate(probs) if p >= 0.4), key=lambda c: -probs[c])
    assert [p["class"] for p in record["predictions"]] == expected
    assert [m["class"] for m in record["maps"]] == expected or (
        not expected and len(record["maps"]) == 1 and record["maps"][0]["positive"] is False
    )
    for p in record["predictions"]:
        assert p["prob"] == pytest.approx(probs[p["class"]], abs=1e-5)
    settings = json.loads((out / ".camlens" / "run.json").read_text())["settings"]
    assert settings["multilabel"] is True and settings["threshold_prob"] == 0.4


# --- evaluation ---------------------------------------------------------------------------------


def test_the_faithfulness_scorer_uses_the_sigmoid_for_a_multilabel_model():
    from camlens.metrics.faithfulness import scorer

    x, targets = torch.cat([TinyCAMNet.X, TinyCAMNet.X]), torch.tensor([0, 2])
    multi = camlens.load_model(TinyCAMNet(), labels=["a", "b", "c"], multilabel=True)
    single = camlens.load_model(TinyCAMNet(), labels=["a", "b", "c"])
    # logits [2.6, -2.3, 1.55] (TinyCAMNet's docstring)
    assert scorer(multi)(x, targets).tolist() == pytest.approx([_sigmoid(2.6), _sigmoid(1.55)])
    total = math.exp(2.6) + math.exp(-2.3) + math.exp(1.55)
    expected = [math.exp(2.6) / total, math.exp(1.55) / total]
    assert scorer(single)(x, targets).tolist() == pytest.approx(expected)
    assert scorer(multi, score="logit")(x, targets).tolist() == pytest.approx([2.6, 1.55])


def test_a_hugging_face_multi_label_classifier_loads_as_multilabel(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], id2label={0: "cat", 1: "dog"},
        problem_type="multi_label_classification",
    )  # fmt: skip
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "multi")
    assert camlens.load_model(f"hf:{tmp_path / 'multi'}").multilabel
    config.problem_type = "single_label_classification"
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "single")
    assert not camlens.load_model(f"hf:{tmp_path / 'single'}").multilabel
