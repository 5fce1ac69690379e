"""FlexAttention backend: one ``flex_attention`` call with a block mask built from the layout.

Rows attend to rows of the same segment (class-token copies carry their segment's id). The
block mask is cached on the layout per level, so all blocks of a step share it. On CUDA the
compiled kernel runs forward and backward; on the CPU only the eager forward is available.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .dispatch import AttentionCall, Backend, floating_dtype_reason

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError as err:  # pragma: no cover - torch>=2.11 always has it
    _IMPORT_ERROR: str | None = f"flex_attention unavailable: {err}"
else:
    _IMPORT_ERROR = None

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=True)


def block_mask(call: AttentionCall):
    """The cached block mask of ``call``'s layout, level and class-token mode."""
    key = ("flex_block_mask", call.level, call.class_tokens)
    cache = call.layout.cache
    if key not in cache:
        segment = call.layout.row_segment_ids(call.level, call.class_tokens)
        rows = segment.numel()

        def same_segment(b, h, q_idx, kv_idx):
            return segment[q_idx] == segment[kv_idx]

        cache[key] = create_block_mask(
            same_segment, B=None, H=None, Q_LEN=rows, KV_LEN=rows, device=segment.device
        )
    return cache[key]


def flex_hier_attention(call: AttentionCall) -> torch.Tensor:
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (call.q, call.k, call.v))
    if q.is_cuda:
        out = _compiled_flex()(q, k, v, block_mask=block_mask(call), scale=call.scale)
    else:
        with warnings.catch_warnings():  # the CPU path is knowingly the unfused one
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(q, k, v, block_mask=block_mask(call), scale=call.scale)
    return out.squeeze(0).transpose(0, 1)


def _unsupported_reason(call: AttentionCall) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if call.q.is_cuda:
        if call.q.shape[-1] < 16:
            return f"head_dim {call.q.shape[-1]} < 16 is not supported by the CUDA kernel"
        return floating_dtype_reason(call, _CUDA_DTYPES)
    if call.q.device.type != "cpu":
        return f"device {call.q.device.type} not supported"
    if call.needs_grad:
        return "backward runs only on CUDA (the CPU path is forward-only)"
    return floating_dtype_reason(call, _CPU_DTYPES)


backend = Backend(name="flex", run=flex_hier_attention, unsupported_reason=_unsupported_reason)
