"""Read one scan (NIfTI, DICOM series or file, .npy/.pt) into a canonical float32 volume.

Canonical orientation: nibabel's closest RAS+ orientation, stored as ``(depth, height, width)``
= (inferior→superior, anterior→posterior, patient right→left), i.e. axial slices as a
radiologist views them. NIfTI and DICOM both reach it by :func:`canonical_view` (nibabel's
orientation of the affine, applied as a strided view); ``.npy``/``.pt`` arrays are taken as
already canonical ``(D, H, W)``. ``prepare`` reads volumes lazily (stored values, pending
scaling); :func:`read_volume` gives them as contiguous float32 values.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # nifti imports this module
    from .nifti import VoxelBuffer

log = logging.getLogger(__name__)
_ORIENTATION_TOL = 1e-3
_SPACING_TOL = 0.1  # relative spread of slice gaps tolerated in one series
SPACING_RANGE_MM = (0.01, 100.0)
"""Voxel spacings outside this range (in mm) are refused as implausible for CT and MRI."""
MAX_VOXELS = 2**29
"""Default cap on a volume's voxels (2 GiB as float32), checked against its header before reading."""


def check_spacing(spacing, where: str) -> tuple[float, float, float]:
    """Three finite voxel sizes in mm within :data:`SPACING_RANGE_MM`, or a ``ValueError``."""
    low, high = SPACING_RANGE_MM
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and low <= v <= high for v in values):
        raise ValueError(
            f"{where}: spacing {spacing!r} is not three finite voxel sizes in mm within {low}..{high}"
        )
    return values


def check_voxels(shape, max_voxels: int, where: str) -> None:
    """Refuse a volume whose (declared) shape exceeds the memory cap, before allocating it."""
    voxels = math.prod(int(n) for n in shape)
    if voxels > max_voxels:
        raise ValueError(
            f"{where}: shape {tuple(int(n) for n in shape)} is {voxels:,} voxels, over the cap of "
            f"{max_voxels:,} ({max_voxels * 4 / 2**30:.1f} GiB as float32); raise --max-voxels if it is real"
        )


@dataclass
class Volume:
    """A scan in canonical ``(D, H, W)`` order with its voxel spacing in mm (``None``: unknown).

    Its values are ``array * slope + intercept``: ``array`` may be the file's stored integers as
    a strided view (flipped axes have negative strides), the scaling not yet applied."""

    array: np.ndarray
    spacing: tuple[float, float, float] | None
    description: str = ""
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    slope: float = 1.0
    intercept: float = 0.0

    def rescaled(self, slope: float, intercept: float) -> None:
        """Compose a further ``value * slope + intercept`` (a manifest's rescale to HU)."""
        self.slope, self.intercept = self.slope * slope, self.intercept * slope + intercept

    def values(self) -> np.ndarray:
        """The values as one contiguous float32 array (a full copy: preprocessing avoids it)."""
        values = np.ascontiguousarray(self.array, dtype=np.float32)
        if (self.slope, self.intercept) != (1.0, 0.0):
            values = values * np.float32(self.slope) + np.float32(self.intercept)
        return values


