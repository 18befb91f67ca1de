"""DICOM and 16-bit input: rescale, window (DICOM PS3.3 C.11.2.1.2), MONOCHROME1, frames,
compressed syntaxes, series, pydicom's bundled files, and no patient data in any output.

Expected pixel values are worked out by hand from the window formula in the comments.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from camlens.cli import main
from camlens.errors import ConfigError
from camlens.io import ImageLoadError, collect_inputs, load_image
from camlens.io.medical import (
    DicomError,
    apply_window,
    dicom_uid,
    min_max_window,
    parse_window,
    read_dicom_frames,
    read_dicom_image,
    read_dicom_series,
)

PATIENT_NAME = "Zyxwvut^Qwertyuiop"
PATIENT_ID = "PID-8675309-XYZ"
PRIVATE_CREATOR = "ACME-PRIVATE-CREATOR"
PRIVATE_VALUE = "SECRET-PRIVATE-VALUE-42"
SOP_UID = "1.2.826.0.1.3680043.8.498.77777123456789"


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    voi_function: str | None = None,
    patient: bool = False,
    **extra: object,
) -> Path:
    """A DICOM file holding ``pixels`` (2-D, or (F, H, W) for several frames)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "CT"
    ds.set_pixel_data(
        pixels, photometric, bits_stored or pixels.dtype.itemsize * 8, generate_instance_uid=True
    )
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if patient:
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", PRIVATE_VALUE)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def grey(image: Image.Image) -> list[list[int]]:
    array = np.asarray(image)
    assert image.mode == "RGB" and (array == array[..., :1]).all()  # grey: R = G = B
    return array[..., 0].tolist()


# --- the window formula ----------------------------------------------------------------------


def test_linear_window_follows_the_dicom_formula() -> None:
    # c = 100, w = 11: 0 at x <= 100 - 0.5 - 5 = 94.5, 255 at x > 100 - 0.5 + 5 = 104.5, in
    # between ((x - 99.5) / 10 + 0.5) * 255: 95 -> 12.75 -> 13, 100 -> 140.25, 104 -> 242.25.
    values = np.array([94.5, 95, 100, 104, 104.5, 104.6])
    assert apply_window(values, 100, 11).tolist() == [0, 13, 140, 242, 255, 255]


def test_exact_and_sigmoid_windows() -> None:
    # LINEAR_EXACT: ((x - 100) / 10 + 0.5) * 255: 95 -> 0, 100 -> 127.5 -> 128, 104 -> 229.5.
    values = np.array([95, 100, 104, 110])
    assert apply_window(values, 100, 10, "LINEAR_EXACT").tolist() == [0, 128, 230, 255]
    # SIGMOID: 255 / (1 + exp(-4 (x - 100) / 10)): 100 -> 127.5; 105 -> 255 / 1.1353 = 224.6.
    assert apply_window(np.array([100, 105]), 100, 10, "SIGMOID").tolist() == [128, 225]


def test_min_max_window_spans_the_image() -> None:
    assert min_max_window(np.array([0, 4095])) == (2048.0, 4096.0)
    values = np.array([-1000.0, 0.0, 3000.0])
    # 255 * (x + 1000) / 4000: 0 -> 63.75 -> 64.
    assert apply_window(values, *min_max_window(values)).tolist() == [0, 64, 255]
    assert apply_window(np.array([7, 7]), *min_max_window(np.array([7, 7]))).tolist() == [0, 0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("40,400", (40.0, 400.0)), (" -600 , 1500 ", (-600.0, 1500.0)), ((1, 2), (1.0, 2.0))],
)
def test_parse_window(text, expected) -> None:
    assert parse_window(text) == expected


@pytest.mark.parametrize("text", ["abc", "40", "40,400,3", "40;400", "40,0", "nan,400", "1,inf"])
def test_parse_window_refuses_bad_text(text) -> None:
    with pytest.raises(ConfigError, match="window"):
        parse_window(text)


# --- DICOM files written here -----------------------------------------------------------------


