"""3-D volumes: NIfTI files, DICOM series folders and multi-frame DICOM files.

:class:`Volume` is what every reader returns: voxels as a float32 array in the order
(D, H, W) = (slice, row, column) and, where the file says where it lies in the body, the
4 x 4 affine that maps a voxel's array index ``(d, h, w, 1)`` to world coordinates in
millimetres, in the RAS+ convention of NIfTI (x grows towards the patient's right, y
towards anterior, z towards superior; DICOM's LPS coordinates have x and y negated). :func:`read_volume` dispatches on the path; :func:`volume_batch` windows, resizes
and normalises a volume into the tensor a 3-D model reads; :func:`write_volume_map` writes a
map over a volume as NIfTI, aligned with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from camlens.errors import ConfigError
from camlens.io.images import IMAGE_EXTENSIONS, ImageLoadError
from camlens.io.medical import (
    DICOM_SUFFIXES,
    DicomError,
    is_dicom_path,
    read_dicom_frames,
    read_dicom_series,
)
from camlens.writers import write_nifti

__all__ = [
    "DEFAULT_PERCENTILES",
    "NIFTI_SUFFIXES",
    "Volume",
    "VolumeLoadError",
    "collect_volumes",
    "is_volume_path",
    "radiological_flips",
    "read_volume",
    "volume_batch",
    "volume_window",
    "windowed",
    "write_volume_map",
]

#: The default window of a volume: its 0.5th to 99.5th percentile.
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)

#: File name endings read as NIfTI volumes (lowercase).
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


class VolumeLoadError(ImageLoadError):
    """A volume could not be read; the message names the path, what is wrong and what to do.

    It is an :class:`~camlens.io.images.ImageLoadError`, so batch jobs turn it into a per-input
    error record like any unreadable image.

    Examples
    --------
    >>> try:
    ...     read_volume("missing.nii.gz")
    ... except VolumeLoadError as error:
    ...     print(error.path)
    missing.nii.gz
    """


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D image in memory.

    Parameters
    ----------
    voxels : numpy.ndarray
        float32, shape (D, H, W): slice, row, column. For NIfTI this is the file's data
        reoriented to the closest canonical (RAS+) order and transposed, so that ``d`` runs
        inferior to superior, ``h`` posterior to anterior and ``w`` from the patient's left to
        right. For a DICOM series ``d`` follows the slice positions along the slice normal,
        ``h`` and ``w`` the rows and columns of the files.
    affine : numpy.ndarray or None
        float64 (4, 4): world (RAS+, millimetres) ``= affine @ (d, h, w, 1)``, or ``None`` when
        the file does not say where the volume lies.
    source : str
        The path as given (file or folder), for messages and records.
    orientation : numpy.ndarray or None
        NIfTI inputs only: the file's axis orientation (``nibabel.io_orientation`` of its
        affine, (3, 2)), so that a map can be written back in the file's own voxel order
        (:func:`write_volume_map`); None otherwise.

    Examples
    --------
    >>> v = Volume(np.zeros((2, 3, 4), np.float32), np.eye(4), "scan.nii.gz")
    >>> v.shape
    (2, 3, 4)
    >>> v.world((1, 2, 3)).tolist()
    [1.0, 2.0, 3.0]
    """

    voxels: np.ndarray
    affine: np.ndarray | None
    source: str
    orientation: np.ndarray | None = None

    def __post_init__(self) -> None:
        voxels = np.asarray(self.voxels, dtype=np.float32)
        if voxels.ndim != 3 or min(voxels.shape) < 1:
            raise VolumeLoadError(
                f"cannot use {self.source!r} as a volume: its voxels have shape "
                f"{tuple(voxels.shape)}, not (D, H, W) with every side at least 1",
                self.source,
            )
        object.__setattr__(self, "voxels", voxels)
        if self.affine is not None:
            affine = np.asarray(self.affine, dtype=np.float64)
            if affine.shape != (4, 4):
                raise VolumeLoadError(
                    f"cannot use {self.source!r} as a volume: its affine has shape "
                    f"{affine.shape}, not (4, 4)",
                    self.source,
                )
            object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The voxel grid's (D, H, W)."""
        return tuple(int(side) for side in self.voxels.shape)  # type: ignore[return-value]

    def world(self, index: object) -> np.ndarray:
        """World coordinates (mm, RAS+) of voxel indices ``(..., 3)`` in (d, h, w) order.

        Parameters
        ----------
        index : array_like
            One index ``(d, h, w)`` or an array of them, shape (..., 3); fractions allowed.

        Returns
        -------
        numpy.ndarray
            float64 (..., 3): x, y, z.

        Raises
        ------
        VolumeLoadError
            The volume has no affine.

        Examples
        --------
        >>> Volume(np.zeros((1, 1, 1)), np.diag([2.0, 3.0, 4.0, 1.0]), "v").world((1, 1, 1))
        array([2., 3., 4.])
        """
        if self.affine is None:
            raise VolumeLoadError(
                f"{self.source!r} has no affine: its voxels have no world coordinates",
                self.source,
            )
        points = np.asarray(index, dtype=np.float64)
        return points @ self.affine[:3, :3].T + self.affine[:3, 3]


