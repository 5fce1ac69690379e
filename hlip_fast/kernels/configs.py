"""Which launch configs the attention kernels may use, per architecture, dtype, head dim and item
height: a public function of those, not a probe of the local GPU, so that the build report
(``bench/kernel_build.py``), the tests and a reader can ask about any GPU without one.

Every config offered here compiles without a register spill and within shared memory on every
claimed architecture (``bench/results/kernel_build_*.json``, checked in CI by
``tests/test_kernel_build.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KERNELS = ("fwd", "dq", "dkdv")
BLOCK_MS = (64, 128)
"""Item heights a GPU schedule may choose (per layout and level, the one that visits least)."""


@dataclass(frozen=True)
class Architecture:
    """What limits a build on one GPU architecture (CUDA programming guide, compute capabilities)."""

    name: str
    capability: tuple[int, int]
    shared_per_block: int
    """Largest dynamic shared memory one program may opt into, bytes."""
    shared_per_sm: int
    threads_per_sm: int
    programs_per_sm_limit: int
    registers_per_sm: int = 65536
    reserved_shared_per_program: int = 1024

    @property
    def capability_number(self) -> int:
        return self.capability[0] * 10 + self.capability[1]

    def programs_per_sm(self, registers: int, num_warps: int, shared: int) -> int:
        """Resident programs per SM: the least of what registers (allocated per warp in units of
        256), threads, shared memory and the block limit allow."""
        per_warp = math.ceil(registers * 32 / 256) * 256
        by_registers = self.registers_per_sm // (per_warp * num_warps)
        by_threads = self.threads_per_sm // (32 * num_warps)
        by_shared = self.shared_per_sm // (shared + self.reserved_shared_per_program)
        return min(by_registers, by_threads, by_shared, self.programs_per_sm_limit)


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("sm_80", (8, 0), 166912, 167936, 2048, 32),  # A100, A30
        Architecture("sm_86", (8, 6), 101376, 102400, 1536, 16),  # A40, A10, RTX 30xx
        Architecture("sm_89", (8, 9), 101376, 102400, 1536, 24),  # L40S, L4, RTX 40xx
        Architecture("sm_90a", (9, 0), 232448, 233472, 2048, 32),  # H100, H200
        Architecture("sm_100a", (10, 0), 232448, 233472, 2048, 32),  # B200
    )
}


@dataclass(frozen=True)
class KernelConfig:
    """One launch config: partner rows per step (``block_n``), warps, pipeline stages, and the
    rows of an item one program takes (``part_m``; 0: the whole item)."""

    block_n: int
    num_warps: int
    num_stages: int
    part_m: int = 0

    @property
    def name(self) -> str:
        part = f" part{self.part_m}" if self.part_m else ""
        return f"n{self.block_n} w{self.num_warps} s{self.num_stages}{part}"

    def rows_per_program(self, block_m: int) -> int:
        """Rows of an item of ``block_m`` rows that one program takes (the ``PART_M`` constexpr)."""
        return self.part_m or block_m


def block_d(head_dim: int) -> int:
    """The head-dim tile: the next power of two, at least 16 (80 runs as 128)."""
    return max(16, 1 << (head_dim - 1).bit_length())


PART_M = 64
"""Rows one program takes where whole 128-row items spill: the item then runs as two programs of
64 rows (the same partners each). The key-side backward (k, v, dk, dv and a partner tile live at
once) at head dims 64 and 128 and the forward at 128 need it (see ``_SHAPES``)."""

_SHAPES = {
    # (kernel, head-dim tile, item rows): (partner rows per step, warps, stages, rows per program or 0)
    ("dkdv", 32, 64): ((128, 4, 2, 0), (64, 4, 2, 0), (32, 8, 2, 0)),
    ("dkdv", 32, 128): ((64, 8, 2, 0), (32, 8, 2, 0), (32, 8, 3, 0)),
    ("dkdv", 64, 64): ((32, 8, 2, 0), (32, 4, 2, 0)),
    ("dkdv", 64, 128): ((32, 8, 2, 64), (32, 4, 2, 64), (32, 8, 2, 0)),
    ("dkdv", 128, 64): ((64, 8, 2, 0), (32, 8, 2, 0), (32, 8, 3, 0)),
    ("dkdv", 128, 128): ((64, 8, 2, 64), (32, 8, 2, 64), (32, 8, 3, 64)),
    ("dq", 32, 64): ((128, 8, 3, 0), (64, 8, 3, 0), (32, 4, 2, 0)),
    ("dq", 32, 128): ((128, 8, 3, 0), (64, 8, 2, 0), (32, 8, 2, 0)),
    ("dq", 64, 64): ((64, 8, 3, 0), (32, 8, 2, 0), (32, 4, 2, 0)),
    ("dq", 64, 128): ((64, 8, 2, 0), (32, 8, 2, 0), (32, 8, 3, 0)),
    ("dq", 128, 64): ((64, 8, 2, 0), (32, 8, 2, 0), (32, 8, 3, 0)),
    ("dq", 128, 128): ((32, 8, 3, 0), (32, 8, 2, 0)),
    ("fwd", 32, 64): ((128, 4, 2, 0), (64, 8, 2, 0), (32, 4, 2, 0)),
    ("fwd", 32, 128): ((128, 8, 2, 0), (64, 8, 3, 0), (32, 8, 2, 0)),
    ("fwd", 64, 64): ((128, 8, 3, 0), (64, 8, 3, 0), (32, 4, 2, 0)),
    ("fwd", 64, 128): ((64, 8, 2, 0), (32, 8, 2, 0), (32, 8, 3, 0)),
    ("fwd", 128, 64): ((128, 8, 2, 0), (64, 8, 2, 0), (32, 8, 3, 0)),
    ("fwd", 128, 128): ((128, 8, 2, 64), (64, 8, 3, 64), (32, 8, 3, 64)),
}
"""Per kernel, head-dim tile and item height, what autotuning chooses among: ``python
bench/kernel_build.py --choose`` over the recorded candidate matrices (partner rows 32/64/128 x
warps 4/8 x stages 2/3, whole items or 64-row parts, on every claimed architecture under each
recorded triton version), which ``tests/test_kernel_build.py`` holds this table to."""

CLAIMED = ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a")
"""Architectures the triton backend runs on: every offered build is spill-free and fits shared
memory there (checked in CI). Other GPUs get the other backends."""

PREFIX_HEAD_DIMS = {1: 128, 2: 64}
"""Class rows per segment the kernels are built for (the ``P`` constexpr), each compiled apart,
and the largest head dim served with them: one (HLIP's class token, or none) to 128; two (class
and register token, the dual models) to 64, every HLIP model's head dim, because at the 128
tile the dq builds of 64-row items spill on sm_86 and sm_89 and the forward's on sm_100a (the
build report compiles them, refused, to show it)."""
PREFIXES = tuple(PREFIX_HEAD_DIMS)

DTYPES = ("bfloat16", "float16")
"""Input dtypes the kernels take on a GPU. float32 is refused: its IEEE-precision builds spill
tens of KB per thread and use no tensor cores (the build report lists them)."""

HEAD_DIMS = (32, 128)
HEAD_DIM_MULTIPLE = 16
"""Head dims the kernels serve on a GPU: 32 to 128 in steps of 16, the head-dim tiles 32, 64
and 128 of the build report with triton's divisible-by-16 specialisation that it compiles."""


