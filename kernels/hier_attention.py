"""Block-sparse flash attention over packed ragged segments (forward and backward).

Rows of ``q``, ``k``, ``v`` (``(rows, heads, head_dim)``, any strides) are the ``N`` patch rows
of a level's layout followed by ``S`` class-token rows, one per segment. ``row_seg`` (int32,
``rows``) gives every row's segment; ``cu`` (int32, ``S + 1``) the patch-row boundaries. Two rows
attend to each other exactly when their segments match.

Each program owns one tile of rows of one head, either in the patch region ``[0, N)`` or in the
class region ``[N, N + S)`` (tiles never straddle the two). A tile covers the segments
``lo..hi`` of its first and last rows, so its partners are the patch rows ``cu[lo]..cu[hi + 1]``
and the class rows ``N + lo..N + hi + 1``: only those tiles are visited, and a tile that spans a
segment boundary is masked by segment id. Short segments therefore share tiles instead of each
padding to one. The relation is symmetric, so the backward's key-side kernel walks its query
partners with the same ranges.

Softmax runs in base 2 with fp32 accumulation; the forward saves the base-2 log-sum-exp.
Written against the triton 3.6 API, without ``tl.make_block_ptr`` (gone in 3.9).
"""
# Kernel signatures are kept compact by hand: this file is excluded from ruff format.

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tile_origin(pid, N, S, BLOCK: tl.constexpr):
    """First row and region end of tile ``pid``: patch tiles first, then class tiles."""
    patch_tiles = tl.cdiv(N, BLOCK)
    if pid < patch_tiles:
        row0 = pid * BLOCK
        row_end = N
    else:
        row0 = N + (pid - patch_tiles) * BLOCK
        row_end = N + S
    return row0, row_end


@triton.jit
def _partner_range(row_seg, cu, row0, row_end, N, S, WHICH: tl.constexpr, BLOCK: tl.constexpr):
    """Rows that the segments of rows ``row0..row0+BLOCK`` attend to: their patch rows
    (``WHICH == 0``) or their class rows (``WHICH == 1``, empty when ``S == 0``)."""
    lo = tl.load(row_seg + row0)
    hi = tl.load(row_seg + tl.minimum(row0 + BLOCK, row_end) - 1)
    if WHICH == 0:
        start = tl.load(cu + lo)
        end = tl.load(cu + hi + 1)
    else:
        start = N + lo
        end = N + lo + tl.where(S > 0, hi - lo + 1, 0)
    return start, end


