"""Compile the attention kernels for a GPU without one, and read what the build costs.

``triton.compile`` of an ``ASTSource`` gives the PTX and, through the ``ptxas`` inside triton's
nvidia backend, the cubin and ptxas's report: registers, spill bytes, stack frame. With the
kernel's shared memory (``metadata.shared``) and the architecture's limits that says, before any
GPU run, whether a config spills, whether it fits shared memory and how many programs fit on one
SM. Triton's compile cache is bypassed (``TRITON_ALWAYS_COMPILE``) so that ptxas always runs.

The arguments are specialised as a launch of the triton backend would: every pointer, every
stride and the head dim divisible by 16 (packed ``(rows, heads, head_dim)`` tensors with a head
dim that is a multiple of 16); the other integers unspecialised.

Needs ``TRITON_INTERPRET`` unset when the kernels are imported (interpreted kernels do not compile).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import asdict, dataclass

from .configs import ARCHITECTURES, KernelConfig, block_d

_CONSTEXPRS = ("P", "BLOCK_M", "BLOCK_N", "BLOCK_D", "PART_M", "PRECISION")
_FLOAT_POINTERS = ("LSE", "DELTA")
_INT_POINTERS = ("cu", "items")
_SCALARS = ("qk_scale", "sm_scale")
_TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class Build:
    """One kernel built for one architecture: what ptxas and triton report, and what follows."""

    kernel: str
    arch: str
    dtype: str
    block_d: int
    block_m: int
    prefix: int
    config: KernelConfig
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared: int
    shared_limit: int
    tensor_cores: str
    programs_per_sm: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def overflows_shared(self) -> bool:
        return self.shared > self.shared_limit

    @property
    def clean(self) -> bool:
        return not self.spills and not self.overflows_shared

    def row(self) -> dict:
        """The build as a flat JSON row, with its verdicts."""
        row = asdict(self)
        row["config"] = self.config.name
        row.update(spills=self.spills, overflows_shared=self.overflows_shared, clean=self.clean)
        return row


def _signature(kernel, dtype: str) -> tuple[dict, dict]:
    """Argument types and the divisibility hints a launch would give (see the module docstring)."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in _CONSTEXPRS:
            signature[name] = "constexpr"
            continue
        if name in _INT_POINTERS:
            signature[name] = "*i32"
        elif name in _FLOAT_POINTERS:
            signature[name] = "*fp32"
        elif name[0].isupper() and name not in ("N", "S", "D"):
            signature[name] = "*" + _TRITON_TYPES[dtype]
        elif name in _SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("stride") or name == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _ptxas_numbers(log: str) -> dict:
    """Registers, spill bytes and stack frame from a ``ptxas -v`` log."""

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    if "Used" not in log:
        raise RuntimeError(f"no ptxas report in the build log:\n{log}")
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
    }


def _tensor_cores(ptx: str) -> str:
    for family, marker in (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma", "mma.sync")):
        if marker in ptx:
            return family
    return "none"


def compile_kernel(
    kernel: str, arch: str, dtype: str, head_dim: int, block_m: int, config: KernelConfig, prefix: int = 1
) -> Build:
    """Build ``kernel`` (``"fwd"``, ``"dq"`` or ``"dkdv"``) for ``arch`` (a key of
    :data:`ARCHITECTURES`), inputs of ``dtype`` (``"bfloat16"``, ``"float16"``, ``"float32"``),
    ``head_dim``, items of ``block_m`` rows and ``prefix`` class rows per segment (the ``P``
    constexpr, one of :data:`PREFIXES`), with ``config``; return what the build costs."""
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached build would skip ptxas and its report
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import hier_attention

    function = hier_attention.KERNEL_FUNCTIONS[kernel]
    if not isinstance(function, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were imported under TRITON_INTERPRET=1: unset it to compile them")
    target = ARCHITECTURES[arch]
    signature, attrs = _signature(function, dtype)
    constexprs = {
        "P": prefix,
        "BLOCK_M": block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_D": block_d(head_dim),
        "PRECISION": hier_attention.precision_name(dtype),
        "PART_M": config.rows_per_program(block_m),
    }
    source = ASTSource(function, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # triton prints its own ptxas run's report (its flags)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                source, target=GPUTarget("cuda", target.capability_number, 32), options=options
            )
    finally:
        knobs.nvidia.dump_ptxas_log = False
    numbers = _ptxas_numbers(log.getvalue())
    shared = int(compiled.metadata.shared)
    return Build(
        kernel=kernel,
        arch=arch,
        dtype=dtype,
        block_d=block_d(head_dim),
        block_m=block_m,
        prefix=prefix,
        config=config,
        shared=shared,
        shared_limit=target.shared_per_block,
        tensor_cores=_tensor_cores(compiled.asm["ptx"]),
        programs_per_sm=target.programs_per_sm(numbers["registers"], config.num_warps, shared),
        **numbers,
    )