def architecture(capability: tuple[int, int]) -> Architecture | None:
    """The claimed architecture of a GPU of ``capability``, or ``None``."""
    return next((ARCHITECTURES[n] for n in CLAIMED if ARCHITECTURES[n].capability == tuple(capability)), None)


def prefix_reason(prefix: int, head_dim: int) -> str | None:
    """Why the kernels do not serve ``prefix`` class rows per segment at ``head_dim`` (``None``:
    they do; see :data:`PREFIX_HEAD_DIMS`)."""
    if prefix not in PREFIX_HEAD_DIMS:
        return f"{prefix} class rows per segment are not built (builds: {', '.join(map(str, PREFIXES))})"
    if head_dim > PREFIX_HEAD_DIMS[prefix]:
        return (
            f"{prefix} class rows per segment are served up to head_dim {PREFIX_HEAD_DIMS[prefix]} "
            f"(got {head_dim}): those builds spill registers"
        )
    return None


def autotune_configs(
    kernel: str, capability: tuple[int, int], dtype: str, head_dim: int, block_m: int, prefix: int = 1
) -> list[KernelConfig]:
    """The configs the autotuner may choose among for ``kernel`` (``"fwd"``, ``"dq"``,
    ``"dkdv"``) on a GPU of ``capability``, inputs of ``dtype`` (``"bfloat16"`` or ``"float16"``),
    ``head_dim``, items of ``block_m`` rows (one of :data:`BLOCK_MS`) and ``prefix`` class rows
    per segment. Raises ``ValueError`` for what the kernels do not serve, naming the limit."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    if architecture(capability) is None:
        raise ValueError(f"compute capability {capability} is not claimed ({', '.join(CLAIMED)})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not served on a GPU (serves {', '.join(DTYPES)})")
    if not HEAD_DIMS[0] <= head_dim <= HEAD_DIMS[1] or head_dim % HEAD_DIM_MULTIPLE:
        raise ValueError(
            f"head_dim {head_dim} outside {HEAD_DIMS[0]}..{HEAD_DIMS[1]}, a multiple of {HEAD_DIM_MULTIPLE}"
        )
    if block_m not in BLOCK_MS:
        raise ValueError(f"item height {block_m} is not one of {BLOCK_MS}")
    if reason := prefix_reason(prefix, head_dim):
        raise ValueError(reason)
    return [KernelConfig(*shape) for shape in _SHAPES[kernel, block_d(head_dim), block_m]]
