"""DICOM input and the grey-level window that turns wide-range pixels into 8-bit ones.

A DICOM file's stored values go through the same steps as on a radiologist's screen
(DICOM PS3.3 C.11): the modality LUT (``RescaleSlope`` / ``RescaleIntercept``, or a Modality
LUT Sequence: stored values to Hounsfield units for CT), then the VOI transform (a VOI LUT
Sequence, or the file's ``WindowCenter`` / ``WindowWidth``, or the user's ``--window C,W``,
which overrides both; the image's min..max when there is none), then ``MONOCHROME1`` images
are inverted so that bone is bright in every output. :func:`read_dicom_image` returns the
result as the 8-bit RGB image a model and an overlay use; :func:`read_dicom_frames` and
:func:`read_dicom_series` return the rescaled values of a multi-frame file or a folder of
slices for 3-D models (:mod:`camlens.io.volumes`).

Only pixel data and geometry are read into results: patient, study and private tags never
leave this module (the SOP Instance UID only through :func:`dicom_uid`, on request).

pydicom is imported on first use (the ``medical`` extra). Decodable here: uncompressed
(little/big endian, deflated), RLE Lossless (pure Python), and JPEG Baseline / Extended and
JPEG 2000 through Pillow; JPEG-LS, JPEG Lossless and HTJ2K need pylibjpeg, pyjpegls or
python-gdcm, and the error says which.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camlens.errors import CamlensError, ConfigError

__all__ = [
    "DICOM_SUFFIXES",
    "DicomError",
    "apply_window",
    "dicom_uid",
    "has_dicom_preamble",
    "is_dicom_path",
    "min_max_window",
    "parse_window",
    "read_dicom_frames",
    "read_dicom_image",
    "read_dicom_series",
]

#: File suffixes (lowercase) read as DICOM whatever their content starts with.
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})

_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_PIP_NAMES = {"gdcm": "python-gdcm"}
_PACKAGE_RE = re.compile(r"([A-Za-z][\w.-]*)\s*>=")


class DicomError(CamlensError):
    """A DICOM file or series could not be read; the message names it and says what to do.

    :func:`camlens.io.load_image` re-raises it as an ``ImageLoadError`` (a per-input error
    record in batch jobs); callers of :func:`read_dicom_frames` / :func:`read_dicom_series`
    do the same with their own error type.

    Attributes
    ----------
    message : str
        The explanation (also ``str(error)``).
    path : str or None
        The offending file or folder, as given.

    Examples
    --------
    >>> try:
    ...     read_dicom_image("missing.dcm")
    ... except DicomError as error:
    ...     print(error.path)
    missing.dcm
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


# --- windows ------------------------------------------------------------------------------


def parse_window(text: str | Sequence[float] | None) -> tuple[float, float] | None:
    """A grey-level window ``C,W`` (centre, width) from text or a pair; ``None`` stays ``None``.

    Parameters
    ----------
    text : str, pair of numbers or None
        ``"40,400"`` (the CT soft-tissue window), ``"-600, 1500"``, or ``(40, 400)``.

    Returns
    -------
    tuple of float or None
        ``(center, width)``.

    Raises
    ------
    ConfigError
        Not two numbers separated by a comma, not finite, or a width below 1.

    Examples
    --------
    >>> parse_window("40,400"), parse_window((-600, 1500)), parse_window(None)
    ((40.0, 400.0), (-600.0, 1500.0), None)
    """
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        center, width = (float(part) for part in parts)
    except (TypeError, ValueError):
        raise ConfigError(
            f"cannot read the window {text!r}: give the centre and the width as two numbers "
            "separated by a comma, e.g. --window 40,400 (window=(40, 400) in Python)"
        ) from None
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
        raise ConfigError(
            f"the window {text!r} is not usable: the centre must be finite and the width a "
            "finite number of at least 1 (DICOM's linear window), e.g. --window 40,400"
        )
    return center, width