def canonical_view(
    array_xyz: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``(D, H, W)`` view of an ``(x, y, z)`` array in nibabel's closest RAS+ orientation, and
    its voxel spacing (the affine's column norms, reordered likewise)."""
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(affine)
    ras = apply_orientation(array_xyz, ornt)  # flips and a transpose: a view
    norms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    zooms = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        zooms[int(target)] = float(norms[axis])
    return ras.transpose(2, 1, 0)[:, ::-1, ::-1], (zooms[2], zooms[1], zooms[0])


def read_volume(
    path: str | Path, spacing: tuple[float, float, float] | None = None, max_voxels: int = MAX_VOXELS
) -> Volume:
    """The scan at ``path`` with its values as a contiguous float32 array (see :func:`open_volume`)."""
    volume = open_volume(path, spacing, max_voxels)
    volume.array, volume.slope, volume.intercept = volume.values(), 1.0, 0.0
    return volume


def open_volume(
    path: str | Path,
    spacing: tuple[float, float, float] | None = None,
    max_voxels: int = MAX_VOXELS,
    buffer: VoxelBuffer | None = None,
) -> Volume:
    """Read the scan at ``path`` (a NIfTI file may be an fsspec URL), its values left lazy;
    ``spacing`` overrides/supplies the voxel size of raw arrays. A NIfTI's voxels go into
    ``buffer`` when one is given (valid until its next use, see :class:`~.nifti.VoxelBuffer`).

    The size a file's header declares is checked against the file and against ``max_voxels``
    before anything is allocated; spacings from headers must be plausible (see
    :func:`check_spacing`; a manifest's ``spacing`` replaces a wrong one).
    """
    from ..locations import is_url

    name = str(path).lower()
    if is_url(path):
        if not name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"{path}: only NIfTI files (.nii, .nii.gz) are read from URLs")
        volume = _read_nifti(path, max_voxels, buffer)
        return _checked(volume, path, spacing)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        volume = _read_dicom_series(path, max_voxels)
    elif name.endswith((".nii", ".nii.gz")):
        volume = _read_nifti(path, max_voxels, buffer)
    elif name.endswith(".npy"):
        volume = Volume(_read_npy(path, max_voxels), None)
    elif name.endswith(".pt"):
        import torch

        volume = Volume(torch.load(path, map_location="cpu", weights_only=True).numpy(), None)
    else:
        volume = _read_dicom_file(path, max_voxels)
    return _checked(volume, path, spacing)


def _checked(volume: Volume, path, spacing) -> Volume:
    if spacing is not None:
        volume.spacing = check_spacing(spacing, f"{path}: given spacing")
    elif volume.spacing is not None:
        volume.spacing = check_spacing(
            volume.spacing, f"{path}: header spacing (give 'spacing' in the manifest)"
        )
    _check_array(volume, path)
    return volume


def _check_array(volume: Volume, path) -> None:
    array = volume.array
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {array.shape}")
    if min(array.shape) < 1:
        raise ValueError(f"{path}: empty volume of shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{path}: voxels of type {array.dtype} are not numbers")
    if not (math.isfinite(volume.slope) and math.isfinite(volume.intercept) and volume.slope != 0):
        raise ValueError(f"{path}: scaling slope {volume.slope}, intercept {volume.intercept} is not usable")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{path}: {int((~np.isfinite(array)).sum())} non-finite (NaN/inf) voxels")


def _read_npy(path: Path, max_voxels: int) -> np.ndarray:
    """A ``.npy`` array, its header checked against the file size and the cap first."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(handle)
        except ValueError as error:
            raise ValueError(f"{path}: not a readable .npy file ({error})") from None
        data_start = handle.tell()
    check_voxels(shape, max_voxels, str(path))
    declared = math.prod(shape) * dtype.itemsize
    if path.stat().st_size - data_start < declared:
        raise ValueError(
            f"{path}: truncated: its header declares {declared:,} bytes of data, the file holds "
            f"{path.stat().st_size - data_start:,}"
        )
    return np.load(path, allow_pickle=False)


def _read_nifti(path, max_voxels: int, buffer: VoxelBuffer | None) -> Volume:
    from .nifti import read_nifti

    return read_nifti(path, max_voxels, buffer=buffer)


# -- DICOM -----------------------------------------------------------------------------------


def _read_dicom_file(path: Path, max_voxels: int) -> Volume:
    """One DICOM file: a single slice or a multi-frame volume."""

    ds = _read_dataset(path)
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file without pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return _multiframe(ds, path, max_voxels)
    return _series_volume([ds], [path], path, [], max_voxels)


def _read_dicom_series(folder: Path, max_voxels: int) -> Volume:
    """All image files of one series folder; non-image files are skipped and recorded."""
    from pydicom.errors import InvalidDicomError

    datasets, paths, skipped = [], [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = _read_dataset(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            skipped.append((str(path), f"not a readable DICOM file: {error}"))
            continue
        if "PixelData" not in ds:
            skipped.append((str(path), "DICOM file without pixel data"))
            continue
        datasets.append(ds)
        paths.append(path)
    if not datasets:
        raise ValueError(f"{folder}: no DICOM image in the series folder")
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        volume = _multiframe(datasets[0], paths[0], max_voxels)
        volume.skipped_files = skipped
        return volume
    series = {ds.get("SeriesInstanceUID") for ds in datasets}
    if len(series) > 1:
        raise ValueError(f"{folder}: {len(series)} series in one scan folder; give each its own entry")
    return _series_volume(datasets, paths, folder, skipped, max_voxels)


def _read_dataset(path: Path):
    """``pydicom.dcmread``, its warnings (which name no file) said again with the file's name."""
    import pydicom

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path)
    for warning in caught:
        log.warning("%s: %s", path, warning.message)
    return ds


def _orientation(ds, where: Path) -> np.ndarray:
    if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
        raise ValueError(f"{where}: DICOM slice without ImageOrientationPatient/ImagePositionPatient")
    return np.asarray(ds.ImageOrientationPatient, dtype=np.float64)


def _pixel_spacing(ds, where: Path):
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not spacing or len(spacing) != 2:
        raise ValueError(
            f"{where}: DICOM without PixelSpacing (0028,0030); its in-plane voxel size is unknown"
        )
    return [_positive(value, "PixelSpacing (0028,0030)", where) for value in spacing]


