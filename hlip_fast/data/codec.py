"""Each slice as its own raw LZ4 block: what DALI's inflate and nvCOMP decode on the GPU in one
batched call (per-chunk sizes), and what the ``lz4`` package decodes on the CPU."""

from __future__ import annotations

import lz4.block
import numpy as np


def compress_slices(volume: np.ndarray) -> tuple[bytes, np.ndarray]:
    """``(blob, sizes)``: the slices of a ``(D, H, W)`` integer volume as concatenated LZ4 blocks
    (no size prefix) and each block's compressed size (int32)."""
    volume = np.ascontiguousarray(volume)
    blocks = [lz4.block.compress(s.tobytes(), store_size=False) for s in volume]
    return b"".join(blocks), np.array([len(b) for b in blocks], dtype=np.int32)


def decompress_slices(
    blob: bytes | memoryview, sizes: np.ndarray, slice_shape: tuple[int, int], dtype: str
) -> np.ndarray:
    """Inverse of :func:`compress_slices` on the CPU: ``(len(sizes), H, W)`` of ``dtype``."""
    slice_bytes = int(np.prod(slice_shape)) * np.dtype(dtype).itemsize
    out = np.empty((len(sizes), *slice_shape), dtype=dtype)
    flat = out.reshape(len(sizes), -1).view(np.uint8)
    blob = memoryview(blob)
    offset = 0
    for i, size in enumerate(sizes.tolist()):
        raw = lz4.block.decompress(blob[offset : offset + size], uncompressed_size=slice_bytes)
        if len(raw) != slice_bytes:
            raise ValueError(f"slice {i}: decoded {len(raw)} bytes, expected {slice_bytes}")
        flat[i] = np.frombuffer(raw, dtype=np.uint8)
        offset += size
    if offset != len(blob):
        raise ValueError(f"compressed blob has {len(blob)} bytes, slice sizes add up to {offset}")
    return out