def min_max_window(values: np.ndarray) -> tuple[float, float]:
    """The window that maps ``values``' minimum to 0 and maximum to 255, as (centre, width).

    With DICOM's linear formula (:func:`apply_window`) a window ``(min + max) / 2 + 0.5,
    max - min + 1`` maps ``x`` to ``255 * (x - min) / (max - min)``; a constant image (width
    1) maps to 0.

    Examples
    --------
    >>> min_max_window(np.array([0, 4095]))
    (2048.0, 4096.0)
    """
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return 0.5, 1.0
    low, high = float(finite.min()), float(finite.max())
    return (low + high) / 2 + 0.5, high - low + 1


def apply_window(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Map values through a VOI window to 0..255 (uint8), DICOM PS3.3 C.11.2.1.2.

    ``LINEAR`` (the default and the DICOM formula for ``WindowCenter`` / ``WindowWidth``)::

        y = 0                                            if x <= c - 0.5 - (w - 1) / 2
        y = 255                                          if x >  c - 0.5 + (w - 1) / 2
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255      otherwise

    ``LINEAR_EXACT``: ``y = ((x - c) / w + 0.5) * 255`` clipped to 0..255; ``SIGMOID``:
    ``y = 255 / (1 + exp(-4 (x - c) / w))``. ``y`` is rounded half up.

    Parameters
    ----------
    values : numpy.ndarray
        Modality values (after rescale slope and intercept), any shape.
    center, width : float
        The window; ``width >= 1`` for ``LINEAR``, ``> 0`` otherwise.
    function : str, optional
        The file's ``VOILUTFunction``: ``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``.

    Returns
    -------
    numpy.ndarray
        uint8, the shape of ``values``.

    Examples
    --------
    >>> apply_window(np.array([0, 40, 1000, 4095]), 2048, 4096).tolist()  # min..max of 0..4095
    [0, 2, 62, 255]
    >>> apply_window(np.array([-200, 40, 240]), 40, 401).tolist()  # CT soft tissue
    [0, 128, 255]
    """
    x = np.asarray(values, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255.0
    elif width <= 1:  # one grey level: a step at the centre
        y = np.where(x > center - 0.5, 255.0, 0.0)
    else:
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    y = np.nan_to_num(y, nan=0.0, posinf=255.0, neginf=0.0)
    return np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8)


# --- recognising DICOM files ----------------------------------------------------------------


def has_dicom_preamble(path: str | os.PathLike) -> bool:
    """Whether the file has DICOM's 128-byte preamble followed by ``DICM`` (False if it
    cannot be read).

    Examples
    --------
    >>> _ = Path("note.txt").write_text("hello")
    >>> has_dicom_preamble("note.txt")
    False
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as DICOM: a ``.dcm`` / ``.dicom`` suffix, or a regular file
    with the DICOM preamble (DICOM files are often named without a suffix).

    Examples
    --------
    >>> is_dicom_path("chest.DCM"), is_dicom_path("photo.png")
    (True, False)
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix in DICOM_SUFFIXES:
        return True
    return os.path.isfile(path) and has_dicom_preamble(path)


# --- reading --------------------------------------------------------------------------------


