"""3-D volumes: Conv3d maps (CAM identity, the gradient family), 3-D boxes, NIfTI and DICOM
series input, montages, NIfTI maps, and ``camlens explain`` on volumes end to end."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from torch import nn

from camlens.cli import main
from camlens.errors import ConfigError
from camlens.io.volumes import (
    Volume,
    collect_volumes,
    read_volume,
    volume_batch,
    volume_window,
    write_volume_map,
)
from camlens.layers import find_cam_head
from camlens.localize import box3d_from_map, normalize_maps, world_box
from camlens.methods import (
    CAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
    fuse_maps,
    volume_methods,
)
from camlens.models import load_model
from camlens.render import MONTAGE_GAP, MONTAGE_LABEL_HEIGHT, montage
from camlens.tasks.volumes import VIDEO_INPUT_SIZE, default_volume_size

# ------------------------------------------------------------------ a hand-built Conv3d model


class TinyCAM3D(nn.Module):
    """1x1x1 conv with identity weights (A = x) -> GAP over (d, h, w) -> fc(2 -> 3).

    By hand, with X below (M_c = sum_k w_k^c A_k, y_c = mean(M_c) + b_c):
        M_0 = A_0 + 2 A_1                                    mean 40 / 8 = 5     y_0 = 5.1
        M_1 = -A_0                                           mean -4.5           y_1 = -4.3
        M_2 = (A_0 + A_1) / 2                                mean 19 / 8         y_2 = 2.675
    """

    X = torch.tensor(  # (1, 2, 2, 2, 2): A_0, A_1
        [
            [
                [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]],
                [[[0.0, 1.0], [0.0, -1.0]], [[2.0, 0.0], [0.0, 0.0]]],
            ]
        ]
    )
    M = torch.tensor(
        [
            [[[1.0, 4.0], [3.0, 2.0]], [[9.0, 6.0], [7.0, 8.0]]],
            [[[-1.0, -2.0], [-3.0, -4.0]], [[-5.0, -6.0], [-7.0, -8.0]]],
            [[[0.5, 1.5], [1.5, 1.5]], [[3.5, 3.0], [3.5, 4.0]]],
        ]
    )
    Y = torch.tensor([5.1, -4.3, 2.675])

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(2, 2, kernel_size=1, bias=False)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(2).view(2, 2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.0], [0.5, 0.5]]))
            self.fc.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_tiny_model_logits_are_the_hand_computed_ones():
    with torch.no_grad():
        assert torch.allclose(TinyCAM3D()(TinyCAM3D.X)[0], TinyCAM3D.Y, atol=1e-6)


@pytest.mark.parametrize("target", [0, 1, 2])
def test_cam_on_conv3d_is_the_hand_computed_map(target):
    result = CAM(TinyCAM3D()).run(TinyCAM3D.X, target)
    assert result.raw.shape == (1, 1, 2, 2, 2)
    assert torch.allclose(result.raw[0, 0], TinyCAM3D.M[target], atol=1e-6)
    assert result.identity_error < 1e-6  # mean over (d, h, w) + bias == logit
    assert result.layer == "features"


def test_gradient_family_on_conv3d_by_hand():
    model, x = TinyCAM3D(), TinyCAM3D.X
    for target in (0, 1, 2):
        cam = TinyCAM3D.M[target]
        # GAP + linear: dy/dA = w / (d h w) everywhere, d h w = 8
        assert torch.allclose(GradCAM(model)(x, target)[0, 0] * 8, cam, atol=1e-6)
        assert torch.allclose(HiResCAM(model)(x, target)[0, 0] * 8, cam, atol=1e-6)
        assert torch.allclose(XGradCAM(model)(x, target)[0, 0] * 8, cam, atol=1e-6)
    # Layer-CAM keeps the positive class weights only: class 1 has w = (-1, 0) -> all zeros
    assert torch.equal(LayerCAM(model)(x, 1), torch.zeros(1, 1, 2, 2, 2))
    # class 2, w = (.5, .5) all positive: Layer-CAM == CAM / 8
    assert torch.allclose(LayerCAM(model)(x, 2)[0, 0] * 8, TinyCAM3D.M[2], atol=1e-6)


def test_gradcam_plus_plus_on_conv3d_by_hand():
    # g = w / 8 constant; alpha = g^2 / (2 g^2 + S_k g^3) with S_k = sum of A_k;
    # weight_k = sum_positions alpha * relu(g) = 8 * alpha * relu(g).
    model, x = TinyCAM3D(), TinyCAM3D.X
    w = torch.tensor([1.0, 2.0]) / 8
    sums = torch.tensor([36.0, 2.0])  # sum of A0, sum of A1
    alpha = w**2 / (2 * w**2 + sums * w**3)
    weights = 8 * alpha * w.relu()
    expected = weights[0] * x[0, 0] + weights[1] * x[0, 1]
    assert torch.allclose(GradCAMPlusPlus(model)(x, 0)[0, 0], expected, atol=1e-6)


def test_methods_that_cannot_explain_volumes_refuse_by_name():
    with pytest.raises(ConfigError, match=r"scorecam cannot explain a 3-D volume.*gradcam"):
        ScoreCAM(TinyCAM3D())(TinyCAM3D.X)
    assert {"cam", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"} <= set(
        volume_methods()
    )
    assert "scorecam" not in volume_methods() and "eigencam" not in volume_methods()
    with pytest.raises(ConfigError, match="eigen_smooth"):
        GradCAM(TinyCAM3D(), eigen_smooth=True)(TinyCAM3D.X)


def test_layercam_fuses_3d_layers_trilinearly():
    fused = fuse_maps([torch.ones(1, 1, 1, 1, 1), torch.zeros(1, 1, 2, 4, 4)], gamma=None)
    assert fused.shape == (1, 1, 2, 4, 4) and torch.equal(fused, torch.ones(1, 1, 2, 4, 4))


def test_smoothing_works_on_volumes():
    torch.manual_seed(0)
    smooth = GradCAM(TinyCAM3D(), smooth=3, smooth_sigma=0.0)(TinyCAM3D.X, 0)
    assert torch.allclose(smooth[0, 0] * 8, TinyCAM3D.M[0], atol=1e-6)  # sigma 0: no noise


# -------------------------------------------------------------- real 3-D architectures


def _identity_checks(model: nn.Module, x: torch.Tensor) -> None:
    cam = CAM(model).run(x, "top1")
    scale = float(cam.logits.abs().max()) + 1e-12
    assert cam.identity_error / scale < 1e-4
    grad = GradCAM(model).run(x, cam.targets)
    d, h, w = grad.raw.shape[-3:]
    peak = float(cam.raw.abs().max())
    assert float((grad.raw * d * h * w - cam.raw).abs().max()) <= 1e-4 * peak


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_torchvision_video_models_cam_identity(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models.video, name)(weights=None, num_classes=3).eval()
    x = torch.randn(1, 3, 8, 32, 32)
    head = find_cam_head(model, x)
    assert (head.feature_layer, head.classifier, head.cam_exact) == ("layer4", "fc", True)
    _identity_checks(model, x)


def test_torchvision_video_model_builds_offline_through_the_registry():
    classifier = load_model("torchvision:r3d_18", random_weights=True, num_classes=2)
    assert classifier.module.fc.out_features == 2
    assert default_volume_size(classifier) == VIDEO_INPUT_SIZE == (16, 112, 112)


class _DenseLayer3D(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm3d(channels), nn.ReLU(), nn.Conv3d(channels, growth, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], dim=1)


def tiny_densenet3d(classes: int = 2) -> nn.Module:
    """A MONAI-style 3-D DenseNet: stem, dense blocks, transition, norm, ReLU, GAP, linear."""
    return nn.Sequential(
        nn.Conv3d(1, 8, 3, stride=2, padding=1),
        _DenseLayer3D(8, 4),
        _DenseLayer3D(12, 4),
        nn.Sequential(nn.BatchNorm3d(16), nn.ReLU(), nn.Conv3d(16, 8, 1), nn.AvgPool3d(2)),
        _DenseLayer3D(8, 4),
        nn.BatchNorm3d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(12, classes),
    ).eval()


class _BasicBlock3D(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(channels)
        self.down = nn.Conv3d(channels_in, channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.down(x))


class TinyResNet3D(nn.Module):
    """A MONAI-style 3-D ResNet: stem, two basic blocks, GAP, linear."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.layer1 = _BasicBlock3D(8, 8, 1)
        self.layer2 = _BasicBlock3D(8, 16, 2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("build", [tiny_densenet3d, TinyResNet3D], ids=["densenet", "resnet"])
def test_monai_style_3d_networks_cam_identity(build):
    torch.manual_seed(1)
    model = build().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    _identity_checks(model, torch.randn(2, 1, 8, 16, 16))


# ----------------------------------------------------------------- maps, boxes, world


def test_normalize_maps_3d_trilinear_by_hand():
    # relu -> [0, 2]; 2 -> 4 samples along w (align_corners=False) at source positions
    # -0.25, 0.25, 0.75, 1.25, clamped to 0..1: 0, 0.5, 1.5, 2 -> divided by 2
    maps = normalize_maps(torch.tensor([-1.0, 2.0]).view(1, 1, 1, 1, 2), (1, 1, 4))
    assert torch.allclose(maps.flatten(), torch.tensor([0.0, 0.25, 0.75, 1.0]))
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        normalize_maps(torch.zeros(1, 1, 2, 2, 2), (4, 4))


def test_box3d_takes_the_largest_component_with_exact_coordinates():
    volume_map = np.zeros((6, 7, 8))
    volume_map[1:4, 2:5, 3:7] = 0.5  # 3 x 3 x 4 = 36 voxels: the larger one
    volume_map[5, 0, 0:2] = 1.0  # 2 voxels, holding the maximum
    # threshold 0.2 of max 1.0: both components kept; the larger wins
    assert box3d_from_map(volume_map, 0.2) == (3, 2, 1, 7, 5, 4)
    # threshold 0.6: only the small, hot one survives
    assert box3d_from_map(volume_map, 0.6) == (0, 0, 5, 2, 1, 6)
    # corner-touching voxels are one component (26-connectivity)
    diagonal = np.zeros((3, 3, 3))
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = diagonal[2, 2, 2] = 1.0
    assert box3d_from_map(diagonal) == (0, 0, 0, 3, 3, 3)
    assert box3d_from_map(np.zeros((2, 2, 2))) is None


def test_world_box_through_a_known_affine():
    # (d, h, w) -> (x, y, z) mm: x = -0.8 w + 100, y = -0.8 h + 50, z = 2.5 d - 30
    affine = np.array(
        [[0.0, 0.0, -0.8, 100.0], [0.0, -0.8, 0.0, 50.0], [2.5, 0.0, 0.0, -30.0], [0, 0, 0, 1]]
    )
    box = (3, 2, 1, 7, 5, 4)  # columns 3..6, rows 2..4, slices 1..3
    # edges: w 2.5..6.5 -> x 98..94.8; h 1.5..4.5 -> y 48.8..46.4; d 0.5..3.5 -> z -28.75..-21.25
    expected = (94.8, 46.4, -28.75, 98.0, 48.8, -21.25)
    assert np.allclose(world_box(box, affine), expected)
    volume = Volume(np.zeros((6, 7, 8)), affine, "v")
    assert np.allclose(volume.world((1, 2, 3)), (97.6, 48.4, -27.5))


# ------------------------------------------------------------------------ NIfTI and DICOM


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nibabel.save(nibabel.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


#: A file stored in LPI order (x flipped, z flipped): not canonical, so read_volume reorients.
LPI_AFFINE = np.array(
    [[-2.0, 0.0, 0.0, 40.0], [0.0, 1.5, 0.0, -20.0], [0.0, 0.0, -3.0, 60.0], [0, 0, 0, 1]]
)


def test_nifti_is_read_in_canonical_order_with_the_world_kept(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    volume = read_volume(_nifti(tmp_path / "v.nii.gz", data, LPI_AFFINE))
    assert volume.shape == (7, 6, 5)  # (k, j, i)
    # the volume's axes run S, A, R: its affine has positive diagonal steps
    assert np.allclose(np.abs(volume.affine[:3, :3]).sum(1), [2.0, 1.5, 3.0])
    inverse = np.linalg.inv(volume.affine)
    for i, j, k in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
        world = LPI_AFFINE @ [i, j, k, 1]
        d, h, w = np.rint(inverse @ world)[:3].astype(int)
        assert volume.voxels[d, h, w] == data[i, j, k]


def test_nifti_map_round_trip_keeps_shape_affine_and_values(tmp_path):
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    volume = read_volume(_nifti(tmp_path / "in.nii.gz", data, LPI_AFFINE))
    written = write_volume_map(tmp_path / "map.nii.gz", volume.voxels, volume)
    back = nibabel.load(str(written))
    assert back.shape == data.shape
    assert np.allclose(back.affine, LPI_AFFINE)
    assert np.array_equal(np.asarray(back.dataobj), data)
    assert int(back.header["sform_code"]) == 1


PATIENT_NAME, PATIENT_ID, PRIVATE_VALUE = "Doe^Jane", "PID-7731-XQ", "PRIVATE-NOTE-93"


def _dicom_slice(path: Path, z: float, pixels: np.ndarray, series: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.add_new(0x00091010, "LO", PRIVATE_VALUE)  # a private tag
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.75]  # row spacing, column spacing
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _dicom_series(folder: Path, depth: int = 4, size: tuple[int, int] = (6, 8)) -> np.ndarray:
    folder.mkdir(parents=True)
    series = generate_uid()
    stored = np.arange(depth * size[0] * size[1]).reshape(depth, *size) % 4096
    for z in (2, 0, 3, 1)[:depth]:  # written out of order: the reader sorts by position
        _dicom_slice(folder / f"s{(z * 7) % 5}.dcm", 100.0 + 2.0 * z, stored[z], series)
    return stored - 1024.0


def test_dicom_series_folder_is_a_volume_sorted_by_position(tmp_path):
    expected = _dicom_series(tmp_path / "series")
    volume = read_volume(tmp_path / "series")
    assert volume.shape == (4, 6, 8)
    assert np.array_equal(volume.voxels, expected)  # rescaled, sorted by position
    # LPS (-10 + 0.75 w, -20 + 0.5 h, 100 + 2 d) -> RAS: x and y negated
    assert np.allclose(volume.world((3, 5, 7)), (10 - 0.75 * 7, 20 - 0.5 * 5, 106.0))
    assert collect_volumes([tmp_path]) == [str(tmp_path / "series")]


# ------------------------------------------------------------------ model input, montage


def test_volume_batch_windows_resizes_repeats_and_normalises():
    volume = Volume(np.array([[[-200.0, 40.0], [240.0, 1000.0]]]), None, "v")  # (1, 2, 2)
    batch = volume_batch(volume, (1, 2, 2), channels=3, mean=(0.5,), std=(0.25,), window=(40, 400))
    # window 40,400 -> -160..240 -> [0, .5, 1, 1]; then (v - .5) / .25
    expected = torch.tensor([[-2.0, 0.0], [2.0, 2.0]])
    assert batch.shape == (1, 3, 1, 2, 2)
    assert all(torch.allclose(batch[0, c, 0], expected) for c in range(3))
    resized = volume_batch(volume, (2, 4, 4), channels=1, window=(40, 400))
    assert resized.shape == (1, 1, 2, 4, 4) and torch.allclose(
        resized[0, 0, 0, 0, 0], torch.tensor(0.0)
    )
    assert volume_window(np.arange(1001.0)) == (5.0, 995.0)  # 0.5 .. 99.5 percentiles


def test_montage_size_labels_and_the_hot_voxel_colour():
    grey = np.zeros((8, 4, 6), np.uint8)
    heat = np.zeros((8, 4, 6))
    heat[4, 1, 2] = 1.0
    picture = montage(grey, heat, step=2, columns=2, scale=3)
    tile_w, tile_h = 6 * 3, 4 * 3 + MONTAGE_LABEL_HEIGHT
    assert picture.size == (
        MONTAGE_GAP + 2 * (tile_w + MONTAGE_GAP),
        MONTAGE_GAP + 2 * (tile_h + MONTAGE_GAP),
    )
    tiles = picture.info["tiles"]
    assert [z for z, _, _ in tiles] == [0, 2, 4, 6]
    _, x, y = tiles[2]  # slice 4: second row, first column
    assert (x, y) == (MONTAGE_GAP, MONTAGE_GAP + tile_h + MONTAGE_GAP + MONTAGE_LABEL_HEIGHT)
    pixels = np.asarray(picture)
    hot = pixels[y + 3 : y + 6, x + 6 : x + 9]  # voxel (h=1, w=2), 3 x 3 pixels
    assert (hot == (64, 0, 0)).all()  # jet(1) = (128, 0, 0) half over black
    assert (pixels[y : y + 3, x : x + 3] == (0, 0, 64)).all()  # jet(0) half over black
    _, x0, y0 = tiles[0]  # slice 0 has no hot voxel
    assert (pixels[y0 + 3 : y0 + 6, x0 + 6 : x0 + 9] == (0, 0, 64)).all()
    band = pixels[y - MONTAGE_LABEL_HEIGHT : y, x : x + tile_w]
    assert (band.min(axis=-1) >= 192).sum() >= 10  # the "z=4" label, drawn in white
    assert (band[..., 0] == band[..., 2]).all()  # (anti-aliased) grey on black


# ------------------------------------------------------------------------- end to end


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _tiny_volume_model(path: Path, channels: int = 1) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )
    torch.save(model, path)
    return path


def test_cli_explains_a_nifti_volume_end_to_end(tmp_path):
    data = np.zeros((10, 12, 8), np.float32)
    data[2:5, 3:7, 1:4] = 100.0
    scan = _nifti(tmp_path / "scan.nii.gz", data, LPI_AFFINE)
    model = _tiny_volume_model(tmp_path / "tiny3d.pt")
    out = tmp_path / "out"
    args = ["explain", str(scan), "--out", str(out), "--model", str(model), "--trust-model"]
    result = CliRunner().invoke(main, [*args, "--volume-size", "8,12,10", "--method", "gradcam"])
    assert result.exit_code == 0, result.output
    (record,) = _records(out)
    assert (record["status"], record["kind"], record["input"]) == ("ok", "volume", str(scan))
    assert record["shape"] == [8, 12, 10] and record["model_input"] == [8, 12, 10]
    (entry,) = record["maps"]
    assert entry["class"] == record["predictions"][0]["class"]
    box = entry["box"]
    assert len(box) == 6 and all(0 <= box[a] < box[a + 3] for a in range(3))
    assert box[3] <= 10 and box[4] <= 12 and box[5] <= 8
    assert len(entry["box_world"]) == 6
    assert Image.open(out / entry["montage"]).mode == "RGB"
    written = nibabel.load(str(out / entry["nifti"]))
    assert written.shape == data.shape and np.allclose(written.affine, LPI_AFFINE)
    values = np.asarray(written.dataobj)
    assert values.max() == pytest.approx(1.0) and values.min() >= 0.0
    assert (out / record["raw"]).is_file() and (out / "index.html").is_file()


def test_cli_explains_a_dicom_series_with_a_torchvision_model(tmp_path):
    _dicom_series(tmp_path / "ct" / "series1")
    torch.manual_seed(0)
    r3d = torchvision.models.video.r3d_18(weights=None, num_classes=2)
    with torch.no_grad():
        r3d.fc.bias.copy_(torch.tensor([0.0, 50.0]))  # class 1 wins: the weights are used
        r3d.fc.weight[1].abs_()  # on layer4's non-negative maps: a positive map, a box
    torch.save(r3d.state_dict(), tmp_path / "r3d.pt")
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "ct"), "--out", str(out), "--model", "torchvision:r3d_18"]
    args += ["--weights", str(tmp_path / "r3d.pt"), "--volume-size", "4,16,16"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (record,) = _records(out)
    assert record["predictions"][0]["class"] == 1 and record["maps"][0]["class"] == 1
    assert record["input"] == str(tmp_path / "ct" / "series1") and record["kind"] == "volume"
    assert record["identity_error"] < 1e-4 * max(1.0, abs(record["maps"][0]["score"]))
    assert record["shape"] == [4, 6, 8]
    x0, _, z0, _, _, _ = record["maps"][0]["box"]
    corners = record["maps"][0]["box_world"]  # mm, RAS+: x = 10 - 0.75 w, z = 100 + 2 d
    assert corners[2] == pytest.approx(100 + 2 * (z0 - 0.5))
    assert corners[3] == pytest.approx(10 - 0.75 * (x0 - 0.5))
    nifti = nibabel.load(str(out / record["maps"][0]["nifti"]))
    assert nifti.shape == (8, 6, 4)  # (i, j, k) = (w, h, d)
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) >= 5  # results, gallery, montage, NIfTI map, raw maps, run files
    for path in files:  # no patient or private data in any output
        content = path.read_bytes()
        if path.name.endswith(".gz"):
            content += gzip.decompress(content)
        for secret in (PATIENT_NAME, PATIENT_ID, PRIVATE_VALUE):
            assert secret.encode() not in content, (path, secret)


