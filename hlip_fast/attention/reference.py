"""The definition of hierarchical attention: a plain loop over segments, float64-capable."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import AttentionCall, Backend, DeviceSupport, Support

_SUPPORT = Support(
    {"any": DeviceSupport((torch.float16, torch.bfloat16, torch.float32, torch.float64))}, dropout=True
)


def reference_attention(call: AttentionCall) -> torch.Tensor:
    """Softmax attention inside each segment, one segment at a time.

    Segment ``s`` holds patch rows ``cu[s]:cu[s+1]`` and, with class tokens, rows
    ``N + s·prefix`` to ``N + (s+1)·prefix``.
    Segments tile the patch rows in order, so concatenating the per-segment outputs (patch
    parts, then class parts) restores the input's row order. A spare row attends to itself
    only: a softmax over one key, so its output is its value row. With ``dropout_p``, the
    weights are dropped (and the rest scaled by ``1 / (1 - p)``) as ``nn.Dropout`` does.
    """
    q, k, v, n, prefix = call.q, call.k, call.v, call.layout.num_tokens, call.prefix
    cu = call.layout.level(call.level).cu_seqlens.tolist()
    patch_out, class_out = [], []
    for s, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        rows = slice(a, b)
        qs, ks, vs = q[rows], k[rows], v[rows]
        if call.class_tokens:
            c = slice(n + s * prefix, n + (s + 1) * prefix)
            qs, ks, vs = torch.cat([qs, q[c]]), torch.cat([ks, k[c]]), torch.cat([vs, v[c]])
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * call.scale
        weights = F.dropout(scores.softmax(dim=-1), call.dropout_p)  # p = 0: the weights themselves
        out = torch.einsum("hqk,khd->qhd", weights, vs)
        patch_out.append(out[: b - a])
        class_out.append(out[b - a :])
    return torch.cat(patch_out + class_out + [v[call.active_rows :]])


backend = Backend(
    name="reference",
    run=reference_attention,
    support=lambda: _SUPPORT,
    fixed_graph=False,  # one loop step per segment
)