def _positive(value, field: str, where: Path) -> float:
    """A header's voxel size: finite and positive, or an error naming the field (never a default)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{where}: {field} is {value}: not a usable voxel size")
    return number


def _slice_step(ds, normal: np.ndarray, where: Path) -> np.ndarray:
    """The slice step of a volume of one slice: its spacing tag along the normal, or an error."""
    for name, tag in (("SpacingBetweenSlices", "(0018,0088)"), ("SliceThickness", "(0018,0050)")):
        if ds.get(name) not in (None, ""):
            return normal * _positive(ds.get(name), f"{name} {tag}", where)
    raise ValueError(
        f"{where}: one slice without SpacingBetweenSlices (0018,0088) or SliceThickness (0018,0050): "
        "its slice spacing is unknown (give 'spacing' in the manifest)"
    )


def _series_volume(datasets: list, paths: list[Path], where: Path, skipped: list, max_voxels: int) -> Volume:
    """Sort slices along the slice normal, check geometry, rescale to HU, build the volume."""
    from pydicom.pixels import apply_rescale

    check_voxels((len(datasets), datasets[0].Rows, datasets[0].Columns), max_voxels, str(where))
    orientation = _orientation(datasets[0], paths[0])
    for ds, path in zip(datasets, paths):
        if np.abs(_orientation(ds, path) - orientation).max() > _ORIENTATION_TOL:
            raise ValueError(
                f"{where}: mixed slice orientations in one series (first differing: {path.name})"
            )
        if (ds.Rows, ds.Columns) != (datasets[0].Rows, datasets[0].Columns):
            raise ValueError(f"{where}: slices of different sizes in one series ({path.name})")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    if not np.isfinite(positions).all():
        bad = paths[int(np.flatnonzero(~np.isfinite(positions).all(axis=1))[0])]
        raise ValueError(f"{where}: ImagePositionPatient (0020,0032) of {bad.name} is not finite")
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    gaps = np.diff(positions @ normal)
    if len(gaps) and gaps.min() <= 1e-4:
        raise ValueError(f"{where}: two slices share a position (duplicate slices?)")
    if len(gaps) and (gaps.max() - gaps.min()) > _SPACING_TOL * gaps.mean():
        raise ValueError(
            f"{where}: uneven slice spacing {gaps.min():.3g}..{gaps.max():.3g} mm (missing slices?)"
        )
    if len(gaps):
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        step = _slice_step(datasets[0], normal, paths[0])
    slices = [apply_rescale(ds.pixel_array.astype(np.float32), ds) for ds in datasets]
    array_xyz = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (cols, rows, k)
    description = str(datasets[0].get("SeriesDescription", "") or "")
    pixel_spacing = _pixel_spacing(datasets[0], paths[0])
    return _from_lps(array_xyz, orientation, pixel_spacing, positions[0], step, description, skipped)


def _from_lps(array_xyz, orientation, pixel_spacing, origin, step, description, skipped) -> Volume:
    """Volume from DICOM patient (LPS) geometry: column/row direction cosines, origin, slice step."""
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * col_spacing
    affine[:3, 1] = orientation[3:] * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = origin
    affine[:2] *= -1  # LPS -> RAS
    array, spacing = canonical_view(np.asarray(array_xyz, dtype=np.float32), affine)
    return Volume(array, spacing, description, skipped)


def _multiframe(ds, path: Path, max_voxels: int) -> Volume:
    """Enhanced multi-frame (per-frame plane positions) or RT dose (grid frame offsets)."""
    from pydicom.pixels import apply_rescale

    check_voxels((int(ds.NumberOfFrames), ds.Rows, ds.Columns), max_voxels, str(path))
    frames = ds.pixel_array.astype(np.float32)  # (frames, rows, cols)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
        positions = np.array(
            [g.PlanePositionSequence[0].ImagePositionPatient for g in ds.PerFrameFunctionalGroupsSequence],
            dtype=np.float64,
        )
        geometry = shared.PixelMeasuresSequence[0]
    elif "GridFrameOffsetVector" in ds:
        orientation = _orientation(ds, path)
        normal = np.cross(orientation[:3], orientation[3:])
        offsets = np.asarray(ds.GridFrameOffsetVector, dtype=np.float64)
        positions = np.asarray(ds.ImagePositionPatient, dtype=np.float64) + offsets[:, None] * normal
        geometry = ds
    else:
        raise ValueError(f"{path}: multi-frame DICOM without per-frame positions")
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort(positions @ normal, kind="stable")
    frames, positions = frames[order], positions[order]
    frames = frames * float(ds.DoseGridScaling) if "DoseGridScaling" in ds else apply_rescale(frames, ds)
    step = (positions[-1] - positions[0]) / max(1, len(positions) - 1)
    if len(positions) == 1:
        step = _slice_step(geometry, normal, path)
    description = str(ds.get("SeriesDescription", "") or "")
    pixel_spacing = _pixel_spacing(geometry, path)
    return _from_lps(
        frames.transpose(2, 1, 0), orientation, pixel_spacing, positions[0], step, description, []
    )