def test_cli_refuses_a_method_that_cannot_explain_volumes(tmp_path):
    scan = _nifti(tmp_path / "scan.nii.gz", np.ones((4, 4, 4)), np.eye(4))
    model = _tiny_volume_model(tmp_path / "tiny3d.pt")
    args = ["explain", str(scan), "--out", str(tmp_path / "o"), "--model", str(model)]
    result = CliRunner().invoke(main, [*args, "--trust-model", "--method", "scorecam"])
    assert result.exit_code == 2
    assert "scorecam cannot explain 3-D volumes" in result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    bad = CliRunner().invoke(main, [*args, "--trust-model", "--volume-size", "8,8"])
    assert bad.exit_code == 2 and "--volume-size" in bad.output


def test_unreadable_volume_is_an_error_record_and_the_rest_is_processed(tmp_path):
    good = _nifti(tmp_path / "a.nii.gz", np.ones((4, 4, 4)), np.eye(4))
    broken = tmp_path / "b.nii.gz"
    broken.write_bytes(b"not a nifti file")
    model = _tiny_volume_model(tmp_path / "tiny3d.pt")
    out = tmp_path / "out"
    args = ["explain", str(good), str(broken), "--out", str(out), "--model", str(model)]
    result = CliRunner().invoke(main, [*args, "--trust-model", "--volume-size", "4,4,4"])
    assert result.exit_code == 1, result.output
    first, second = _records(out)
    assert first["status"] == "ok"
    assert second["status"] == "error" and "nibabel cannot read it" in second["error"]