def is_volume_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (by its name) or a folder with DICOM files in it.

    Multi-frame DICOM files are not recognised here (their name says nothing); with a 3-D
    model every DICOM file is read as a volume (:func:`read_volume`).

    Examples
    --------
    >>> is_volume_path("scan.nii.gz"), is_volume_path("photo.png")
    (True, False)
    """
    if os.fspath(path).lower().endswith(NIFTI_SUFFIXES):
        return True
    folder = Path(path)
    return folder.is_dir() and any(_maybe_dicom(child) for child in _files(folder))


def _maybe_dicom(path: Path) -> bool:
    """A DICOM file: by suffix, or (not for common image suffixes) by its preamble."""
    suffix = path.suffix.lower()
    return suffix in DICOM_SUFFIXES or (suffix not in IMAGE_EXTENSIONS and is_dicom_path(path))


def collect_volumes(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """The volumes among ``inputs``, in order: files as given (NIfTI, DICOM), a folder that
    holds DICOM files as one series, and in other folders (recursively, sorted) the NIfTI
    files and DICOM series folders below them.

    Parameters
    ----------
    inputs : sequence of str or os.PathLike
        Files and folders.

    Returns
    -------
    list of str
        The volume paths (a missing path is kept: reading it gives its error record).

    Examples
    --------
    >>> import nibabel
    >>> Path("scans/b").mkdir(parents=True)
    >>> nibabel.save(nibabel.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4)), "scans/a.nii.gz")
    >>> _ = Path("scans/b/slice1.dcm").write_bytes(b""), Path("scans/notes.txt").write_text("")
    >>> collect_volumes(["scans"])
    ['scans/a.nii.gz', 'scans/b']
    """
    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if not path.is_dir() or is_volume_path(path):
            found.append(os.fspath(item))
            continue
        found.extend(_volumes_below(path))
    return found


def _volumes_below(folder: Path) -> list[str]:
    found = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            found.extend([os.fspath(child)] if is_volume_path(child) else _volumes_below(child))
        elif child.name.lower().endswith(NIFTI_SUFFIXES):
            found.append(os.fspath(child))
    return found


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3-D volume: a NIfTI file, a folder holding one DICOM series, or a multi-frame
    DICOM file.

    Parameters
    ----------
    path : str or os.PathLike
        ``.nii`` / ``.nii.gz`` (read with nibabel, reoriented to RAS+ with
        ``nibabel.as_closest_canonical``; 4-D files with one volume are squeezed), a folder of
        DICOM files (one series; slices sorted by position:
        :func:`camlens.io.medical.read_dicom_series`), or a multi-frame DICOM file
        (:func:`camlens.io.medical.read_dicom_frames`).

    Returns
    -------
    Volume
        Voxels (D, H, W) float32 (rescaled values: Hounsfield units for CT), affine or None.

    Raises
    ------
    VolumeLoadError
        Missing path, unreadable or non-3-D file, or a format that is not a volume.

    Examples
    --------
    >>> import nibabel
    >>> affine = np.diag([2.0, 2.0, 3.0, 1.0])  # 2 x 2 x 3 mm voxels, already RAS+
    >>> nibabel.save(nibabel.Nifti1Image(np.zeros((4, 5, 6)), affine), "chest.nii.gz")
    >>> volume = read_volume("chest.nii.gz")
    >>> volume.shape, volume.voxels.dtype  # (k, j, i): d is NIfTI's third axis
    ((6, 5, 4), dtype('float32'))
    >>> volume.world((1, 0, 0)).tolist()  # one slice up: 3 mm superior
    [0.0, 0.0, 3.0]
    """
    source = os.fspath(path)
    target = Path(path)
    if not target.exists():
        raise VolumeLoadError(f"cannot read {source!r}: it does not exist", source)
    try:
        if source.lower().endswith(NIFTI_SUFFIXES):
            return _read_nifti(target, source)
        if target.is_dir():
            voxels, affine = read_dicom_series(target)
            return Volume(voxels, affine, source)
        if is_dicom_path(target):
            return _read_dicom_frames(target, source)
    except DicomError as error:
        raise VolumeLoadError(str(error), source) from error
    raise VolumeLoadError(
        f"cannot read {source!r} as a volume: give a .nii or .nii.gz file, a folder of one "
        "DICOM series, or a multi-frame DICOM file",
        source,
    )


