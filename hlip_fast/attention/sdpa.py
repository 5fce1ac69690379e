"""SDPA backend: segments grouped by length, one batched ``scaled_dot_product_attention`` each.

Segments of equal length need no padding and no mask, so every group runs PyTorch's fused
kernels. The gather indices of each group and the permutation that restores row order are
built on the host once per (layout, level) and cached on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .dispatch import AttentionCall, Backend, DeviceSupport, Support

_SUPPORT = Support({"any": DeviceSupport((torch.float16, torch.bfloat16, torch.float32, torch.float64))})


@dataclass(frozen=True)
class BucketPlan:
    """``groups[i]`` is ``(segments, length)`` row indices; ``inverse`` undoes their concatenation
    followed by the spare rows."""

    groups: tuple[torch.Tensor, ...]
    inverse: torch.Tensor


def bucket_plan(call: AttentionCall) -> BucketPlan:
    """The cached plan for ``call``'s layout, level and class-token mode."""
    key = ("sdpa_plan", call.level, call.class_rows_level)
    return call.layout.cached(key, lambda: _build_plan(call))


def _build_plan(call: AttentionCall) -> BucketPlan:
    layout = call.layout
    lv = layout.level(call.level)
    starts, seqlens = lv.starts, lv.seqlens
    groups, order = [], []
    for length in np.unique(seqlens):
        segments = np.flatnonzero(seqlens == length)
        rows = starts[segments, None] + np.arange(length)
        if call.class_tokens:
            rows = np.concatenate([rows, layout.num_tokens + segments[:, None]], axis=1)
        groups.append(rows)
        order.append(rows.ravel())
    order.append(np.arange(call.active_rows, call.active_rows + call.spare_rows))
    order = np.concatenate(order)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    device = layout.device
    return BucketPlan(
        groups=tuple(torch.from_numpy(g).to(device) for g in groups),
        inverse=torch.from_numpy(inverse).to(device),
    )


def sdpa_attention(call: AttentionCall) -> torch.Tensor:
    heads, dim = call.q.shape[1:]
    plan = bucket_plan(call)
    outs = []
    for rows in plan.groups:
        # index_select, not t[rows]: its backward is index_add rather than a slower index_put.
        q, k, v = (
            t.index_select(0, rows.flatten()).unflatten(0, rows.shape).transpose(1, 2)
            for t in (call.q, call.k, call.v)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=call.scale)
        outs.append(out.transpose(1, 2).reshape(-1, heads, dim))
    outs.append(call.v[call.active_rows :])  # a spare row attends to itself only
    return torch.cat(outs).index_select(0, plan.inverse)


backend = Backend(
    name="sdpa",
    run=sdpa_attention,
    support=lambda: _SUPPORT,
    plan=bucket_plan,
    fixed_graph=False,  # one SDPA call per group of equal-length segments
)
