"""NIfTI volumes read fast: inflated once into one buffer, reoriented by views, scaled lazily.

nibabel's own loader inflates through Python's ``zlib`` and then copies the voxels two or three
times (to float, to canonical order, to contiguous). Here the header is parsed by nibabel, the
voxel bytes are inflated by the fastest inflater installed (``isal``'s igzip, then ``zlib-ng``,
then the standard library; ``bench/prepare.py`` measures them) straight into one array, and the
reorientation to canonical ``(D, H, W)`` is a strided view of it. The header's scaling stays a
pending ``(slope, intercept)`` that preprocessing folds into its one float32 pass.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..locations import Location, is_url, open_binary
from .volumes import Volume, canonical_view, check_voxels

_GZIP_MAX_RATIO = 1032  # deflate cannot compress more than about 1032:1
_TRAILER_PEEK = 1 << 16  # bytes read past the voxels so that the gzip checksum is verified
_READ_CHUNK = 8 << 20  # gzip readers copy through a temporary of the size asked for: bound it


def _inflaters() -> dict[str, Callable[[BinaryIO], BinaryIO]]:
    """The installed gzip stream readers, fastest first (``name -> fileobj -> reader``)."""
    found: dict[str, Callable[[BinaryIO], BinaryIO]] = {}
    try:
        from isal import igzip

        found["isal"] = lambda raw: igzip.IGzipFile(fileobj=raw, mode="rb")
    except ImportError:
        pass
    try:
        from zlib_ng import gzip_ng

        found["zlib-ng"] = lambda raw: gzip_ng.GzipNGFile(fileobj=raw, mode="rb")
    except ImportError:
        pass
    import gzip

    found["zlib"] = lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")
    return found


log = logging.getLogger(__name__)
INFLATERS = _inflaters()
INFLATER = next(iter(INFLATERS))
"""The inflater ``read_nifti`` uses: the first of ``isal``, ``zlib-ng``, ``zlib`` installed."""


class VoxelBuffer:
    """One allocation that successive reads inflate into, grown to the largest volume seen.

    A fresh array per volume costs its page faults again: 0.05-0.25 s for a CT volume (the
    kernel zeroes, and may compact memory for, every page). The buffer is taken 1.5x the size
    asked for, so that the slightly larger volumes that follow fit too (pages never written
    cost nothing). A volume read into the buffer is valid until the next read into it, so only
    a caller that finishes each volume first (a worker preparing one study after another)
    passes one."""

    def __init__(self) -> None:
        self._bytes = np.empty(0, np.uint8)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised ``shape`` array in Fortran order (as NIfTI stores voxels)."""
        size = math.prod(shape) * dtype.itemsize
        if self._bytes.size < size:
            self._bytes = np.empty(0, np.uint8)  # the old one is freed before the new one is taken
            self._bytes = np.empty(size + size // 2, np.uint8)
        return self._bytes[:size].view(dtype).reshape(shape[::-1]).T


def _read_exactly(stream: BinaryIO, buffer: memoryview, where: Location) -> None:
    filled = 0
    while filled < len(buffer):
        got = stream.readinto(buffer[filled : filled + _READ_CHUNK])
        if not got:
            raise ValueError(
                f"{where}: truncated: the header declares {len(buffer):,} bytes of voxels, "
                f"the file holds {filled:,}"
            )
        filled += got


def _header(stream: BinaryIO, where: Location):
    """The NIfTI-1 or NIfTI-2 header at the start of ``stream``, and the bytes read so far."""
    import nibabel as nib

    head = stream.read(nib.Nifti1Header.sizeof_hdr)
    if len(head) < nib.Nifti1Header.sizeof_hdr:
        raise ValueError(f"{where}: not a NIfTI file ({len(head)} bytes, shorter than a header)")
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    klass = nib.Nifti2Header if nib.Nifti2Header.sizeof_hdr in sizes else nib.Nifti1Header
    if klass.sizeof_hdr not in sizes:
        raise ValueError(f"{where}: not a NIfTI file (sizeof_hdr is neither 348 nor 540)")
    head += stream.read(klass.sizeof_hdr - len(head))
    try:
        header = klass(binaryblock=head[: klass.sizeof_hdr], check=False)
    except Exception as error:  # noqa: BLE001 - nibabel raises several kinds for a bad header
        raise ValueError(f"{where}: not a readable NIfTI header ({error})") from None
    _check_spacing_fields(header, where)  # before nibabel's fixes replace them with defaults
    messages = io.StringIO()
    report = logging.getLogger(f"{__name__}.header")
    report.propagate, handler = False, logging.StreamHandler(messages)
    report.addHandler(handler)
    try:
        header.check_fix(logger=report, error_level=40)
    except Exception as error:  # noqa: BLE001 - nibabel raises several kinds for a bad header
        raise ValueError(f"{where}: not a readable NIfTI header ({error})") from None
    finally:
        report.removeHandler(handler)
    for line in filter(None, messages.getvalue().splitlines()):  # nibabel's notes name no file
        log.warning("%s: NIfTI header: %s", where, line)
    return header, len(head)


def _check_spacing_fields(header, where: Location) -> None:
    """The header fields the voxel spacing comes from, as stored: the sform's columns when its
    code is set, else ``pixdim[1..3]`` (the qform's and the fallback's voxel sizes). Zero,
    negative or non-finite sizes are an error naming the field: nibabel would set them to 1."""
    if int(header["sform_code"]) > 0:
        rows = np.stack([header["srow_x"], header["srow_y"], header["srow_z"]]).astype(np.float64)
        for axis, norm in enumerate(np.sqrt((rows[:, :3] ** 2).sum(axis=0))):
            if not (math.isfinite(norm) and norm > 0):
                raise ValueError(
                    f"{where}: the sform (srow_x/y/z, column {axis}) gives voxel size {norm} along axis "
                    f"{axis}: not a usable spacing"
                )
        return
    for axis in (1, 2, 3):
        value = float(header["pixdim"][axis])
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{where}: pixdim[{axis}] is {value}: not a usable voxel size")


def read_nifti(
    path: Location, max_voxels: int, size_on_disk: int | None = None, buffer: VoxelBuffer | None = None
) -> Volume:
    """The canonical volume of a ``.nii`` or ``.nii.gz`` file (local or any fsspec URL), its voxels
    the stored values (a view; ``slope``/``intercept`` pending), in ``buffer`` if one is given.
    The declared size is checked against ``max_voxels`` and against what the file can hold
    before anything is allocated."""
    compressed = str(path).lower().endswith(".gz")
    with open_binary(path) as raw:
        if size_on_disk is None:
            size_on_disk = raw.seek(0, io.SEEK_END) if is_url(path) else Path(path).stat().st_size
            raw.seek(0)
        stream = INFLATERS[INFLATER](raw) if compressed else raw
        try:
            header, consumed = _header(stream, path)
            array = _voxels(stream, header, consumed, size_on_disk, compressed, max_voxels, path, buffer)
            if compressed:
                stream.read(_TRAILER_PEEK)  # reaches the gzip trailer: its CRC and length are checked
        except (EOFError, OSError) as error:
            raise ValueError(f"{path}: damaged or not a gzip stream ({error})") from None
        finally:
            if stream is not raw:
                stream.close()
    slope, intercept = header.get_slope_inter()
    view, spacing = canonical_view(array, header.get_best_affine())
    description = header.get("descrip", b"")
    description = description.item().decode(errors="replace") if hasattr(description, "item") else ""
    return Volume(
        view,
        spacing,
        description.strip("\x00 "),
        slope=1.0 if slope is None else float(slope),
        intercept=0.0 if intercept is None else float(intercept),
    )


def _voxels(
    stream, header, consumed: int, size_on_disk: int, compressed: bool, max_voxels: int, where, buffer
):
    """The voxel array ``(X, Y, Z)`` in the file's (Fortran) order, read into one buffer."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"{where}: expected a 3D NIfTI, got shape {shape}")
    check_voxels(shape, max_voxels, str(where))
    dtype = header.get_data_dtype()
    offset = int(header.get_data_offset())
    declared = offset + math.prod(shape) * dtype.itemsize
    if (compressed and declared > size_on_disk * _GZIP_MAX_RATIO) or (
        not compressed and declared > size_on_disk
    ):
        raise ValueError(
            f"{where}: truncated or damaged: its header declares shape {shape} "
            f"({declared:,} bytes), the file has {size_on_disk:,} bytes"
        )
    if offset < consumed:
        raise ValueError(f"{where}: vox_offset {offset} lies inside the header")
    stream.read(offset - consumed)  # header extensions: not needed
    array = (buffer or VoxelBuffer()).array(shape, dtype)
    _read_exactly(stream, memoryview(array.T.reshape(-1).view(np.uint8)), where)
    return array