def test_twelve_bit_with_the_files_window(tmp_path: Path) -> None:
    stored = np.array([[0, 1000, 2048, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, bits_stored=12, window=(2048, 4096))
    # ((x - 2047.5) / 4095 + 0.5) * 255 = 255 x / 4095: 1000 -> 62.27, 2048 -> 127.53.
    image = load_image(path)
    assert grey(image) == [[0, 62, 128, 255]]
    assert image.info["window"] == (2048.0, 4096.0) and image.size == (4, 1)


def test_rescale_then_user_window_overrides_the_file(tmp_path: Path) -> None:
    stored = np.array([[-10, 0, 512, 1000]], dtype=np.int16)  # signed
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=2, intercept=-1024, window=(500, 100))
    # modality: 2 x - 1024 = [-1044, -1024, 0, 976]. File window 500,100: all <= 450.5 -> 0.
    assert grey(load_image(path)) == [[0, 0, 0, 255]]
    # --window 0,2000: 0 at x <= -1000, 255 above 999, else ((x + 0.5) / 1999 + 0.5) * 255:
    # 0 -> 127.56 -> 128, 976 -> 252.07 -> 252.
    assert grey(load_image(path, window=(0, 2000))) == [[0, 0, 128, 252]]


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = np.array([[0, 1000, 2048, 4095]], dtype=np.uint16)
    m1 = write_dicom(
        tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", bits_stored=12, window=(2048, 4096)
    )
    assert grey(load_image(m1)) == [[255, 193, 127, 0]]  # 255 - [0, 62, 128, 255]


def test_voi_lut_sequence_before_the_files_window(tmp_path: Path) -> None:
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 1, 8])  # LUTDescriptor: 4 entries from 1, 8 bits
    item.add_new(0x00283006, "US", [0, 100, 200, 255])  # LUTData
    stored = np.array([[0, 1, 2, 3, 4, 9]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "lut.dcm", stored, window=(1000, 10), VOILUTSequence=Sequence([item])
    )
    # Below the first input (1): LUTData[0]; above the last (4): LUTData[-1]; x 255 / 255.
    image = load_image(path)
    assert grey(image) == [[0, 0, 100, 200, 255, 255]] and image.info["window"] is None
    # --window 2,3 replaces the LUT: 0 at x <= 0.5, 255 above 2.5, else ((x - 1.5) / 2 + 0.5)
    # 255: 1 -> 63.75 -> 64, 2 -> 191.25 -> 191.
    assert grey(load_image(path, window=(2, 3))) == [[0, 64, 191, 255, 255, 255]]


def test_eight_bit_without_window_uses_min_max(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "e.dcm", np.array([[10, 20, 30]], dtype=np.uint8))
    image = load_image(path)
    assert grey(image) == [[0, 128, 255]]  # 255 (x - 10) / 20: 127.5 -> 128
    assert image.info["window"] == (20.5, 21.0)


def test_sixteen_bit_signed_full_range_and_voi_function(tmp_path: Path) -> None:
    stored = np.array([[-32768, -1, 0, 32767]], dtype=np.int16)
    path = write_dicom(tmp_path / "s.dcm", stored, window=(0, 10), voi_function="LINEAR_EXACT")
    # ((x - 0) / 10 + 0.5) * 255: -1 -> 102, 0 -> 127.5 -> 128.
    assert grey(load_image(path)) == [[0, 102, 128, 255]]


def test_dicom_without_suffix_and_in_folders(tmp_path: Path) -> None:
    pixels = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    write_dicom(tmp_path / "IM0001", pixels)
    write_dicom(tmp_path / "1.2.840.5", pixels)
    write_dicom(tmp_path / "b.dcm", pixels)
    (tmp_path / "README").write_text("not an image")
    Image.new("RGB", (2, 2)).save(tmp_path / "c.png")
    found = [p.name for p in collect_inputs([tmp_path])]
    assert found == ["1.2.840.5", "IM0001", "b.dcm", "c.png"]
    assert grey(load_image(tmp_path / "IM0001")) == grey(load_image(tmp_path / "b.dcm"))
    assert grey(load_image(tmp_path / "b.dcm")) == [[0, 85], [170, 255]]


def test_multi_frame_is_refused_as_an_image_and_read_as_frames(tmp_path: Path) -> None:
    stored = np.arange(12, dtype=np.uint16).reshape(3, 2, 2)
    path = write_dicom(tmp_path / "mf.dcm", stored, slope=0.5, intercept=10)
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "volume of 3 frames" in message and "3-D model" in message and str(path) in message
    frames, meta = read_dicom_frames(path)
    assert frames.dtype == np.float32 and frames.shape == (3, 2, 2)
    assert frames.tolist() == (stored * 0.5 + 10).tolist()
    assert meta["affine"] is None and meta["window"] is None  # no geometry in the file


def test_rle_compressed_reads_like_the_uncompressed(tmp_path: Path) -> None:
    assert get_encoder(RLELossless).is_available  # pydicom's own numpy encoder
    stored = np.array([[0, 1000, 2048, 4095], [7, 7, 7, 4000]], dtype=np.uint16)
    plain = write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12)
    ds = pydicom.dcmread(plain)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
    # min..max 0..4095: 255 x / 4095.
    expected = [[0, 62, 128, 255], [0, 0, 0, 249]]
    assert grey(load_image(tmp_path / "rle.dcm")) == grey(load_image(plain)) == expected