def read_dicom_image(
    path: str | os.PathLike,
    *,
    window: tuple[float, float] | None = None,
    max_pixels: int | None = None,
) -> Any:
    """Read a single-frame DICOM file as the 8-bit RGB image a model and an overlay use.

    The stored values go through the modality LUT (rescale slope and intercept), then the
    VOI transform: ``window`` when given, else the file's VOI LUT Sequence, else its first
    ``WindowCenter`` / ``WindowWidth`` (with its ``VOILUTFunction``), else the image's
    min..max (:func:`min_max_window`); ``MONOCHROME1`` is then inverted (bone bright).
    Colour files (RGB, YBR: converted by pydicom; ``PALETTE COLOR``: its LUT applied) are
    scaled from their bit depth to 8 bits; ``window`` does not apply to them.

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM file (with or without the preamble).
    window : (float, float) or None, optional
        ``(center, width)`` in modality units (e.g. Hounsfield units), overriding the file's.
    max_pixels : int or None, optional
        Refuse files with more pixels (rows x columns) than this, before decoding.

    Returns
    -------
    PIL.Image.Image
        ``RGB``; ``info["original_size"]`` is (columns, rows) and ``info["window"]`` the
        (centre, width) applied (``None`` for colour and VOI LUT files).

    Raises
    ------
    DicomError
        Unreadable or not DICOM, no pixel data, several frames (a volume), too many pixels,
        or a transfer syntax that no installed decoder handles (the message names the
        packages to install).

    Examples
    --------
    >>> from pydicom.data import get_testdata_file
    >>> image = read_dicom_image(get_testdata_file("CT_small.dcm"), window=(40, 400))
    >>> image.mode, image.size, image.info["window"]
    ('RGB', (128, 128), (40, 400))
    """
    from PIL import Image

    source = os.fspath(path)
    ds = _read_dataset(source)
    _check_pixel_budget(ds, source, max_pixels)
    frames = _frame_count(ds)
    if frames > 1:
        raise DicomError(
            f"cannot read '{source}' as an image: it is a volume of {frames} frames (a "
            "multi-frame DICOM file); explain it as a volume, with a 3-D model: camlens "
            f"explain '{source}' --model <a 3-D model> (a series of single-frame slices: "
            "pass its folder)",
            source,
        )
    pixels = _decode(ds, source)
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or _photometric(ds) == "PALETTE COLOR":
        rgb, applied = _colour_to_uint8(ds, pixels), None
    else:
        grey, applied = _grey_to_uint8(ds, pixels, window)
        rgb = np.repeat(grey[..., None], 3, axis=2)
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    image.info["original_size"] = image.size
    image.info["window"] = applied
    return image


