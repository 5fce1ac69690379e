"""FlexAttention backend: one ``flex_attention`` call with a block mask built from the layout.

Rows attend to rows of the same segment (class-token copies carry their segment's id, each spare
row an id of its own). The block mask is cached on the layout per level, so all blocks of a step
share it. On CUDA the compiled kernel runs forward and backward; on the CPU only the eager forward
is available.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .dispatch import AttentionCall, Backend, DeviceSupport, Support

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError as err:  # pragma: no cover - torch>=2.11 always has it
    _IMPORT_ERROR: str | None = f"flex_attention unavailable: {err}"
else:
    _IMPORT_ERROR = None


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=True)


def block_mask(call: AttentionCall):
    """The cached block mask of ``call``'s layout, level and class-token mode."""
    segment = call.layout.segment_ids(call.level, call.class_rows_level or False, call.prefix)
    rows = segment.numel()

    def same_segment(b, h, q_idx, kv_idx):
        return segment[q_idx] == segment[kv_idx]

    def build():
        return create_block_mask(same_segment, B=None, H=None, Q_LEN=rows, KV_LEN=rows, device=segment.device)

    return call.layout.cached(("flex_block_mask", call.level, call.class_rows_level, call.prefix), build)


def flex_hier_attention(call: AttentionCall) -> torch.Tensor:
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (call.q, call.k, call.v))
    if q.is_cuda:
        # Inside a compiled model the enclosing graph compiles it; else its own compiled kernel.
        attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        out = attend(q, k, v, block_mask=block_mask(call), scale=call.scale)
    else:
        with warnings.catch_warnings():  # the CPU path is knowingly the unfused one
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(q, k, v, block_mask=block_mask(call), scale=call.scale)
    return out.squeeze(0).transpose(0, 1)


_SUPPORT = Support(
    {
        "cuda": DeviceSupport((torch.float16, torch.bfloat16, torch.float32), head_dims=(16, 1 << 16)),
        "cpu": DeviceSupport((torch.float32, torch.float64), backward=False),
    },
    missing=_IMPORT_ERROR,
)
backend = Backend(name="flex", run=flex_hier_attention, support=lambda: _SUPPORT, plan=block_mask)