def test_read_dicom_series_sorts_by_position(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for name, z, value in [("a.dcm", 10.0, 3), ("b.dcm", 0.0, 1), ("c.dcm", 5.0, 2)]:
        write_dicom(
            folder / name,
            np.full((2, 3), value, dtype=np.uint16),
            slope=10,
            intercept=-5,
            SeriesInstanceUID="1.2.3.4",
            ImagePositionPatient=[20.0, 30.0, z],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            PixelSpacing=[0.5, 0.7],
        )
    voxels, affine = read_dicom_series(folder)
    assert voxels.dtype == np.float32 and voxels.shape == (3, 2, 3)
    assert voxels[:, 0, 0].tolist() == [5.0, 15.0, 25.0]  # 10 x - 5, slices by z: 0, 5, 10
    # (d, h, w) -> RAS: d along +z by 5, h along the column direction (LPS +y: RAS -y) by the
    # row spacing 0.5, w along the row direction (LPS +x: RAS -x) by 0.7; origin (-20, -30, 0).
    expected = [[0, 0, -0.7, -20], [0, -0.5, 0, -30], [5, 0, 0, 0], [0, 0, 0, 1]]
    assert np.allclose(affine, expected)


def test_series_errors_name_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_dicom(folder / "a.dcm", np.zeros((2, 2), np.uint16), SeriesInstanceUID="1.1")
    write_dicom(folder / "b.dcm", np.zeros((2, 2), np.uint16), SeriesInstanceUID="1.2")
    with pytest.raises(DicomError, match="2 series") as caught:
        read_dicom_series(folder)
    assert caught.value.path == str(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DicomError, match="no DICOM files"):
        read_dicom_series(empty)


def test_bad_files_are_image_load_errors(tmp_path: Path) -> None:
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 200)
    with pytest.raises(ImageLoadError, match=r"fake\.dcm"):
        load_image(fake)
    no_pixels = Dataset()
    no_pixels.file_meta = FileMetaDataset()
    no_pixels.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    no_pixels.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    no_pixels.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    no_pixels.PatientName = PATIENT_NAME
    no_pixels.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(ImageLoadError, match="no pixel data") as caught:
        load_image(tmp_path / "report.dcm")
    assert PATIENT_NAME not in str(caught.value)
    big = write_dicom(tmp_path / "big.dcm", np.zeros((10, 10), np.uint8))
    with pytest.raises(ImageLoadError, match="pixel budget"):
        load_image(big, max_pixels=99)


# --- pydicom's bundled files ------------------------------------------------------------------


