"""The ``triton`` backend: hlip_fast's block-sparse flash-attention kernel as a torch custom op.

The kernels (``hlip_fast.kernels.hier_attention``) take the packed rows as they are, class-token
rows (and spare rows) included, so no gather or padding happens around them; they follow a tile
schedule built once per layout and level on the host (``hlip_fast.kernels.tile_schedule``). The
forward and backward are registered as ``hlip_fast::hier_attn_fwd`` / ``hlip_fast::hier_attn_bwd``
custom ops with fake (meta) implementations, so the op composes with ``torch.compile`` and
autograd.

Runs on CUDA, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before hlip_fast's kernels
were imported (tests; slow; fp32/fp16 only, since the interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

import torch

from .dispatch import AttentionCall, Backend, DeviceSupport, Support

_INTERPRETER_DTYPES = (torch.float16, torch.float32)
INTERPRETER_HEAD_DIMS = (16, 128)
"""Head dims under the interpreter (on a GPU: ``hlip_fast.kernels.configs.HEAD_DIMS``)."""


def _kernels():
    """Import the kernels on first use (importing triton costs time; CPU users may lack it)."""
    from hlip_fast.kernels import hier_attention

    return hier_attention


@torch.compiler.assume_constant_result  # a fixed fact of the process, not traced by dynamo
def _import_error() -> str | None:
    try:
        _kernels()
    except Exception as err:  # noqa: BLE001 - any import failure means "unavailable", with why
        return f"triton kernels unavailable: {type(err).__name__}: {err}"
    return None


@torch.compiler.assume_constant_result
def _interpreted() -> bool:
    return _kernels().INTERPRETED


@torch.library.custom_op("hlip_fast::hier_attn_fwd", mutates_args=())
def hier_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    items: torch.Tensor,
    num_class_rows: int,
    num_spare_rows: int,
    block_m: int,
    length_bucket: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    schedule = (cu, items, num_class_rows, num_spare_rows, block_m, length_bucket)
    return _kernels().hier_attn_forward(q, k, v, *schedule, scale)


@hier_attn_fwd.register_fake
def _(q, *kv_schedule_and_scalars):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float32
    )


@torch.library.custom_op("hlip_fast::hier_attn_bwd", mutates_args=())
def hier_attn_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu: torch.Tensor,
    items: torch.Tensor,
    num_class_rows: int,
    num_spare_rows: int,
    block_m: int,
    length_bucket: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    schedule = (cu, items, num_class_rows, num_spare_rows, block_m, length_bucket)
    return _kernels().hier_attn_backward(grad_out, q, k, v, out, lse, *schedule, scale)


@hier_attn_bwd.register_fake
def _(grad_out, q, *schedule_and_scalars):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, cu, items, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu, items)
    ctx.scalars = scalars  # num_class_rows, num_spare_rows, block_m, length_bucket, scale


def _backward(ctx, grad_out, grad_lse):
    dq, dk, dv = hier_attn_bwd(grad_out, *ctx.saved_tensors, *ctx.scalars)
    return dq, dk, dv, *(None,) * 7


hier_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def schedule_inputs(
    layout, level: str, class_tokens: bool, device: torch.device, spare_rows: int = 0, prefix: int = 1
) -> tuple:
    """The custom op's layout arguments: ``cu_seqlens`` and the tile schedule's items on the
    device, the numbers of class rows (``prefix`` per segment with ``class_tokens``) and spare
    rows, the item height (``INTERPRETER_BLOCK_M``
    under the interpreter; on a GPU whichever of ``BLOCK_MS`` visits least for this layout and
    level) and the segment-length bucket that keys autotuning."""
    from hlip_fast.kernels.configs import BLOCK_MS
    from hlip_fast.kernels.tile_schedule import layout_schedule

    heights = (_kernels().INTERPRETER_BLOCK_M,) if _interpreted() else BLOCK_MS
    per_segment = prefix if class_tokens else 0
    schedule = layout_schedule(layout, level, per_segment, heights)
    class_rows = per_segment * layout.num_segments(level)
    cu = layout.level(level).cu_seqlens
    return cu, schedule.on(device), class_rows, spare_rows, schedule.block_m, schedule.length_bucket


def _call_schedule(call: AttentionCall) -> tuple:
    return schedule_inputs(
        call.layout, call.level, call.class_tokens, call.q.device, call.spare_rows, call.prefix
    )


def triton_attention(call: AttentionCall) -> torch.Tensor:
    out, _ = hier_attn_fwd(call.q, call.k, call.v, *_call_schedule(call), call.scale)
    return out


def _support() -> Support:
    """CUDA, or under ``TRITON_INTERPRET=1`` CPU tensors only (the interpreter's bf16 is wrong)."""
    if missing := _import_error():
        return Support({}, missing=missing)
    if _interpreted():
        hint = "the kernels were built for TRITON_INTERPRET=1, which runs CPU tensors only"
        return Support(
            {"cpu": DeviceSupport(_INTERPRETER_DTYPES, head_dims=INTERPRETER_HEAD_DIMS)}, hint=hint
        )
    return gpu_support()


def gpu_support() -> Support:
    """What the compiled kernels serve: the dtypes, head dims and architectures whose every build
    is spill-free (``hlip_fast.kernels.configs``)."""
    from hlip_fast.kernels import configs

    gpu = DeviceSupport(
        tuple(getattr(torch, name) for name in configs.DTYPES),
        head_dims=configs.HEAD_DIMS,
        head_dim_multiple=configs.HEAD_DIM_MULTIPLE,
        dtype_note="float32 builds spill registers, use no tensor cores: cast to bfloat16 or use flex/sdpa",
    )
    hint = "or TRITON_INTERPRET=1 for CPU tensors"
    return Support({"cuda": gpu}, hint=hint, check=_gpu_check)


def _gpu_check(call: AttentionCall) -> str | None:
    """The GPU's architecture, then the class rows per segment the builds serve at this head dim."""
    from hlip_fast.kernels import configs

    if reason := unclaimed_reason(torch.cuda.get_device_capability(call.q.device)):
        return reason
    return configs.prefix_reason(call.prefix if call.class_tokens else 1, call.q.shape[-1])


def unclaimed_reason(capability: tuple[int, int]) -> str | None:
    """``None`` for a GPU architecture the kernels are built and checked for, else why not."""
    from hlip_fast.kernels import configs

    if configs.architecture(capability) is None:
        major, minor = capability
        claimed = ", ".join(configs.CLAIMED)
        return f"compute capability {major}.{minor} is not claimed (builds checked for {claimed})"
    return None


backend = Backend(name="triton", run=triton_attention, support=_support, plan=_call_schedule)