@triton.jit
def _load_rows(base, rows, row_ok, stride_t, offs_d, D):
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    return tl.load(base + rows[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, values, rows, row_ok, stride_t, offs_d, D):
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(base + rows[:, None] * stride_t + offs_d[None, :], values.to(base.dtype.element_ty), mask=mask)


@triton.jit
def hier_attn_fwd_kernel(
    Q, K, V, Out, LSE, row_seg, cu, N, S, D,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid, head = tl.program_id(0), tl.program_id(1)
    row0, row_end = _tile_origin(pid, N, S, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    offs_d = tl.arange(0, BLOCK_D)
    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh
    seg_q = tl.load(row_seg + rows, mask=row_ok, other=-1)
    q = _load_rows(Q, rows, row_ok, stride_qt, offs_d, D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for which in tl.static_range(2):  # the covered segments' patch rows, then their class rows
        start, end = _partner_range(row_seg, cu, row0, row_end, N, S, which, BLOCK_M)
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            seg_k = tl.load(row_seg + cols, mask=col_ok, other=-2)
            k = _load_rows(K, cols, col_ok, stride_kt, offs_d, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(seg_q[:, None] == seg_k[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no partner yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            v = _load_rows(V, cols, col_ok, stride_vt, offs_d, D)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_rows(Out + head * stride_oh, acc / l_safe[:, None], rows, row_ok, stride_ot, offs_d, D)
    tl.store(LSE + head * stride_lh + rows, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def hier_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, row_seg, cu, N, S, D,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid, head = tl.program_id(0), tl.program_id(1)
    col0, col_end = _tile_origin(pid, N, S, BLOCK_N)
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < col_end
    offs_d = tl.arange(0, BLOCK_D)
    Q += head * stride_qh
    DO += head * stride_doh
    LSE += head * stride_lh
    DELTA += head * stride_lh
    seg_k = tl.load(row_seg + cols, mask=col_ok, other=-1)
    k = _load_rows(K + head * stride_kh, cols, col_ok, stride_kt, offs_d, D)
    v = _load_rows(V + head * stride_vh, cols, col_ok, stride_vt, offs_d, D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for which in tl.static_range(2):  # query partners: patch rows, then class rows
        start, end = _partner_range(row_seg, cu, col0, col_end, N, S, which, BLOCK_N)
        for start_m in range(start, end, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            seg_q = tl.load(row_seg + rows, mask=row_ok, other=-2)
            q = _load_rows(Q, rows, row_ok, stride_qt, offs_d, D)
            do = _load_rows(DO, rows, row_ok, stride_dot, offs_d, D)
            lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
            # Transposed scores: keys along axis 0, queries along axis 1.
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            p_t = tl.exp2(s_t - lse[None, :])
            p_t = tl.where(seg_k[:, None] == seg_q[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    _store_rows(DK + head * stride_dkh, dk * sm_scale, cols, col_ok, stride_dkt, offs_d, D)
    _store_rows(DV + head * stride_dvh, dv, cols, col_ok, stride_dvt, offs_d, D)


@triton.jit
def hier_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, row_seg, cu, N, S, D,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid, head = tl.program_id(0), tl.program_id(1)
    row0, row_end = _tile_origin(pid, N, S, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    offs_d = tl.arange(0, BLOCK_D)
    K += head * stride_kh
    V += head * stride_vh
    seg_q = tl.load(row_seg + rows, mask=row_ok, other=-1)
    q = _load_rows(Q + head * stride_qh, rows, row_ok, stride_qt, offs_d, D)
    do = _load_rows(DO + head * stride_doh, rows, row_ok, stride_dot, offs_d, D)
    lse = tl.load(LSE + head * stride_lh + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * stride_lh + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for which in tl.static_range(2):  # key partners: patch rows, then class rows
        start, end = _partner_range(row_seg, cu, row0, row_end, N, S, which, BLOCK_M)
        for start_n in range(start, end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            seg_k = tl.load(row_seg + cols, mask=col_ok, other=-2)
            k = _load_rows(K, cols, col_ok, stride_kt, offs_d, D)
            v = _load_rows(V, cols, col_ok, stride_vt, offs_d, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(seg_q[:, None] == seg_k[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ + head * stride_dqh, dq * sm_scale, rows, row_ok, stride_dqt, offs_d, D)


# ---------------------------------------------------------------------------------------------
# Launch wrappers
# ---------------------------------------------------------------------------------------------

INTERPRETED = type(hier_attn_fwd_kernel).__name__ == "InterpretedFunction"
"""True when the kernels were built for ``TRITON_INTERPRET=1`` (CPU tensors, no autotune)."""

_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def _autotune_configs():
    """Tile configs: Hopper (sm90) favours 128-row tiles, Ampere (sm80/86) 64-row ones."""
    import torch

    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    shapes = (
        [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
        if major >= 9
        else [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)]
    )
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in shapes
    ]


_tuned: dict[str, object] = {}


def _kernel(name: str, kernel):
    """``kernel`` itself when interpreting; else its autotuned version, keyed on head dim."""
    if INTERPRETED:
        return kernel
    if name not in _tuned:
        _tuned[name] = triton.autotune(configs=_autotune_configs(), key=["BLOCK_D", "PRECISION"])(kernel)
    return _tuned[name]


def _launch_args():
    return dict(_INTERPRETER_BLOCKS) if INTERPRETED else {}


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype) -> str:
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def hier_attn_forward(q, k, v, row_seg, cu, num_class_rows: int, scale: float):
    """``(out, lse)``: attention output like ``q`` (contiguous) and base-2 LSE ``(heads, rows)``."""
    import torch

    rows, heads, dim = q.shape
    n = rows - num_class_rows
    out = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, rows), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) + triton.cdiv(num_class_rows, meta["BLOCK_M"]), heads)

    _kernel("fwd", hier_attn_fwd_kernel)[grid](
        q,
        k,
        v,
        out,
        lse,
        row_seg,
        cu,
        n,
        num_class_rows,
        dim,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        scale * LOG2E,
        BLOCK_D=block_d(dim),
        PRECISION=_precision(q.dtype),
        **_launch_args(),
    )
    return out, lse


def hier_attn_backward(grad_out, q, k, v, out, lse, row_seg, cu, num_class_rows: int, scale: float):
    """``(dq, dk, dv)`` for :func:`hier_attn_forward`'s output gradient ``grad_out``."""
    import torch

    rows, heads, dim = q.shape
    n = rows - num_class_rows
    delta = (out.float() * grad_out.float()).sum(-1).t().contiguous()  # (heads, rows)
    dq = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    common = dict(BLOCK_D=block_d(dim), PRECISION=_precision(q.dtype), **_launch_args())

    def grid_keys(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) + triton.cdiv(num_class_rows, meta["BLOCK_N"]), heads)

    def grid_queries(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) + triton.cdiv(num_class_rows, meta["BLOCK_M"]), heads)

    strides = (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
    )
    _kernel("dkdv", hier_attn_bwd_dkdv_kernel)[grid_keys](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        row_seg,
        cu,
        n,
        num_class_rows,
        dim,
        *strides,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        lse.stride(0),
        scale * LOG2E,
        scale,
        **common,
    )
    _kernel("dq", hier_attn_bwd_dq_kernel)[grid_queries](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        row_seg,
        cu,
        n,
        num_class_rows,
        dim,
        *strides,
        dq.stride(0),
        dq.stride(1),
        lse.stride(0),
        scale * LOG2E,
        scale,
        **common,
    )
    return dq, dk, dv
