"""Read one scan (NIfTI, DICOM series or file, .npy/.pt) into a canonical float32 volume.

Canonical orientation: nibabel's closest RAS+ orientation, stored as ``(depth, height, width)``
= (inferior→superior, anterior→posterior, patient right→left), i.e. axial slices as a
radiologist views them. NIfTI and DICOM both go through ``nibabel.as_closest_canonical``;
``.npy``/``.pt`` arrays are taken as already canonical ``(D, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_ORIENTATION_TOL = 1e-3
_SPACING_TOL = 0.1  # relative spread of slice gaps tolerated in one series


@dataclass
class Volume:
    """A scan in canonical ``(D, H, W)`` order with its voxel spacing in mm (``None``: unknown)."""

    array: np.ndarray
    spacing: tuple[float, float, float] | None
    description: str = ""
    skipped_files: list[tuple[str, str]] = field(default_factory=list)


def read_volume(path: str | Path, spacing: tuple[float, float, float] | None = None) -> Volume:
    """Read the scan at ``path``; ``spacing`` overrides/supplies the voxel size of raw arrays."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    name = path.name.lower()
    if path.is_dir():
        volume = _read_dicom_series(path)
    elif name.endswith((".nii", ".nii.gz")):
        volume = _read_nifti(path)
    elif name.endswith(".npy"):
        volume = Volume(np.load(path, allow_pickle=False), None)
    elif name.endswith(".pt"):
        import torch

        volume = Volume(torch.load(path, map_location="cpu", weights_only=True).numpy(), None)
    else:
        volume = _read_dicom_file(path)
    if spacing is not None:
        volume.spacing = tuple(float(s) for s in spacing)
    volume.array = np.asarray(volume.array, dtype=np.float32)
    _check_array(volume.array, path)
    return volume


def _check_array(array: np.ndarray, path: Path) -> None:
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {array.shape}")
    if min(array.shape) < 1:
        raise ValueError(f"{path}: empty volume of shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: {int((~np.isfinite(array)).sum())} non-finite (NaN/inf) voxels")


def _canonical(
    array_xyz: np.ndarray, affine_ras: np.ndarray
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """RAS+ reorientation by nibabel, then ``(x, y, z)`` → ``(D, H, W)`` as described above."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.Nifti1Image(array_xyz, affine_ras))
    data = np.asanyarray(image.dataobj, dtype=np.float32)
    zooms = image.header.get_zooms()[:3]
    array = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    return array, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    image = nib.load(path)
    data = np.asanyarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D NIfTI, got shape {data.shape}")
    array, spacing = _canonical(data, image.affine)
    description = image.header.get("descrip", b"")
    description = description.item().decode(errors="replace") if hasattr(description, "item") else ""
    return Volume(array, spacing, description.strip("\x00 "))


# -- DICOM -----------------------------------------------------------------------------------


def _read_dicom_file(path: Path) -> Volume:
    """One DICOM file: a single slice or a multi-frame volume."""
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file without pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return _multiframe(ds, path)
    return _series_volume([ds], [path], path, [])


def _read_dicom_series(folder: Path) -> Volume:
    """All image files of one series folder; non-image files are skipped and recorded."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets, paths, skipped = [], [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
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
        volume = _multiframe(datasets[0], paths[0])
        volume.skipped_files = skipped
        return volume
    series = {ds.get("SeriesInstanceUID") for ds in datasets}
    if len(series) > 1:
        raise ValueError(f"{folder}: {len(series)} series in one scan folder; give each its own entry")
    return _series_volume(datasets, paths, folder, skipped)


def _orientation(ds, where: Path) -> np.ndarray:
    if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
        raise ValueError(f"{where}: DICOM slice without ImageOrientationPatient/ImagePositionPatient")
    return np.asarray(ds.ImageOrientationPatient, dtype=np.float64)


def _series_volume(datasets: list, paths: list[Path], where: Path, skipped: list) -> Volume:
    """Sort slices along the slice normal, check geometry, rescale to HU, build the volume."""
    from pydicom.pixels import apply_rescale

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
        step = normal * float(datasets[0].get("SpacingBetweenSlices", datasets[0].get("SliceThickness", 1.0)))
    slices = [apply_rescale(ds.pixel_array.astype(np.float32), ds) for ds in datasets]
    array_xyz = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (cols, rows, k)
    description = str(datasets[0].get("SeriesDescription", "") or "")
    return _from_lps(
        array_xyz, orientation, datasets[0].PixelSpacing, positions[0], step, description, skipped
    )


def _from_lps(array_xyz, orientation, pixel_spacing, origin, step, description, skipped) -> Volume:
    """Volume from DICOM patient (LPS) geometry: column/row direction cosines, origin, slice step."""
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * col_spacing
    affine[:3, 1] = orientation[3:] * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = origin
    affine[:2] *= -1  # LPS -> RAS
    array, spacing = _canonical(np.asarray(array_xyz, dtype=np.float32), affine)
    return Volume(array, spacing, description, skipped)


def _multiframe(ds, path: Path) -> Volume:
    """Enhanced multi-frame (per-frame plane positions) or RT dose (grid frame offsets)."""
    from pydicom.pixels import apply_rescale

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
        step = normal * float(geometry.get("SliceThickness", 1.0) or 1.0)
    description = str(ds.get("SeriesDescription", "") or "")
    return _from_lps(
        frames.transpose(2, 1, 0), orientation, geometry.PixelSpacing, positions[0], step, description, []
    )