def bundled(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_testdata_file(name)


def test_bundled_ct_and_mr_files() -> None:
    ct = pydicom.dcmread(bundled("CT_small.dcm"))
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    image = load_image(bundled("CT_small.dcm"))  # no window in the file: min..max
    assert image.size == (128, 128)
    low, high = hu.min(), hu.max()
    expected = np.floor(255 * (hu - low) / (high - low) + 0.5)
    assert grey(image) == expected.astype(int).tolist()
    soft = grey(load_image(bundled("CT_small.dcm"), window=(40, 400)))
    assert np.array_equal(np.asarray(soft), apply_window(hu, 40, 400))
    mr = pydicom.dcmread(bundled("MR_small.dcm"))  # WindowCenter 600, WindowWidth 1600
    reference = grey(load_image(bundled("MR_small.dcm")))
    assert np.array_equal(np.asarray(reference), apply_window(mr.pixel_array, 600, 1600))
    assert 0 < np.mean(reference) < 255
    # The same pixels in other encodings: big endian, RLE (pure Python), JPEG 2000 (Pillow).
    for name in ("MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        assert grey(load_image(bundled(name))) == reference, name


def test_bundled_jpeg_ls_names_what_to_install() -> None:
    path = bundled("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder(JPEGLSLossless).is_available:  # an extra decoder is installed: it decodes
        assert grey(load_image(path)) == grey(load_image(bundled("MR_small.dcm")))
        return
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "JPEG-LS Lossless" in message and "pip install" in message and "pyjpegls" in message


def test_bundled_multi_frame_and_colour_files() -> None:
    with pytest.raises(ImageLoadError, match="volume of 15 frames"):
        load_image(bundled("rtdose.dcm"))
    frames, meta = read_dicom_frames(bundled("rtdose.dcm"))
    assert frames.shape == (15, 10, 10) and frames.dtype == np.float32
    # Frame 1 lies at ImagePositionPatient (LPS) + GridFrameOffsetVector[1] = 5 mm along the
    # normal (+z); RAS flips x and y.
    ds = pydicom.dcmread(bundled("rtdose.dcm"))
    origin = np.array([float(v) for v in ds.ImagePositionPatient])
    world = meta["affine"] @ np.array([1.0, 0.0, 0.0, 1.0])
    assert np.allclose(world[:3], [-origin[0], -origin[1], origin[2] + 5.0])
    assert "RescaleSlope" not in ds  # no modality LUT: the stored values
    assert frames[3].tolist() == ds.pixel_array[3].astype(np.float32).tolist()
    rgb = np.asarray(load_image(bundled("examples_rgb_color.dcm")))
    assert rgb.shape == (240, 320, 3) and (rgb[..., 0] != rgb[..., 1]).any()
    palette = np.asarray(load_image(bundled("examples_palette.dcm")))
    assert palette.shape == (350, 800, 3) and (palette[..., 0] != palette[..., 2]).any()


def test_dicom_uid_reads_the_header() -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"), stop_before_pixels=True)
    assert dicom_uid(bundled("CT_small.dcm")) == str(ds.SOPInstanceUID)


# --- 16-bit PNG and TIFF ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_files_keep_their_range(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"twelve{suffix}"
    Image.fromarray(np.array([[0, 1000, 2048, 4095]], dtype=np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    # min..max 0..4095: 255 x / 4095 (not 255 x / 65535, which made this image almost black).
    image = load_image(path)
    assert grey(image) == [[0, 62, 128, 255]] and image.info["window"] == (2048.0, 4096.0)
    # window 1000,1000: 0 at x <= 500, 255 above 1499, 1000 -> ((0.5 / 999) + 0.5) 255 = 127.6.
    assert grey(load_image(path, window=(1000, 1000))) == [[0, 128, 255, 255]]


# --- the command line: options and privacy ----------------------------------------------------


def _all_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    return [(p, p.read_bytes()) for p in files]


@pytest.fixture(scope="module")
def patient_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(24, 32), dtype=np.uint16)
    return write_dicom(
        folder / "chest.dcm",
        stored,
        bits_stored=12,
        window=(2048, 4096),
        patient=True,
        SOPInstanceUID=SOP_UID,
    )


def test_explain_writes_no_patient_data(tmp_path: Path, patient_file: Path) -> None:
    ds = pydicom.dcmread(patient_file)
    assert str(ds.PatientName) == PATIENT_NAME and str(ds.SOPInstanceUID) == SOP_UID
    assert PRIVATE_VALUE.encode() in patient_file.read_bytes()
    secrets = [PATIENT_NAME, "Zyxwvut", "Qwertyuiop", PATIENT_ID, PRIVATE_CREATOR, PRIVATE_VALUE]
    for keep_uid in (False, True):
        out = tmp_path / f"out_{keep_uid}"
        args = ["explain", str(patient_file), "--out", str(out)]
        result = CliRunner().invoke(main, args + (["--keep-uid"] if keep_uid else []))
        assert result.exit_code == 0, result.output
        (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert record["status"] == "ok" and record["input"] == str(patient_file)
        assert record["size"] == [32, 24] and record["window"] == [2048.0, 4096.0]
        contents = _all_bytes(out)
        for path, data in contents:
            for secret in secrets:
                assert secret.encode() not in data, (secret, path)
        holding_uid = [path for path, data in contents if SOP_UID.encode() in data]
        if keep_uid:
            assert record["sop_instance_uid"] == SOP_UID and out / "results.jsonl" in holding_uid
        else:
            assert "sop_instance_uid" not in record and holding_uid == []


def test_explain_window_option(tmp_path: Path, patient_file: Path) -> None:
    png = tmp_path / "twelve.png"
    Image.fromarray(np.array([[0, 1000], [2048, 4095]], dtype=np.uint16)).save(png)
    text = PngImagePlugin.PngInfo()
    text.add_text("window", "not a window")  # a text chunk lands in Pillow's image.info
    Image.new("RGB", (4, 4)).save(tmp_path / "eight.png", pnginfo=text)
    out = tmp_path / "out"
    inputs = [str(patient_file), str(png), str(tmp_path / "eight.png")]
    result = CliRunner().invoke(
        main, ["explain", *inputs, "--out", str(out), "--window", "1000,1000"]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r.get("window") for r in records] == [[1000.0, 1000.0], [1000.0, 1000.0], None]
    assert records[1]["size"] == [2, 2]
    settings = json.loads((out / ".camlens" / "run.json").read_text())
    assert "1000" in json.dumps(settings)


@pytest.mark.parametrize("text", ["abc", "40", "40,0"])
def test_explain_refuses_a_bad_window(tmp_path: Path, patient_file: Path, text: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["explain", str(patient_file), "--out", str(out), "--window", text]
    )
    assert result.exit_code == 2
    assert "--window" in result.output and "window" in result.output.lower()
    assert not out.exists()


def test_explain_help_documents_the_options() -> None:
    result = CliRunner().invoke(main, ["explain", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--window C,W" in text and "--keep-uid" in text and "DICOM" in text


def test_python_explain_uses_the_windowed_image(patient_file: Path) -> None:
    import camlens

    result = camlens.explain("efficientnet_lite0", [patient_file], window="0,8192")
    shown = np.asarray(result.display_image(0))
    assert np.array_equal(shown, np.asarray(load_image(patient_file, window=(0, 8192))))
    # 0..4095 in the window 0,8192: ((x + 0.5) / 8191 + 0.5) 255 >= 127.5: the upper half.
    assert shown.min() >= 128


def test_read_dicom_image_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DicomError, match="folder"):
        read_dicom_image(tmp_path)


def test_resume_with_another_window_is_refused(tmp_path: Path, patient_file: Path) -> None:
    out = tmp_path / "out"
    first = ["explain", str(patient_file), "--out", str(out), "--window", "1000,1000"]
    assert CliRunner().invoke(main, first).exit_code == 0
    again = ["explain", str(patient_file), "--out", str(out), "--resume", "--window", "5,10"]
    result = CliRunner().invoke(main, again)
    assert result.exit_code == 2 and "window" in result.output, result.output