def read_dicom_frames(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """The frames of a (multi-frame) monochrome DICOM file, rescaled, and its geometry.

    Parameters
    ----------
    path : str or os.PathLike
        A DICOM file with one or more frames.

    Returns
    -------
    frames : numpy.ndarray
        float32 (F, H, W): modality values (rescale slope and intercept applied; Hounsfield
        units for CT).
    meta : dict
        No patient data: ``"window"`` (the file's first (centre, width) or ``None``),
        ``"voi_function"``, ``"monochrome1"`` (bool), ``"modality"``, ``"transfer_syntax"``
        (its name), ``"pixel_spacing"`` ((row, column) mm or ``None``), ``"positions"`` ((F, 3)
        ImagePositionPatient per frame, LPS mm, or ``None``), ``"orientation"`` (the six
        direction cosines or ``None``) and ``"affine"``: (4, 4) from voxel index (d, h, w, 1)
        to RAS+ mm (``camlens.io.volumes``' convention), or ``None`` when the file lacks
        positions, orientation or spacing.

    Raises
    ------
    DicomError
        Unreadable or not DICOM, no pixel data, a colour image, or an undecodable transfer
        syntax.

    Examples
    --------
    >>> from pydicom.data import get_testdata_file
    >>> frames, meta = read_dicom_frames(get_testdata_file("rtdose.dcm"))  # an RT dose grid
    >>> frames.shape, frames.dtype, meta["affine"][2, 0]  # frames 5 mm apart along z
    ((15, 10, 10), dtype('float32'), np.float64(5.0))
    """
    source = os.fspath(path)
    ds = _read_dataset(source)
    pixels = _decode(ds, source)
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or _photometric(ds) == "PALETTE COLOR":
        raise DicomError(
            f"cannot read '{source}' as a volume: it is a colour image "
            f"({_photometric(ds)}); volumes must be monochrome",
            source,
        )
    frames = _frame_count(ds)
    values = _modality(ds, pixels).astype(np.float32, copy=False)
    values = values.reshape(frames, *values.shape[-2:])
    return values, _frames_meta(ds, frames)


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a folder of single-frame DICOM slices as one volume, sorted by position.

    Every DICOM file directly in ``folder`` (suffix ``.dcm`` / ``.dicom`` or the DICOM
    preamble; hidden files skipped) is a slice. They must belong to one series
    (``SeriesInstanceUID``) and have the same size. Slices are sorted by their position along
    the slice normal (``ImagePositionPatient`` projected on the cross product of the
    ``ImageOrientationPatient`` row and column directions), or by ``InstanceNumber`` when
    positions are missing (the affine is then ``None``).

    Parameters
    ----------
    folder : str or os.PathLike
        The series' folder.

    Returns
    -------
    voxels : numpy.ndarray
        float32 (D, H, W): modality values (rescale applied per slice).
    affine : numpy.ndarray or None
        (4, 4) from voxel index (d, h, w, 1) to RAS+ mm (``camlens.io.volumes``' convention:
        DICOM's LPS x and y negated); ``None`` without positions, orientation or spacing.
        ``camlens.io.volumes.read_volume`` wraps both in a ``Volume``.

    Raises
    ------
    DicomError
        No DICOM files, several series, slices of different sizes, a multi-frame file among
        them, or a slice that cannot be read.

    Examples
    --------
    >>> import pydicom
    >>> from pydicom.data import get_testdata_file
    >>> ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    >>> os.mkdir("series")
    >>> for i, z in enumerate([10.0, 0.0, 5.0]):  # written out of order
    ...     ds.ImagePositionPatient = [-158.0, -179.0, z]
    ...     ds.save_as(f"series/{i}.dcm")
    >>> voxels, affine = read_dicom_series("series")
    >>> voxels.shape, affine[:3, 3].tolist()  # the lowest slice's corner in RAS+ mm
    ((3, 128, 128), [158.0, 179.0, 0.0])
    """
    source = os.fspath(folder)
    files = _series_files(Path(source))
    datasets = [_read_dataset(os.fspath(file)) for file in files]
    _check_one_series(datasets, files, source)
    order, positions = _slice_order(datasets)
    slices = [_series_slice(datasets[i], os.fspath(files[i]), source) for i in order]
    if len({s.shape for s in slices}) > 1:
        sizes = sorted({f"{s.shape[1]}x{s.shape[0]}" for s in slices})
        raise DicomError(
            f"cannot read the series in '{source}': its slices have different sizes "
            f"({', '.join(sizes)}); keep one series per folder",
            source,
        )
    voxels = np.stack(slices).astype(np.float32, copy=False)
    first = datasets[order[0]]
    sorted_positions = None if positions is None else positions[order]
    affine = _affine(
        _floats(first.get("ImageOrientationPatient")),
        _floats(first.get("PixelSpacing")),
        sorted_positions,
        _slice_step(first),
    )
    return voxels, affine


def dicom_uid(path: str | os.PathLike) -> str | None:
    """The SOP Instance UID of a DICOM file (the header only is read), or ``None``.

    Examples
    --------
    >>> from pydicom.data import get_testdata_file
    >>> dicom_uid(get_testdata_file("CT_small.dcm"))
    '1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322'
    """
    try:
        import pydicom

        ds = pydicom.dcmread(
            os.fspath(path), stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"]
        )
    except Exception:  # an unreadable file has no UID to report
        return None
    uid = ds.get("SOPInstanceUID")
    return str(uid) if uid else None


# --- helpers ----------------------------------------------------------------------------------


def _read_dataset(source: str) -> Any:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise DicomError(
            f"cannot read '{source}': reading DICOM needs pydicom, which is not installed; "
            "install camlens' medical extra: pip install 'camlens[medical]'",
            source,
        ) from None

    if not os.path.exists(source):
        raise DicomError(f"cannot read '{source}': the file does not exist; check the path", source)
    if os.path.isdir(source):
        raise DicomError(
            f"cannot read '{source}' as a DICOM file: it is a folder (a DICOM series is read "
            "as a volume, by a 3-D model)",
            source,
        )
    try:
        try:
            ds = pydicom.dcmread(source)
        except InvalidDicomError:  # no preamble: many older files; force reads them
            ds = pydicom.dcmread(source, force=True)
    except PermissionError:
        raise DicomError(
            f"cannot read '{source}': permission denied; check the file's permissions", source
        ) from None
    except Exception as error:  # pydicom raises many types for a damaged file
        raise DicomError(
            f"cannot read '{source}': it is not a readable DICOM file ({_short(error)}); "
            "check that it is really DICOM, or re-export it",
            source,
        ) from error
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DicomError(
            f"cannot read '{source}': it is not a DICOM image (no pixel data; "
            f"SOP class {_sop_class(ds)})",
            source,
        )
    return ds


def _check_pixel_budget(ds: Any, source: str, max_pixels: int | None) -> None:
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or columns <= 0:
        raise DicomError(f"cannot read '{source}': it has no pixels ({columns}x{rows})", source)
    if max_pixels is not None and rows * columns > max_pixels:
        raise DicomError(
            f"cannot read '{source}': it has {rows * columns:,} pixels, above the limit of "
            f"{max_pixels:,} (the pixel budget); if you trust the file, raise it: "
            "--max-pixels on the command line, max_pixels= in Python",
            source,
        )


def _decode(ds: Any, source: str) -> np.ndarray:
    syntax = _transfer_syntax(ds)
    compressed = syntax is not None and syntax.is_compressed
    if compressed:
        _check_decoder(syntax, source)
    try:
        return ds.pixel_array
    except Exception as error:  # truncated data, bad lengths, decoder failures
        hint = "the file may be truncated or corrupt: re-export it"
        if compressed:
            others = _other_decoders(syntax)
            hint = f"the installed decoder could not decode this {syntax.name} file; " + (
                f"try another: {others}" if others else "re-export it uncompressed"
            )
        raise DicomError(
            f"cannot read '{source}': its pixel data could not be decoded "
            f"({_short(error)}); {hint}",
            source,
        ) from error


def _other_decoders(syntax: Any) -> str:
    """The pip commands of the decoders of ``syntax`` that are not installed."""
    from pydicom.pixels import get_decoder

    try:
        missing = get_decoder(syntax).missing_dependencies
    except NotImplementedError:
        return ""
    return "; ".join(_pip_command(line) for line in missing)


def _frame_count(ds: Any) -> int:
    """``NumberOfFrames`` (1 when absent or unreadable)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _check_decoder(syntax: Any, source: str) -> None:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(
            f"cannot read '{source}': its transfer syntax {syntax.name} ({syntax}) has no "
            "pixel decoder in pydicom; convert the file to an uncompressed transfer syntax "
            "(e.g. dcmdjpeg or gdcmconv --raw)",
            source,
        ) from None
    if decoder.is_available:
        return
    options = [_pip_command(line) for line in decoder.missing_dependencies]
    raise DicomError(
        f"cannot read '{source}': its pixel data is compressed with {syntax.name} ({syntax}), "
        "which no installed package decodes; install one of: " + "; ".join(options),
        source,
    )


def _pip_command(requirement: str) -> str:
    """``'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1'`` ->
    ``'pip install pylibjpeg pylibjpeg-libjpeg'``."""
    names = [
        _PIP_NAMES.get(name, name) for name in _PACKAGE_RE.findall(requirement) if name != "numpy"
    ]
    return "pip install " + " ".join(names) if names else requirement


def _grey_to_uint8(
    ds: Any, pixels: np.ndarray, window: tuple[float, float] | None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Modality LUT, VOI (user window, VOI LUT, file window, min..max), MONOCHROME1."""
    values = _modality(ds, pixels)
    applied: tuple[float, float] | None
    if window is None and "VOILUTSequence" in ds:
        grey, applied = _voi_lut(ds, values), None
    else:
        applied = window or _file_window(ds) or min_max_window(values)
        function = "LINEAR" if window is not None else str(ds.get("VOILUTFunction", "LINEAR"))
        function = function.upper() if function.upper() in _VOI_FUNCTIONS else "LINEAR"
        grey = apply_window(values, *applied, function=function)
    if _photometric(ds) == "MONOCHROME1":
        grey = 255 - grey
    return grey, applied


def _modality(ds: Any, pixels: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(pixels, ds)
    return values if values.dtype.kind == "f" else values.astype(np.float64)


def _voi_lut(ds: Any, values: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_voi_lut

    item = ds.VOILUTSequence[0]
    bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
    top = float(2 ** min(max(bits, 1), 16) - 1)
    out = apply_voi_lut(values.astype(np.int64), ds, index=0, prefer_lut=True)
    return np.floor(np.clip(out / top * 255.0, 0, 255) + 0.5).astype(np.uint8)


def _file_window(ds: Any) -> tuple[float, float] | None:
    center, width = _floats(ds.get("WindowCenter")), _floats(ds.get("WindowWidth"))
    if not center or not width or width[0] < 1:
        return None
    return center[0], width[0]


def _colour_to_uint8(ds: Any, pixels: np.ndarray) -> np.ndarray:
    if _photometric(ds) == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
    bits = 16 if pixels.dtype.itemsize >= 2 and _photometric(ds) == "PALETTE COLOR" else None
    bits = bits or int(ds.get("BitsStored", 8) or 8)
    if pixels.dtype == np.uint8 and bits <= 8:
        return pixels
    top = float(2**bits - 1)
    return np.floor(np.clip(pixels.astype(np.float64) / top * 255.0, 0, 255) + 0.5).astype(np.uint8)


def _frames_meta(ds: Any, frames: int) -> dict[str, Any]:
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    orientation = _floats(ds.get("ImageOrientationPatient")) or _nested(
        shared, "PlaneOrientationSequence", "ImageOrientationPatient"
    )
    spacing = _floats(ds.get("PixelSpacing")) or _nested(
        shared, "PixelMeasuresSequence", "PixelSpacing"
    )
    positions = _frame_positions(ds, frames)
    step = _slice_step(ds) or _nested_value(shared, "PixelMeasuresSequence", "SpacingBetweenSlices")
    window = _file_window(ds)
    return {
        "window": window,
        "voi_function": str(ds.get("VOILUTFunction", "LINEAR")),
        "monochrome1": _photometric(ds) == "MONOCHROME1",
        "modality": str(ds.get("Modality", "")) or None,
        "transfer_syntax": getattr(_transfer_syntax(ds), "name", None),
        "pixel_spacing": tuple(spacing[:2]) if spacing else None,
        "positions": positions,
        "orientation": tuple(orientation) if orientation else None,
        "affine": _affine(orientation, spacing, positions, step),
    }


def _frame_positions(ds: Any, frames: int) -> np.ndarray | None:
    """(F, 3) positions: per frame (enhanced multi-frame), or the file's position plus the
    ``GridFrameOffsetVector`` (RT dose) along the normal, or ``None``."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) == frames:
        found = [
            _nested(item, "PlanePositionSequence", "ImagePositionPatient") for item in per_frame
        ]
        if all(p is not None and len(p) == 3 for p in found):
            return np.array(found, dtype=np.float64)
    origin = _floats(ds.get("ImagePositionPatient"))
    if origin is None or len(origin) != 3:
        return None
    if frames == 1:
        return np.array([origin], dtype=np.float64)
    offsets = _floats(ds.get("GridFrameOffsetVector"))
    orientation = _floats(ds.get("ImageOrientationPatient"))
    if offsets is None or len(offsets) != frames or orientation is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:6])
    return np.asarray(origin) + np.outer(offsets, normal)


def _affine(
    orientation: Sequence[float] | None,
    spacing: Sequence[float] | None,
    positions: np.ndarray | None,
    step: float | None,
) -> np.ndarray | None:
    """(d, h, w, 1) -> RAS+ mm. Columns: the slice step, the row step (along the column
    direction cosines, ``PixelSpacing[0]``), the column step (row cosines, ``[1]``), origin."""
    if orientation is None or len(orientation) != 6 or not spacing or positions is None:
        return None
    row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:6])
    if len(positions) > 1:
        slice_vec = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        slice_vec = np.cross(row_dir, col_dir) * (step or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = slice_vec
    affine[:3, 1] = col_dir * float(spacing[0])
    affine[:3, 2] = row_dir * float(spacing[1])
    affine[:3, 3] = positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS


def _series_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DicomError(
            f"cannot read '{folder}' as a DICOM series: it is not a folder", os.fspath(folder)
        )
    try:
        children = sorted(folder.iterdir())
    except OSError as error:
        raise DicomError(
            f"cannot list folder '{folder}': {error.strerror or error}; check its permissions",
            os.fspath(folder),
        ) from error
    files = [
        child
        for child in children
        if not child.name.startswith(".") and child.is_file() and is_dicom_path(child)
    ]
    if not files:
        raise DicomError(
            f"cannot read '{folder}' as a DICOM series: it holds no DICOM files (.dcm, or "
            "files with the DICOM preamble)",
            os.fspath(folder),
        )
    return files


def _check_one_series(datasets: list[Any], files: list[Path], source: str) -> None:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise DicomError(
            f"cannot read the series in '{source}': its {len(files)} files belong to "
            f"{len(series)} series (SeriesInstanceUID); put each series in its own folder",
            source,
        )
    for ds, file in zip(datasets, files, strict=True):
        frames = _frame_count(ds)
        if frames > 1:
            raise DicomError(
                f"cannot read the series in '{source}': '{file.name}' holds {frames} frames; "
                "a series folder holds single-frame slices (read a multi-frame file alone)",
                source,
            )


def _slice_order(datasets: list[Any]) -> tuple[list[int], np.ndarray | None]:
    positions = [_floats(ds.get("ImagePositionPatient")) for ds in datasets]
    orientation = _floats(datasets[0].get("ImageOrientationPatient"))
    if orientation and len(orientation) == 6 and all(p and len(p) == 3 for p in positions):
        array = np.array(positions, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:6])
        return sorted(range(len(datasets)), key=lambda i: float(array[i] @ normal)), array
    numbers = [int(ds.get("InstanceNumber", 0) or 0) for ds in datasets]
    return sorted(range(len(datasets)), key=lambda i: numbers[i]), None


