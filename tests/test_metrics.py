"""Every metric on constructed maps, boxes and toy models, against hand-computed values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.metrics import faithfulness as faith
from camlens.metrics import localization as loc
from camlens.metrics import sanity
from whitebox import colour_classifier, red_logit

# --- localisation ------------------------------------------------------------------------


def rectangle_map(shape, box, value=1.0):
    heat = np.zeros(shape)
    x0, y0, x1, y1 = box
    heat[y0:y1, x0:x1] = value
    return heat


def test_box_iou_by_hand():
    assert loc.box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(2 / 6)
    assert loc.box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert loc.box_iou((0, 0, 2, 2), (2, 0, 4, 2)) == 0.0  # touching edges share no pixel
    assert loc.box_iou((0, 0, 0, 5), (0, 0, 0, 5)) == 0.0  # empty boxes
    matrix = loc.box_iou([(0, 0, 4, 4), (10, 10, 12, 12)], [(0, 0, 2, 4), (11, 10, 12, 12)])
    np.testing.assert_allclose(matrix, [[0.5, 0.0], [0.0, 0.5]])


def test_boxes_at_threshold_largest_and_all_components():
    heat = np.zeros((20, 30))
    heat[2:4, 3:5] = 1.0  # small, strong blob: 4 pixels
    heat[10:18, 10:25] = 0.5  # large, weaker blob: 120 pixels
    assert loc.boxes_at_threshold(heat, 0.2) == [(10, 10, 25, 18)]
    assert loc.boxes_at_threshold(heat, 0.2, all_components=True) == [
        (3, 2, 5, 4),
        (10, 10, 25, 18),
    ]
    assert loc.boxes_at_threshold(heat, 0.5) == [(3, 2, 5, 4)]  # strictly above 0.5 x max
    assert loc.boxes_at_threshold(np.zeros((4, 4)), 0.2) == []


def test_rectangle_map_iou_is_exact_at_every_threshold():
    # Map = 1 on R = (10, 20, 50, 60), GT = (30, 20, 70, 60): intersection 20 x 40 = 800,
    # union 1600 + 1600 - 800 = 2400.
    heat = rectangle_map((80, 80), (10, 20, 50, 60))
    ious = loc.threshold_ious(heat, [(30, 20, 70, 60)])
    np.testing.assert_allclose(ious, np.full(100, 1 / 3))
    result = loc.max_box_acc([heat], [[(30, 20, 70, 60)]])
    assert result.value == 0.0  # IoU 1/3 < 0.5 at every threshold
    exact = loc.max_box_acc([heat], [[(10, 20, 50, 60)]])
    assert exact.value == 1.0 and exact.best_thresholds[0.5] == 0.0


def test_max_box_acc_picks_one_threshold_for_the_whole_set():
    # Nested map: A = (0, 0, 40, 40) at 0.3, its inner part B = (10, 10, 20, 20) at 1.0.
    # Threshold t < 0.3 -> box A; t >= 0.3 -> box B.
    heat = rectangle_map((40, 40), (0, 0, 40, 40), 0.3)
    heat[10:20, 10:20] = 1.0
    outer, inner = (0, 0, 40, 40), (10, 10, 20, 20)
    result = loc.max_box_acc([heat, heat, heat], [[outer], [outer], [inner]])
    # t < 0.3: images 1 and 2 right (2/3); t >= 0.3: image 3 right (1/3).
    assert result.value == pytest.approx(2 / 3)
    assert result.best_thresholds[0.5] == 0.0
    curve = result.curves[0.5]
    np.testing.assert_allclose(curve[:30], 2 / 3)
    np.testing.assert_allclose(curve[30:], 1 / 3)


def test_max_box_acc_v2_uses_all_components_and_three_iou_thresholds():
    heat = np.zeros((50, 50))
    heat[0:30, 0:30] = 1.0  # the largest component: the wrong place
    heat[40:50, 40:50] = 1.0  # a smaller component exactly on the object
    gt = [[(40, 40, 50, 50)]]
    assert loc.max_box_acc([heat], gt).value == 0.0
    v2 = loc.max_box_acc_v2([heat], gt)
    assert v2.per_iou == {0.3: 1.0, 0.5: 1.0, 0.7: 1.0} and v2.value == 1.0
    # A box with IoU 0.6 (60 / 100): right at 0.3 and 0.5, wrong at 0.7 -> (1 + 1 + 0) / 3.
    partial = rectangle_map((20, 20), (0, 0, 6, 10))
    v2 = loc.max_box_acc_v2([partial], [[(0, 0, 10, 10)]])
    assert v2.per_iou == {0.3: 1.0, 0.5: 1.0, 0.7: 0.0}
    assert v2.value == pytest.approx(2 / 3)


def test_top1_localization():
    gt_classes, gt_boxes = [3, 7], [(0, 0, 10, 10), (20, 20, 30, 30)]
    assert loc.top1_localization(3, (0, 0, 10, 8), gt_classes, gt_boxes)  # IoU 0.8
    assert not loc.top1_localization(3, (0, 0, 10, 4), gt_classes, gt_boxes)  # IoU 0.4
    assert not loc.top1_localization(3, (20, 20, 30, 30), gt_classes, gt_boxes)  # other class
    assert not loc.top1_localization(5, (0, 0, 10, 10), gt_classes, gt_boxes)  # wrong class
    assert not loc.top1_localization(3, None, gt_classes, gt_boxes)


@pytest.mark.parametrize(
    ("col", "tolerance", "hit"),
    [
        (9, 0.0, True),  # inside the box
        (10, 0.0, False),  # pixel centre 10.5 is 0.5 px right of the edge x1 = 10
        (24, 15.0, True),  # centre 24.5: 14.5 px from the box
        (25, 15.0, False),  # centre 25.5: 15.5 px from the box
    ],
)
def test_pointing_game_tolerance_in_pixels(col, tolerance, hit):
    heat = np.zeros((40, 40))
    heat[5, col] = 1.0
    heat[30, 30] = 0.5  # a lower secondary peak does not count
    assert loc.pointing_game(heat, [(0, 0, 10, 10)], tolerance=tolerance) is hit


def test_pointing_game_with_a_mask_and_on_an_empty_map():
    mask = np.zeros((40, 40), dtype=bool)
    mask[5, 5] = True
    heat = np.zeros((40, 40))
    heat[5, 20] = 1.0  # 15 px from the mask pixel
    assert loc.pointing_game(heat, mask=mask, tolerance=15)
    assert not loc.pointing_game(heat, mask=mask, tolerance=14.9)
    assert not loc.pointing_game(np.zeros((5, 5)), [(0, 0, 5, 5)])


def test_energy_pointing_game_by_hand():
    heat = np.zeros((10, 10))
    heat[0:2, 0:2] = 1.0  # 4 inside
    heat[8, 8] = 4.0  # 4 outside
    heat[9, 9] = -5.0  # negative values do not count
    assert loc.energy_pointing_game(heat, [(0, 0, 5, 5)]) == pytest.approx(0.5)
    # Overlapping boxes count their union once.
    assert loc.energy_pointing_game(heat, [(0, 0, 5, 5), (0, 0, 2, 2)]) == pytest.approx(0.5)
    assert loc.energy_pointing_game(heat, [(0, 0, 10, 10)]) == pytest.approx(1.0)
    assert loc.energy_pointing_game(np.zeros((3, 3)), [(0, 0, 1, 1)]) == 0.0


def test_pixel_average_precision_and_peak_iou_by_hand():
    # Values 0.9, 0.6, 0.3, 0.1 with object pixels at 0.9 and 0.3. Descending thresholds:
    # {0.9}: P 1, R 1/2; {0.9, 0.6}: P 1/2, R 1/2; {.., 0.3}: P 2/3, R 1; all: P 1/2, R 1.
    # PxAP = 1 * 1/2 + 2/3 * 1/2 = 5/6; IoU = 1/2, 1/3, 2/3, 1/2 -> peak 2/3.
    pr = loc.PixelPrecisionRecall()
    pr.add(np.array([[0.9, 0.6, 0.3, 0.1]]), np.array([[True, False, True, False]]))
    assert pr.pxap == pytest.approx(5 / 6)
    assert pr.peak_iou == pytest.approx(2 / 3)
    perfect = loc.PixelPrecisionRecall()
    perfect.add(rectangle_map((8, 8), (2, 2, 5, 5)), rectangle_map((8, 8), (2, 2, 5, 5)) > 0)
    assert perfect.pxap == 1.0 and perfect.peak_iou == 1.0


def test_pixel_precision_recall_pools_images():
    # Two images, each the example above split in two: the pooled value is the same 5/6.
    pr = loc.PixelPrecisionRecall()
    pr.add(np.array([[0.9, 0.6]]), np.array([[True, False]]))
    pr.add(np.array([[0.3, 0.1]]), np.array([[True, False]]))
    assert pr.pxap == pytest.approx(5 / 6) and pr.n_images == 2


# --- faithfulness --------------------------------------------------------------------------


class ChannelSum(nn.Module):
    """logits = [sum of channel 0, 0]: deletion curves of the logit are partial sums."""

    def forward(self, x):
        total = x[:, 0].sum(dim=(-2, -1))
        return torch.stack([total, torch.zeros_like(total)], dim=1)


X = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])


def test_deletion_and_insertion_curves_of_a_linear_model_by_hand():
    model, target = ChannelSum(), torch.tensor([0])
    deletion = faith.deletion_curve(model, X, X[:, 0], target, steps=4, score="logit")
    np.testing.assert_allclose(deletion, [[10, 6, 3, 1, 0]])
    assert faith.auc(deletion)[0] == pytest.approx((10 / 2 + 6 + 3 + 1) / 4)
    reverse = faith.deletion_curve(model, X, -X[:, 0], target, steps=4, score="logit")
    np.testing.assert_allclose(reverse, [[10, 9, 7, 4, 0]])
    insertion = faith.insertion_curve(
        model, X, X[:, 0], target, steps=4, score="logit", baseline="zero"
    )
    np.testing.assert_allclose(insertion, [[0, 4, 7, 9, 10]])
    assert faith.auc(insertion)[0] == pytest.approx((4 + 7 + 9 + 10 / 2) / 4)
    two_steps = faith.deletion_curve(model, X, X[:, 0], target, steps=2, score="logit")
    np.testing.assert_allclose(two_steps, [[10, 3, 0]])  # 0, 2, 4 pixels removed


def test_deletion_probability_baseline_and_batch_size_do_not_change_values():
    model, target = ChannelSum(), torch.tensor([0, 0])
    x = torch.cat([X, X.flip(-1)])
    saliency = torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(1))
    small = faith.deletion_curve(model, x, saliency, target, steps=4, batch_size=1)
    large = faith.deletion_curve(model, x, saliency, target, steps=4, batch_size=64)
    np.testing.assert_array_equal(small, large)
    logits = faith.deletion_curve(model, x, saliency, target, steps=4, score="logit")
    np.testing.assert_allclose(small, 1 / (1 + np.exp(-logits)), rtol=1e-6)  # 2-class softmax
    constant = faith.deletion_curve(
        model, X, X[:, 0], torch.tensor([0]), steps=4, baseline=2.5, score="logit"
    )
    np.testing.assert_allclose(constant, [[10, 8.5, 8, 8.5, 10]])


def test_gaussian_blur_keeps_constants_and_mass():
    x = torch.full((1, 3, 16, 16), 0.7)
    torch.testing.assert_close(faith.gaussian_blur(x), x)
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[0, 0, 15, 15] = 1.0
    blurred = faith.gaussian_blur(impulse)
    assert float(blurred.sum()) == pytest.approx(1.0, rel=1e-5)
    assert float(blurred[0, 0, 15, 15]) < 0.05 and blurred[0, 0, 15, 15] == blurred.max()


def test_average_drop_increase_and_gain_by_hand():
    full, masked = np.array([0.8, 0.5, 1.0]), np.array([0.4, 0.6, 1.0])
    # Drops: 0.4/0.8 = 0.5, 0, 0 -> 1/6. Increases: image 2 only -> 1/3.
    # Gains: 0, 0.1/0.5 = 0.2, 0 (full score 1: nothing to gain) -> 0.2/3.
    assert faith.average_drop(full, masked) == pytest.approx(1 / 6)
    assert faith.increase_in_confidence(full, masked) == pytest.approx(1 / 3)
    assert faith.average_gain(full, masked) == pytest.approx(0.2 / 3)


def test_masked_scores_multiply_the_input_by_the_map():
    saliency = torch.tensor([[[1.0, 0.5], [0.0, 0.25]]])
    full, masked = faith.masked_scores(ChannelSum(), X, saliency, torch.tensor([0]), score="logit")
    assert full.tolist() == [10.0] and masked.tolist() == [4 + 1.5 + 0 + 0.25]


def test_noisy_linear_imputation_reproduces_a_linear_ramp():
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(10.0), indexing="ij")
    image = torch.stack([2 * rows + 3 * cols + 1, -rows + 0.5 * cols])
    missing = torch.zeros(12, 10, dtype=torch.bool)
    missing[3:8, 2:7] = True  # a hole inside the image
    missing[9, 8] = True
    filled = faith.noisy_linear_impute(image, missing, noise=0.0)
    torch.testing.assert_close(filled, image, atol=1e-5, rtol=0)


def test_noisy_linear_imputation_matches_the_reference_implementation():
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 9, 11, generator=generator)
    missing = torch.rand(9, 11, generator=generator) < 0.5  # includes border pixels
    reference = road.NoisyLinearImputer(noise=0.0)(image, (~missing).float())
    ours = faith.noisy_linear_impute(image, missing, noise=0.0)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    noisy = faith.noisy_linear_impute(image, missing, noise=0.01)
    again = faith.noisy_linear_impute(image, missing, noise=0.01)
    torch.testing.assert_close(noisy, again)  # seeded
    residual = (noisy - ours)[:, missing]
    assert 0.005 < float(residual.std()) < 0.015 and torch.equal(
        noisy[:, ~missing], image[:, ~missing]
    )


class PixelReader(nn.Module):
    """logit 0 = the value of pixel (2, 2)."""

    def forward(self, x):
        value = x[:, 0, 2, 2]
        return torch.stack([value, torch.zeros_like(value)], dim=1)


def test_road_removes_most_or_least_relevant_pixels_first():
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 2, 2] = 10.0
    saliency = torch.zeros(1, 6, 6)
    saliency[0, 2, 2] = 1.0
    kw = {"fractions": (0.1, 0.5), "noise": 0.0, "score": "logit"}
    # MoRF removes pixel (2, 2) first; it is imputed from its neighbours, all 0.
    morf = faith.road_scores(PixelReader(), x, saliency, [0], order="morf", **kw)
    # LeRF removes the least relevant 4 and 18 pixels: never (2, 2), the most relevant.
    lerf = faith.road_scores(PixelReader(), x, saliency, [0], order="lerf", **kw)
    np.testing.assert_allclose(morf, [[0.0, 0.0]], atol=1e-9)
    np.testing.assert_allclose(lerf, [[10.0, 10.0]])


def test_cam_beats_seeded_random_maps_on_the_white_box():
    classifier = colour_classifier()
    x = torch.zeros(4, 3, 64, 64)
    corners = [(4, 4), (30, 10), (40, 40), (8, 44)]
    for i, (cx, cy) in enumerate(corners):
        x[i, 0, cy : cy + 16, cx : cx + 16] = 1.0
    explanation = camlens.explain(classifier, x, method="cam")
    maps, targets = explanation.maps[:, 0], explanation.targets[:, 0]
    assert targets.tolist() == [0, 0, 0, 0]
    random_maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = {"steps": 16, "batch_size": 32}
    cam_del = faith.auc(faith.deletion_curve(classifier, x, maps, targets, **kw))
    rnd_del = faith.auc(faith.deletion_curve(classifier, x, random_maps, targets, **kw))
    cam_ins = faith.auc(faith.insertion_curve(classifier, x, maps, targets, **kw))
    rnd_ins = faith.auc(faith.insertion_curve(classifier, x, random_maps, targets, **kw))
    assert np.all(cam_del < rnd_del) and np.all(cam_ins > rnd_ins)
    # By hand, logit score: step 1 removes 256 pixels, exactly the 16 x 16 square.
    logits = faith.deletion_curve(classifier, x, maps, targets, score="logit", **kw)
    expected = np.zeros((4, 17))
    expected[:, 0] = red_logit(256)
    np.testing.assert_allclose(logits, expected, atol=1e-6)
    p0 = np.exp(2.5) / (np.exp(2.5) + 2)
    np.testing.assert_allclose(cam_del, (p0 / 2 + 15 / 3 + 1 / 6) / 16, rtol=1e-6)


# --- sanity --------------------------------------------------------------------------------


def test_map_similarity():
    m = np.random.default_rng(0).random((16, 16))
    assert sanity.map_similarity(m, m) == pytest.approx((1.0, 1.0))
    rho, _ = sanity.map_similarity(m, 1 - m)
    assert rho == pytest.approx(-1.0)
    rho, ssim = sanity.map_similarity(m, np.zeros((16, 16)))
    assert np.isnan(rho) and ssim < 0.1


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.head(self.stem(x)).relu().mean(dim=(2, 3)))


def test_randomization_stages_go_from_the_top_down():
    stages = sanity.randomization_stages(Blocks(), torch.zeros(1, 3, 8, 8))
    assert stages == [["fc"], ["head"], ["stem.1"], ["stem.0"]]
    merged = sanity.randomization_stages(Blocks(), torch.zeros(1, 3, 8, 8), n_stages=2)
    assert merged == [["fc"], ["head", "stem.1", "stem.0"]]


def test_cascading_randomization_leaves_the_model_alone_and_matches_a_manual_copy():
    model = Blocks().train()
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    rng_before = torch.random.get_rng_state()
    stages = sanity.cascading_randomization(model, x, "gradcam", seed=3)
    assert [s.stage for s in stages] == ["fc", "head", "stem.1", "stem.0"]
    assert model.training  # mode restored
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    # Independent recomputation of the first stage: randomise a copy's fc by hand.
    trained = camlens.explain(model, x, method="gradcam")
    manual = copy.deepcopy(model)
    sanity.randomize_modules(manual, ["fc"], seed=3)
    randomized = camlens.explain(manual, x, method="gradcam", target=trained.targets)
    expected = [
        sanity.map_similarity(trained.maps[i, 0].numpy(), randomized.maps[i, 0].numpy())
        for i in range(2)
    ]
    assert stages[0].spearman_per_image == pytest.approx([e[0] for e in expected], nan_ok=True)
    assert stages[0].ssim_per_image == pytest.approx([e[1] for e in expected])


def test_sanity_separates_a_model_dependent_method_from_a_model_blind_one():
    classifier = colour_classifier()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cam = sanity.cascading_randomization(classifier, x, "cam", seed=0)
    assert [s.stage for s in cam] == ["fc", "features"]
    assert cam[0].spearman < 0.9  # CAM reads the head's weights: a random head changes it
    if "eigencam" not in camlens.METHODS:
        pytest.skip("eigencam is not registered")
    eigen = sanity.cascading_randomization(classifier, x, "eigencam", stages=["fc"])
    # Eigen-CAM projects the features only: randomising the head leaves it unchanged.
    assert eigen[0].spearman == pytest.approx(1.0) and eigen[0].ssim == pytest.approx(1.0)