def _read_nifti(path: Path, source: str) -> Volume:
    import nibabel

    try:
        image = nibabel.load(os.fspath(path))
        orientation = nibabel.io_orientation(image.affine)
        canonical = nibabel.as_closest_canonical(image)
        data = np.asanyarray(canonical.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many types for a bad file
        raise VolumeLoadError(
            f"cannot read {source!r}: nibabel cannot read it as NIfTI ({error})", source
        ) from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeLoadError(
            f"cannot read {source!r}: its data has shape {data.shape}; a 3-D volume is needed "
            "(take one time point or channel of a 4-D file first)",
            source,
        )
    voxels = np.ascontiguousarray(data.transpose(2, 1, 0))
    return Volume(voxels, nifti_to_volume_affine(canonical.affine), source, orientation)


def _read_dicom_frames(path: Path, source: str) -> Volume:
    frames, meta = read_dicom_frames(path)
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise VolumeLoadError(
            f"cannot read {source!r} as a volume: it holds one frame; explain a single-frame "
            "DICOM file with a 2-D model, or put the slices of a series in one folder",
            source,
        )
    return Volume(frames, meta.get("affine"), source)


def nifti_to_volume_affine(affine: np.ndarray) -> np.ndarray:
    """The affine of a NIfTI array indexed (i, j, k) as one indexed (d, h, w) = (k, j, i).

    Examples
    --------
    >>> nifti_to_volume_affine(np.diag([1.0, 2.0, 3.0, 1.0]))[:3, :3].diagonal().tolist()
    [0.0, 2.0, 0.0]
    """
    return np.asarray(affine, dtype=np.float64) @ _SWAP_DW


def volume_to_nifti_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`nifti_to_volume_affine` (the swap is its own inverse).

    Examples
    --------
    >>> a = np.arange(16.0).reshape(4, 4)
    >>> bool(np.all(volume_to_nifti_affine(nifti_to_volume_affine(a)) == a))
    True
    """
    return np.asarray(affine, dtype=np.float64) @ _SWAP_DW


_SWAP_DW = np.array(
    [[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def volume_window(
    voxels: np.ndarray, window: tuple[float, float] | None = None
) -> tuple[float, float]:
    """The grey-level range ``(low, high)`` shown as black .. white.

    Parameters
    ----------
    voxels : numpy.ndarray
        The volume's values.
    window : (center, width) or None
        A user window (``--window C,W``): ``C - W / 2 .. C + W / 2``. Default: the volume's
        0.5th .. 99.5th percentile (:data:`DEFAULT_PERCENTILES`, robust to a few extreme
        voxels), widened to one unit when the volume is constant.

    Examples
    --------
    >>> volume_window(np.arange(1001.0))
    (5.0, 995.0)
    >>> volume_window(np.zeros(3), (40, 400))
    (-160.0, 240.0)
    """
    if window is not None:
        center, width = (float(v) for v in window)
        return center - width / 2, center + width / 2
    finite = np.asarray(voxels, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, DEFAULT_PERCENTILES))
    return (low, high) if high > low else (low - 0.5, low + 0.5)


def windowed(voxels: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """``voxels`` mapped linearly from :func:`volume_window`'s range to [0, 1] (clipped).

    Examples
    --------
    >>> windowed(np.array([-200.0, 40.0, 500.0]), (40, 400)).tolist()
    [0.0, 0.5, 1.0]
    """
    low, high = volume_window(voxels, window)
    values = (np.asarray(voxels, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0).astype(np.float32)


def volume_batch(
    volume: Volume,
    size: tuple[int, int, int],
    *,
    channels: int = 3,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    window: tuple[float, float] | None = None,
) -> torch.Tensor:
    """A volume as a model input: windowed, resized, channels repeated, normalised.

    The voxels are windowed to [0, 1] (:func:`windowed`), resized to ``size`` per axis
    (trilinear, no crop: the map covers the whole volume), repeated over ``channels`` and
    normalised with ``(x - mean) / std`` per channel, as 2-D images are.

    Parameters
    ----------
    volume : Volume
        The volume.
    size : (D, H, W)
        The model's input size.
    channels : int, optional
        The model's input channels (3 for torchvision's video models).
    mean, std : sequence of float
        One value, or one per channel (a 1-channel model given three uses their averages).
    window : (center, width) or None
        See :func:`volume_window`.

    Returns
    -------
    torch.Tensor
        float32 (1, channels, D, H, W) on the CPU.

    Raises
    ------
    ConfigError
        ``size`` is not three positive sides, or ``mean`` / ``std`` have an unusable length.

    Examples
    --------
    >>> v = Volume(np.arange(8.0).reshape(2, 2, 2), None, "v")
    >>> volume_batch(v, (2, 2, 2), channels=1, window=(3.5, 7.0))[0, 0, 1, 1].tolist()
    [0.8571428656578064, 1.0]
    """
    size = tuple(int(side) for side in size)
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"the volume input size must be three sides >= 1 (D, H, W), got {size}")
    values = torch.from_numpy(windowed(volume.voxels, window))[None, None]
    if tuple(values.shape[2:]) != size:
        values = F.interpolate(values, size=size, mode="trilinear", align_corners=False)
    values = values.expand(1, channels, *size)
    shift = _per_channel(mean, channels, "mean").view(1, channels, 1, 1, 1)
    scale = _per_channel(std, channels, "std").view(1, channels, 1, 1, 1)
    return ((values - shift) / scale).contiguous()


def _per_channel(values: Sequence[float], channels: int, name: str) -> torch.Tensor:
    values = [float(v) for v in values]
    if len(values) == channels:
        return torch.tensor(values)
    if len(values) == 1 or channels == 1:
        return torch.full((channels,), sum(values) / len(values))
    raise ConfigError(
        f"the model's {name} has {len(values)} values for {channels} input channels; give one "
        "value or one per channel"
    )


def radiological_flips(affine: np.ndarray | None) -> tuple[bool, bool] | None:
    """Which in-plane axes to flip to show axial slices as radiologists read them: anterior
    at the top, the patient's right on the image's left.

    Parameters
    ----------
    affine : numpy.ndarray or None
        The volume's affine ((d, h, w, 1) -> RAS+ mm).

    Returns
    -------
    (flip_rows, flip_columns) or None
        ``flip_rows``: the ``h`` axis runs towards anterior (so row 0 would be posterior);
        ``flip_columns``: the ``w`` axis runs towards the patient's right. None when the
        affine is unknown or the slices (the ``d`` axis) are not mostly along
        inferior-superior: sagittal and coronal stacks are shown as stored.

    Examples
    --------
    >>> canonical = np.eye(4)[[2, 1, 0, 3]]  # NIfTI, RAS+: x = w, y = h, z = d
    >>> radiological_flips(canonical)
    (True, True)
    >>> dicom = canonical * [[-1], [-1], [1], [1]]  # axial DICOM: x = -w, y = -h, z = d
    >>> radiological_flips(dicom)
    (False, False)
    >>> radiological_flips(None) is None
    True
    """
    if affine is None:
        return None
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    slice_axis = np.abs(axes[:, 0])
    if slice_axis[2] < slice_axis.max():  # not an axial stack
        return None
    return bool(axes[1, 1] > 0), bool(axes[0, 2] > 0)


def write_volume_map(path: str | os.PathLike, volume_map: np.ndarray, volume: Volume) -> Path:
    """Write a map over ``volume`` as NIfTI, aligned with it.

    For a NIfTI input the map is put back in the file's own voxel order with the file's own
    affine (so it has the input's shape and overlays it in any viewer); for DICOM inputs the
    affine is the volume's (RAS+) and the array is (W, H, D) = (i, j, k) as NIfTI stores it.
    A volume without an affine gets the identity (1 mm voxels at the origin).

    Parameters
    ----------
    path : str or os.PathLike
        ``.nii`` or ``.nii.gz``.
    volume_map : numpy.ndarray
        (D, H, W): the map at the volume's shape.
    volume : Volume
        The volume it covers.

    Returns
    -------
    pathlib.Path
        The file written (atomically).

    Examples
    --------
    >>> v = Volume(np.zeros((2, 3, 4)), np.eye(4), "v.nii.gz")
    >>> write_volume_map("map.nii.gz", np.ones((2, 3, 4), np.float32), v).name
    'map.nii.gz'
    """
    data = np.asarray(volume_map, dtype=np.float32)
    if data.shape != volume.shape:
        raise ValueError(
            f"the map has shape {data.shape} but the volume {volume.source!r} has "
            f"{volume.shape}; resize the map to the volume first"
        )
    affine = np.eye(4) if volume.affine is None else volume_to_nifti_affine(volume.affine)
    data = np.ascontiguousarray(data.transpose(2, 1, 0))
    if volume.orientation is not None:
        data, affine = _to_file_order(data, affine, volume.orientation)
    return write_nifti(path, data, affine)


def _to_file_order(
    data: np.ndarray, affine: np.ndarray, orientation: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (RAS+) ``data`` and ``affine`` back in the order of a file whose
    ``io_orientation`` was ``orientation``."""
    import nibabel
    from nibabel import orientations

    back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientation)
    image = nibabel.Nifti1Image(data, affine).as_reoriented(back)
    return np.asanyarray(image.dataobj, dtype=np.float32), image.affine


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(
            child
            for child in folder.iterdir()
            if child.is_file() and not child.name.startswith(".")
        )
    except OSError:
        return []
