"""The fast preprocessing path (lazy NIfTI read, window carried into stored values, blockwise
separable resampling) against the plain one it replaced: nibabel's loader, a float32 volume,
window, then one trilinear resample of the whole volume. Equal to within one grey level."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hlip_fast.data import nifti
from hlip_fast.data.config import ModalityConfig
from hlip_fast.data.preprocess import preprocess_volume
from hlip_fast.data.volumes import open_volume, read_volume


def reference(path, config: ModalityConfig, grid, max_value: int, rescale=(1.0, 0.0)) -> np.ndarray:
    """The plain method: whole float32 volume, window to [0, 1], trilinear, crop, round."""
    image = nib.as_closest_canonical(nib.load(path))
    values = np.asanyarray(image.dataobj, dtype=np.float32)
    values = np.ascontiguousarray(values.transpose(2, 1, 0)[:, ::-1, ::-1]) * rescale[0] + rescale[1]
    zooms = image.header.get_zooms()[:3][::-1]
    if config.window is not None:
        low, high = config.window
    else:
        low, high = np.percentile(values[values != 0], config.percentiles)
    unit = np.clip((values - low) / (high - low), 0, 1).astype(np.float32)
    depth, height, width = unit.shape
    if config.spacing is not None:
        depth = max(1, round(depth * zooms[0] / config.spacing[0]))
        if config.fit == "crop":
            height = max(1, round(height * zooms[1] / config.spacing[1]))
            width = max(1, round(width * zooms[2] / config.spacing[2]))
    if config.fit == "resize":
        height, width = grid
    tensor = torch.from_numpy(unit)[None, None]
    if tuple(tensor.shape[2:]) != (depth, height, width):
        tensor = F.interpolate(tensor, size=(depth, height, width), mode="trilinear", align_corners=False)
    tensor = tensor[0, 0]
    if config.fit == "crop":
        for dim, size in ((1, grid[0]), (2, grid[1])):
            have = tensor.shape[dim]
            if have >= size:
                tensor = tensor.narrow(dim, (have - size) // 2, size)
            else:
                pad = [0, 0] * (2 - dim) + [(size - have) // 2, size - have - (size - have) // 2]
                tensor = F.pad(tensor, pad)
    keep = min(tensor.shape[0], config.max_depth)
    tensor = tensor.narrow(0, (tensor.shape[0] - keep) // 2, keep)
    return torch.round(tensor.clamp(0, 1) * max_value).numpy()


def _affine(rng: np.random.Generator, zooms) -> np.ndarray:
    """A random axis permutation with random flips and the given voxel sizes."""
    rotation = np.zeros((3, 3))
    for column, row in enumerate(rng.permutation(3)):
        rotation[row, column] = rng.choice([-1.0, 1.0]) * zooms[column]
    affine = np.eye(4)
    affine[:3, :3] = rotation
    affine[:3, 3] = rng.normal(0, 50, 3)
    return affine


def _ct_like(rng: np.random.Generator, shape) -> np.ndarray:
    """Stored CT values (HU + 1024) with air, tissue, bone and noise: every window edge is hit."""
    data = rng.choice([0, 174, 1064, 2524], size=shape, p=[0.3, 0.2, 0.4, 0.1]).astype(np.float32)
    return (data + rng.normal(0, 40, shape)).clip(0, 4095).astype(np.int16)


HU_WINDOW = (-1150.0, 350.0)
CASES = {
    "ct-resize": (ModalityConfig(spacing=(3.0, 1.0, 1.0), window=HU_WINDOW), (40, 44), "uint8"),
    "ct-crop": (ModalityConfig(spacing=(2.0, 0.8, 1.3), window=HU_WINDOW, fit="crop"), (30, 27), "uint8"),
    "ct-keep-depth": (ModalityConfig(window=(-1000.0, 1000.0), max_depth=9), (21, 19), "uint16"),
    "mr-upsample": (ModalityConfig(spacing=(0.7, 1.0, 1.0), percentiles=(0.5, 99.5)), (32, 30), "uint8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_path_equals_the_plain_method_within_one_grey_level(tmp_path, case, seed):
    config, grid, dtype = CASES[case]
    rng = np.random.default_rng([seed, len(case)])
    shape = tuple(int(n) for n in rng.integers(12, 40, 3))
    zooms = tuple(float(z) for z in rng.uniform(0.6, 2.5, 3))
    data = _ct_like(rng, shape)
    image = nib.Nifti1Image(data, _affine(rng, zooms))
    slope, inter = (1.0, 0.0) if case.startswith("ct") else (float(rng.uniform(0.5, 3)), 0.0)
    image.header.set_slope_inter(slope, inter)
    path = tmp_path / f"{case}.nii.gz"
    nib.save(image, path)
    rescale = (1.0, -1024.0) if case.startswith("ct") else (1.0, 0.0)
    max_value = int(np.iinfo(dtype).max)
    volume = open_volume(path)
    volume.rescaled(*rescale)
    stored, record = preprocess_volume(volume, config, grid, max_value, dtype)
    expected = reference(path, config, grid, max_value, rescale)
    assert stored.shape == expected.shape and stored.dtype == np.dtype(dtype)
    assert record["shape"] == list(expected.shape)
    difference = np.abs(stored.astype(np.int64) - expected.astype(np.int64))
    assert difference.max() <= 1, f"{case}: {int(difference.max())} grey levels apart"
    # float32 rounding moves values that sit on a rounding edge; uint16's steps are 257x finer
    assert (difference > 0).mean() < (0.02 if dtype == "uint8" else 0.06)
    assert stored.std() > 0  # the volume is not blank: the comparison means something


def test_lazy_read_matches_nibabel_in_every_orientation_and_inflater(tmp_path):
    rng = np.random.default_rng(7)
    data = rng.integers(-2000, 3000, (9, 7, 5)).astype(np.int16)
    for n in range(6):
        affine = _affine(rng, (0.8, 1.1, 2.5))
        path = tmp_path / f"v{n}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        canonical = nib.as_closest_canonical(nib.load(path))
        expected = np.asanyarray(canonical.dataobj).transpose(2, 1, 0)[:, ::-1, ::-1]
        for name in nifti.INFLATERS:
            volume = _with_inflater(name, path)
            np.testing.assert_array_equal(volume.values(), expected)
            assert volume.spacing == pytest.approx(canonical.header.get_zooms()[:3][::-1])
    big_endian = tmp_path / "big.nii"
    image = nib.Nifti1Image(data.astype(">i2"), np.eye(4))
    nib.save(image, big_endian)
    np.testing.assert_array_equal(read_volume(big_endian).array, data.transpose(2, 1, 0)[:, ::-1, ::-1])


def _with_inflater(name: str, path):
    saved = nifti.INFLATER
    nifti.INFLATER = name
    try:
        return open_volume(path)
    finally:
        nifti.INFLATER = saved


def test_damaged_gzip_streams_are_refused_naming_the_file(tmp_path):
    data = np.arange(4000, dtype=np.int16).reshape(20, 20, 10)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    raw = gzip.decompress(path.read_bytes())
    packed = bytearray(gzip.compress(raw))
    packed[-8] ^= 0xFF  # the CRC of the trailer
    bad_crc = tmp_path / "crc.nii.gz"
    bad_crc.write_bytes(bytes(packed))
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    for name in nifti.INFLATERS:
        for bad, words in ((bad_crc, "damaged or not a gzip"), (truncated, "truncated")):
            with pytest.raises(ValueError, match=words) as error:
                _with_inflater(name, bad)
            assert str(bad) in str(error.value)


def test_volumes_read_one_after_another_into_one_buffer_equal_fresh_reads(tmp_path):
    rng = np.random.default_rng(11)
    shapes, dtypes = (
        [(9, 7, 5), (12, 8, 6), (4, 5, 3), (12, 8, 6)],
        [np.int16, np.uint16, np.float32, np.int16],
    )
    paths = []
    for n, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        paths.append(tmp_path / f"v{n}.nii.gz")
        nib.save(
            nib.Nifti1Image(rng.integers(0, 3000, shape).astype(dtype), _affine(rng, (1, 1, 2))), paths[-1]
        )
    buffer, held = nifti.VoxelBuffer(), []
    for path in paths:
        volume = open_volume(path, buffer=buffer)
        np.testing.assert_array_equal(volume.values(), open_volume(path).values())
        assert volume.values().dtype == open_volume(path).values().dtype
        held.append(np.shares_memory(volume.array, buffer._bytes))
    assert all(held)  # every volume lies in the buffer
    largest = int(np.prod(shapes[1])) * 2
    assert buffer._bytes.size == largest + largest // 2  # grown once, 1.5x ahead, then reused