def test_multi_frame_dicom_from_pydicom_is_a_volume():
    from pydicom.data import get_testdata_file

    volume = read_volume(get_testdata_file("rtdose.dcm"))  # 15 frames of 10 x 10, bundled
    assert volume.shape == (15, 10, 10)
    # IPP (189.43125, 199.43125, -761.87) LPS, 10 mm pixels, frames 5 mm apart along +z
    assert np.allclose(volume.world((0, 0, 0)), (-189.43125, -199.43125, -761.87))
    assert np.allclose(volume.world((2, 1, 3)), (-189.43125 - 30, -199.43125 - 10, -751.87))


def test_window_option_reaches_the_record_and_resume_continues(tmp_path):
    scan = _nifti(tmp_path / "scan.nii.gz", np.arange(64.0).reshape(4, 4, 4), np.eye(4))
    model = _tiny_volume_model(tmp_path / "tiny3d.pt")
    out = tmp_path / "out"
    args = ["explain", str(scan), "--out", str(out), "--model", str(model), "--trust-model"]
    args += ["--volume-size", "4,4,4", "--window", "40,400"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (record,) = _records(out)
    assert record["window"] == [-160.0, 240.0]
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert _records(out) == [record]
    other = CliRunner().invoke(main, [*args[:-1], "0,100", "--resume"])
    assert other.exit_code == 2 and "window" in other.output


#: A fixed window for the blob volumes: a per-volume percentile window would let the network
#: tell blob volumes by their (compressed) background contrast instead of by the blob.
BLOB_WINDOW = (3.0, 12.0)
#: The blob model's input: the window, and a normalisation that centres the background.
BLOB_INPUT = {"window": BLOB_WINDOW, "mean": (0.25,), "std": (0.1,)}


def _blob_volumes(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise volumes (12, 16, 16); label 1 holds a bright 4 x 4 x 4 cube somewhere."""
    batches, labels = [], []
    for i in range(n):
        voxels = rng.normal(0.0, 1.0, (12, 16, 16)).astype(np.float32)
        if i % 2:
            d, h, w = rng.integers(0, 9), rng.integers(0, 13), rng.integers(0, 13)
            voxels[d : d + 4, h : h + 4, w : w + 4] += 6.0
        volume = Volume(voxels, None, "train")
        batch = volume_batch(volume, (12, 16, 16), channels=1, **BLOB_INPUT)
        batches.append(batch)
        labels.append(i % 2)
    return torch.cat(batches), torch.tensor(labels)


def test_trained_3d_cam_finds_the_blob_in_world_and_file_coordinates(tmp_path):
    """A tiny Conv3d CAM network trained to detect a bright cube: on a NIfTI stored in LPI
    order, the record's world box holds the cube's world centre, and the NIfTI map written
    back peaks inside the cube in the file's own voxel order."""
    from camlens.api.explaining import run_explain_volumes
    from camlens.models import Classifier
    from camlens.pipeline import RunOptions

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = nn.Sequential(
        nn.Conv3d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )
    x, y = _blob_volumes(64, rng)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(15):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    net.eval()
    # file order (i, j, k) = (16, 16, 12); the cube at i 9..12, j 2..5, k 7..10 (a flipped
    # axis would put it at i 3..6, j 10..13, k 1..4)
    data = rng.normal(0.0, 1.0, (16, 16, 12)).astype(np.float32)
    data[9:13, 2:6, 7:11] += 6.0
    scan = _nifti(tmp_path / "scan.nii.gz", data, LPI_AFFINE)
    centre = (LPI_AFFINE @ [10.5, 3.5, 8.5, 1.0])[:3]
    classifier = Classifier(net, ["empty", "blob"], mean=(0.25,), std=(0.1,))
    out = tmp_path / "out"
    result = run_explain_volumes(
        classifier,
        [scan],
        out,
        options=RunOptions(progress=False),
        volume_size=(12, 16, 16),
        window=BLOB_WINDOW,
    )
    assert result.n_ok == 1
    (record,) = _records(out)
    (entry,) = record["maps"]
    assert entry["label"] == "blob" and record["identity_error"] < 1e-4
    low, high = np.array(entry["box_world"][:3]), np.array(entry["box_world"][3:])
    assert (low <= centre).all() and (centre <= high).all(), (entry, centre)
    written = np.asarray(nibabel.load(str(out / entry["nifti"])).dataobj)
    i, j, k = np.unravel_index(np.argmax(written), written.shape)
    assert 8 <= i <= 13 and 1 <= j <= 6 and 6 <= k <= 11  # in the cube, or touching it
    # the montage shows it radiologically (the patient's right on the image's left, anterior
    # up): the cube lies towards the patient's left of the volume (x = 16..22 mm of
    # 10..40) and posterior (y = -17..-12.5 of -20..2.5): in the right, bottom quarter of its
    # tile (16 x 6 = 96 pixels)
    assert record["montage_view"] == "radiological"
    pixels = np.asarray(Image.open(out / entry["montage"])).astype(int)
    y, x = np.unravel_index(np.argmax(pixels[..., 0] - pixels[..., 2]), pixels.shape[:2])
    column, row = (
        (x - MONTAGE_GAP) % (96 + MONTAGE_GAP),
        (y - MONTAGE_GAP) % (96 + MONTAGE_LABEL_HEIGHT + MONTAGE_GAP),
    )
    assert column >= 48 and row - MONTAGE_LABEL_HEIGHT >= 48, (x, y)


def test_a_nifti_file_for_a_2d_model_is_a_usage_error(tmp_path):
    scan = _nifti(tmp_path / "scan.nii.gz", np.ones((4, 4, 4)), np.eye(4))
    out = tmp_path / "out"
    args = ["explain", str(scan), "--out", str(out), "--model", "torchvision:resnet18"]
    result = CliRunner().invoke(main, [*args, "--random-weights"])
    assert result.exit_code == 2
    assert "is a NIfTI volume" in result.output and "torchvision:r3d_18" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_cli_explains_a_multi_frame_dicom_file_with_a_3d_model(tmp_path):
    from pydicom.data import get_testdata_file

    model = _tiny_volume_model(tmp_path / "tiny3d.pt")
    dose = get_testdata_file("rtdose.dcm")
    out = tmp_path / "out"
    args = ["explain", dose, "--out", str(out), "--model", str(model), "--trust-model"]
    result = CliRunner().invoke(main, [*args, "--volume-size", "8,10,10"])
    assert result.exit_code == 0, result.output
    (record,) = _records(out)
    assert (record["kind"], record["shape"], record["input"]) == ("volume", [15, 10, 10], dose)
    assert record["maps"][0]["box_world"] is not None  # the file's geometry gives world mm


def test_public_explain_on_a_volume_tensor_gives_3d_maps_and_boxes():
    """``camlens.explain`` on a (N, C, D, H, W) tensor: maps at the input's (D, H, W), the
    hand-computed map of class 0 divided by its maximum, a 3-D box, and a clear refusal of
    2-D overlays."""
    import camlens

    explained = camlens.explain(TinyCAM3D(), TinyCAM3D.X, method="cam", target=0)
    assert explained.is_volume and explained.input_size == (2, 2, 2)
    expected = TinyCAM3D.M[0] / TinyCAM3D.M[0].max()  # M_0 >= 1 everywhere: relu keeps it
    assert torch.allclose(explained.maps[0, 0], expected, atol=1e-6)
    # Voxels at >= 0.2 * 9 are all but none below 1.8: only M_0 = 1 (z0 y0 x0) drops out,
    # and the rest is one 26-connected component covering the whole volume.
    assert explained.boxes()[0] == [(0, 0, 0, 2, 2, 2)]
    assert "raw=2x2x2, input=2x2x2" in repr(explained)
    with pytest.raises(ValueError, match="montage"):
        explained.overlays()