def _series_slice(ds: Any, file: str, source: str) -> np.ndarray:
    pixels = _decode(ds, file)
    if pixels.ndim != 2:
        raise DicomError(
            f"cannot read the series in '{source}': '{Path(file).name}' is not a single "
            f"monochrome slice (pixel array of shape {pixels.shape})",
            source,
        )
    return _modality(ds, pixels)


def _slice_step(ds: Any) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _floats(ds.get(keyword))
        if value and value[0] > 0:
            return value[0]
    return None


def _first(ds: Any, keyword: str) -> Any:
    sequence = ds.get(keyword) if ds is not None else None
    return sequence[0] if sequence else None


def _nested(ds: Any, sequence: str, keyword: str) -> list[float] | None:
    item = _first(ds, sequence)
    return _floats(item.get(keyword)) if item is not None else None


def _nested_value(ds: Any, sequence: str, keyword: str) -> float | None:
    values = _nested(ds, sequence, keyword)
    return values[0] if values else None


def _floats(value: Any) -> list[float] | None:
    """A DICOM number or multi-value as a list of floats; ``None`` when absent or bad."""
    if value is None or value == "":
        return None
    iterable = hasattr(value, "__iter__") and not isinstance(value, (str, bytes))
    items = list(value) if iterable else [value]
    try:
        return [float(item) for item in items]
    except (TypeError, ValueError):
        return None


def _photometric(ds: Any) -> str:
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()


def _transfer_syntax(ds: Any) -> Any:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _sop_class(ds: Any) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", None) or str(uid or "unknown")


def _short(error: BaseException, limit: int = 160) -> str:
    text = " ".join((str(error) or type(error).__name__).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
