"""Targets, Zhou's boxes and the Explanation's post-processing, with hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import camlens
from camlens import ConfigError
from camlens.localize import box_from_map, scale_box
from camlens.targets import resolve_targets

LOGITS = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 1.0, 2.0]])
LABELS = ["cat", "dog", "Egyptian cat", "espresso"]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("top1", [[1], [0]]),
        ("top3", [[1, 2, 0], [0, 3, 2]]),
        (2, [[2], [2]]),
        ("3", [[3], [3]]),
        ("egyptian CAT", [[2], [2]]),
        (["dog", 3], [[1], [3]]),
        ([[0, 1], ["espresso", "cat"]], [[0, 1], [3, 0]]),
        (torch.tensor([2, 1]), [[2], [1]]),
        (lambda logits: logits.argmin(dim=1), [[3], [1]]),
    ],
)
def test_resolve_targets(target, expected):
    assert resolve_targets(target, LOGITS, LABELS).tolist() == expected


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("egyptian kat", "Did you mean: Egyptian cat"),
        (4, "out of range"),
        (["cat"], "one entry per image"),
        ("top9", "between 1 and 4"),
        (1.5, "cannot use float"),
    ],
)
def test_resolve_targets_errors(target, message):
    with pytest.raises(ConfigError, match=message):
        resolve_targets(target, LOGITS, LABELS)


def test_zhou_box_picks_largest_of_two_blobs():
    heat = np.zeros((20, 30))
    heat[2:6, 3:7] = 1.0  # small blob holds the peak (4 x 4 = 16 px)
    heat[10:18, 12:27] = 0.5  # large blob, above 20 % of the peak (8 x 15 = 120 px)
    heat[0, 29] = 0.1  # below 0.2 x 1.0: ignored
    assert box_from_map(heat) == (12, 10, 27, 18)
    # at a 60 % threshold only the small blob survives
    assert box_from_map(heat, threshold=0.6) == (3, 2, 7, 6)


def test_zhou_box_threshold_is_strictly_above_and_diagonal_connects():
    heat = np.zeros((5, 5))
    heat[1, 1] = heat[2, 2] = heat[3, 3] = 1.0  # diagonal: one 8-connected component
    heat[0, 4] = 0.2  # exactly 20 %: not above
    assert box_from_map(heat) == (1, 1, 4, 4)
    assert box_from_map(np.zeros((3, 3))) is None
    assert box_from_map(-np.ones((3, 3))) is None


def test_scale_box():
    assert scale_box((0, 0, 112, 56), (224, 224), (640, 480)) == (0, 0, 320, 120)
    assert scale_box((0, 0, 224, 224), (224, 224), (1, 1000)) == (0, 0, 1, 1000)


def test_explanation_boxes_in_original_pixels():
    from PIL import Image

    result = camlens.Explanation(
        raw=torch.tensor([[[[0.0, 1.0], [-1.0, 1.0]]]]),  # positive only in the right column
        targets=torch.tensor([[0]]),
        logits=torch.tensor([[1.0, 0.0]]),
        method="cam",
        layer="features",
        input_size=(2, 2),
        images=[Image.new("RGB", (40, 10))],
    )
    assert result.boxes()[0][0] == (1, 0, 2, 2)
    assert result.boxes(original=True)[0][0] == (20, 0, 40, 10)
    heat = result.heatmap(0, 0, original=True)
    assert heat.shape == (10, 40) and heat.max() == 1.0 and heat[:, :10].max() == 0.0


def test_normalize_maps_upsampling_is_bilinear_and_max_one():
    raw = torch.tensor([[[[0.0, 2.0]]]])
    maps = camlens.normalize_maps(raw, (1, 4))
    # align_corners=False bilinear from 2 to 4 samples: [0, 0.5, 1.5, 2] / 2
    torch.testing.assert_close(maps[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_a_misspelt_class_suggests_the_classes_that_contain_the_word():
    from camlens.errors import ConfigError
    from camlens.models.efficientnet_lite import imagenet_labels
    from camlens.targets import class_index

    labels = imagenet_labels()
    try:
        class_index("cat", labels)
    except ConfigError as error:
        message = str(error)
    else:
        raise AssertionError("'cat' is not an ImageNet class name")
    assert "Egyptian cat" in message and "tiger cat" in message
    assert "crate" not in message  # edit distance alone suggested "crate, oxcart, castle"


def test_normalize_maps_gives_zeros_for_maps_without_a_positive_value_and_for_nan():
    raw = torch.tensor([[[[-1.0, -2.0]], [[0.0, 0.0]], [[float("nan"), 1.0]], [[1.0, 4.0]]]])
    maps = camlens.normalize_maps(raw, (1, 2))
    expected = torch.tensor([[[[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[0.25, 1.0]]]])
    assert torch.equal(maps, expected)
