"""SDPA backend: segments grouped by length, one batched ``scaled_dot_product_attention`` each.

Segments of equal length need no padding and no mask, so every group runs PyTorch's fused
kernels. The rows are permuted once so that each group is one contiguous block (a view per
group), and the output is permuted back; the permutation is built on the host once per
(layout, level) and cached on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .dispatch import AttentionCall, Backend, DeviceSupport, Support
from .permutation import permute_rows

_SUPPORT = Support(
    {"any": DeviceSupport((torch.float16, torch.bfloat16, torch.float32, torch.float64))}, dropout=True
)


@dataclass(frozen=True)
class BucketPlan:
    """``order`` puts the rows group by group (a group: the segments of one length, each
    segment's patch rows then its class-token copies), spare rows last; ``inverse`` undoes it;
    ``groups`` are the groups' ``(segments, length)`` in that order."""

    order: torch.Tensor
    inverse: torch.Tensor
    groups: tuple[tuple[int, int], ...]


def bucket_plan(call: AttentionCall) -> BucketPlan:
    """The cached plan for ``call``'s layout, level and class-token copies."""
    key = ("sdpa_plan", call.level, call.class_rows_level, call.prefix)
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
            copies = layout.num_tokens + segments[:, None] * call.prefix + np.arange(call.prefix)
            rows = np.concatenate([rows, copies], axis=1)
        groups.append(rows.shape)
        order.append(rows.ravel())
    order.append(np.arange(call.active_rows, call.active_rows + call.spare_rows))
    order = np.concatenate(order)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    device = layout.device
    return BucketPlan(
        order=torch.from_numpy(order).to(device),
        inverse=torch.from_numpy(inverse).to(device),
        groups=tuple((int(n), int(length)) for n, length in groups),
    )


def sdpa_attention(call: AttentionCall) -> torch.Tensor:
    heads, dim = call.q.shape[1:]
    plan = bucket_plan(call)
    sizes = [segments * length for segments, length in plan.groups]
    if call.spare_rows:
        sizes.append(call.spare_rows)

    def parts(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # split, not slices: its backward is one cat, where each slice's would zero-fill all rows.
        t = permute_rows(t, plan.order, plan.inverse)
        return (t,) if len(sizes) == 1 else t.split(sizes)

    q, k, v = parts(call.q), parts(call.k), parts(call.v)
    outs = []
    for i, shape in enumerate(plan.groups):
        group = (t[i].unflatten(0, shape).transpose(1, 2) for t in (q, k, v))
        dropout = {"dropout_p": call.dropout_p} if call.dropout_p else {}  # none: as traced before
        out = F.scaled_dot_product_attention(*group, scale=call.scale, **dropout)
        outs.append(out.transpose(1, 2).reshape(-1, heads, dim))
    if call.spare_rows:
        outs.append(v[-1])  # a spare row attends to itself only
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return permute_rows(out, plan.inverse, plan.order)


backend = Backend(
    name="sdpa",
    run=sdpa_attention,
    support=lambda: _SUPPORT,
    plan=bucket_plan,
    fixed_graph=False,  # one SDPA call per group of equal-length segments
)
