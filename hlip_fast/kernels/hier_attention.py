"""Block-sparse flash attention over packed ragged segments (forward and backward).

Rows of ``q``, ``k``, ``v`` (``(rows, heads, head_dim)``, any strides) are the ``N`` patch rows
of a level's layout followed by ``P`` class-token rows per segment (the prefix tokens, segment by
segment: segment ``s``'s are rows ``N + s·P`` onwards; ``S`` class rows in all). ``P`` is a
constexpr, 1 also for none (``S = 0``), so that the class token alone compiles as it did before
register tokens; ``cu`` (int32, segments ``+ 1``) gives the patch-row boundaries. Two rows attend
to each other exactly when their segments match.
Spare rows may follow (see ``Layout.class_rows_level``): the host wrappers handle them, not the
kernels.

The work follows a tile schedule (``tile_schedule.py``): each work item of one head is at most
``BLOCK_M`` rows of the consecutive segments ``lo..hi-1`` (the same window of each, described by
``items``); one program takes ``PART_M`` of its rows (the whole item, or half of a 128-row item,
so that no build spills registers: ``configs.py``) and visits their partners, the patch rows
``cu[lo]..cu[hi]`` then the class rows ``N + lo·P..N + hi·P``, ``BLOCK_N`` at a time, masked by
segment. Launch configs come from ``configs.autotune_configs`` (autotuned on a GPU) or
``INTERPRETER_CONFIGS``. The segments of an item have one length, so a partner's segment is
arithmetic and no per-token ids are read. Every row is in one item, so the forward, the
query-side and (the relation being symmetric) the key-side backward each write a row once.

Softmax runs in base 2 with fp32 accumulation; the forward saves the base-2 log-sum-exp.
Written against the triton 3.6 API, without ``tl.make_block_ptr`` (gone in 3.9).
"""
# Kernel signatures are kept compact by hand: this file is excluded from ruff format.

from __future__ import annotations

import triton
import triton.language as tl

from .configs import KernelConfig, autotune_configs, block_d

LOG2E = 1.4426950408889634


@triton.jit
def _item(items, cu, pid, N, S, P: tl.constexpr, BLOCK_M: tl.constexpr, PART_M: tl.constexpr):
    """Program ``pid``'s part of its item: ``PART_M`` of the item's rows (``count`` rows of each
    segment ``lo..hi-1``, ``from_end`` rows before the segment's end, its ``P`` class rows last), their mask
    and segments; whether the part holds any row; and the item's partners (first patch row,
    number of patch rows, first segment, patch rows per segment, number of partner rows)."""
    parts = BLOCK_M // PART_M
    num_items = tl.num_programs(0) // parts  # items are stored field by field: (4, num_items)
    item = pid // parts
    lo = tl.load(items + item)
    hi = tl.load(items + num_items + item)
    from_end = tl.load(items + 2 * num_items + item)
    count = tl.load(items + 3 * num_items + item)
    first_row = (pid % parts) * PART_M
    idx = first_row + tl.arange(0, PART_M)
    ok = idx < (hi - lo) * count
    seg = lo + idx // count
    first = tl.load(cu + seg, mask=ok, other=0)
    length = tl.load(cu + seg + 1, mask=ok, other=0) - first
    if P == 1:  # one class row per segment or none (S = 0): the index needs no arithmetic
        offset = length + tl.where(S > 0, 1, 0) - from_end + idx % count
        rows = tl.where(offset < length, first + offset, N + seg)
        n_class = tl.where(S > 0, hi - lo, 0)
    else:
        offset = length + P - from_end + idx % count
        rows = tl.where(offset < length, first + offset, N + seg * P + offset - length)
        n_class = P * (hi - lo)
    seg = tl.where(ok, seg, -1)
    p0 = tl.load(cu + lo)
    n_patch = tl.load(cu + hi) - p0
    n_partners = tl.where(first_row < (hi - lo) * count, n_patch + n_class, 0)
    seg_len = tl.maximum(n_patch // (hi - lo), 1)
    return rows, ok, seg, p0, n_patch, lo, seg_len, n_partners


@triton.jit
def _partners(start, p0, n_patch, lo, seg_len, n_partners, N, P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partner rows ``start..start+BLOCK_N`` of an item (its patch rows, then its class rows),
    their mask and their segments (-2 where masked)."""
    j = start + tl.arange(0, BLOCK_N)
    ok = j < n_partners
    patch = j < n_patch
    if P == 1:
        cols = tl.where(patch, p0 + j, N + lo + j - n_patch)
        seg = tl.where(patch, lo + j // seg_len, lo + j - n_patch)
    else:
        cols = tl.where(patch, p0 + j, N + lo * P + j - n_patch)
        seg = tl.where(patch, lo + j // seg_len, lo + (j - n_patch) // P)
    return cols, ok, tl.where(ok, seg, -2)


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
    Q, K, V, Out, LSE, cu, items, N, S, D,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    qk_scale, length_bucket,
    BLOCK_M: tl.constexpr, PART_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, P: tl.constexpr,
):
    pid, head = tl.program_id(0), tl.program_id(1)
    rows, row_ok, seg_q, p0, n_patch, lo, seg_len, n_partners = _item(
        items, cu, pid, N, S, P, BLOCK_M, PART_M
    )
    offs_d = tl.arange(0, BLOCK_D)
    K += head * stride_kh
    V += head * stride_vh
    q = _load_rows(Q + head * stride_qh, rows, row_ok, stride_qt, offs_d, D)

    acc = tl.zeros([PART_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([PART_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([PART_M], dtype=tl.float32)
    for start in range(0, n_partners, BLOCK_N):
        cols, col_ok, seg_k = _partners(start, p0, n_patch, lo, seg_len, n_partners, N, P, BLOCK_N)
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
    Q, K, V, DO, LSE, DELTA, DK, DV, cu, items, N, S, D,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh, qk_scale, sm_scale, length_bucket,
    BLOCK_M: tl.constexpr, PART_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, P: tl.constexpr,
):
    # The item's rows are the keys here; their partners are the queries that attend to them.
    pid, head = tl.program_id(0), tl.program_id(1)
    cols, col_ok, seg_k, p0, n_patch, lo, seg_len, n_partners = _item(
        items, cu, pid, N, S, P, BLOCK_M, PART_M
    )
    offs_d = tl.arange(0, BLOCK_D)
    Q += head * stride_qh
    DO += head * stride_doh
    LSE += head * stride_lh
    DELTA += head * stride_lh
    k = _load_rows(K + head * stride_kh, cols, col_ok, stride_kt, offs_d, D)
    v = _load_rows(V + head * stride_vh, cols, col_ok, stride_vt, offs_d, D)

    dk = tl.zeros([PART_M, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([PART_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_partners, BLOCK_N):
        rows, row_ok, seg_q = _partners(start, p0, n_patch, lo, seg_len, n_partners, N, P, BLOCK_N)
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
    Q, K, V, DO, LSE, DELTA, DQ, cu, items, N, S, D,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh, qk_scale, sm_scale, length_bucket,
    BLOCK_M: tl.constexpr, PART_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, P: tl.constexpr,
):
    pid, head = tl.program_id(0), tl.program_id(1)
    rows, row_ok, seg_q, p0, n_patch, lo, seg_len, n_partners = _item(
        items, cu, pid, N, S, P, BLOCK_M, PART_M
    )
    offs_d = tl.arange(0, BLOCK_D)
    K += head * stride_kh
    V += head * stride_vh
    q = _load_rows(Q + head * stride_qh, rows, row_ok, stride_qt, offs_d, D)
    do = _load_rows(DO + head * stride_doh, rows, row_ok, stride_dot, offs_d, D)
    lse = tl.load(LSE + head * stride_lh + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * stride_lh + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([PART_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_partners, BLOCK_N):
        cols, col_ok, seg_k = _partners(start, p0, n_patch, lo, seg_len, n_partners, N, P, BLOCK_N)
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

INTERPRETER_BLOCK_M = 16
"""The item height under the interpreter (small: interpreted programs run one after another)."""
INTERPRETER_CONFIGS = {
    "fwd": KernelConfig(block_n=16, num_warps=1, num_stages=1),
    "dq": KernelConfig(block_n=16, num_warps=1, num_stages=1, part_m=8),
    "dkdv": KernelConfig(block_n=16, num_warps=1, num_stages=1, part_m=8),
}
"""What the interpreter runs: the backward in half items, so that CPU tests cover the split."""

KERNEL_FUNCTIONS = {
    "fwd": hier_attn_fwd_kernel, "dq": hier_attn_bwd_dq_kernel, "dkdv": hier_attn_bwd_dkdv_kernel,
}
_tuned: dict[tuple, object] = {}


def _meta(config: KernelConfig, block_m: int) -> dict:
    return {"BLOCK_N": config.block_n, "PART_M": config.rows_per_program(block_m)}


def _launcher(name: str, q, block_m: int, num_items: int, prefix: int):
    """``(kernel, grid, constants)`` for kernel ``name`` on ``q``'s device and dtype with items of
    ``block_m`` rows and ``prefix`` class rows per segment (the ``P`` constexpr). On a GPU the
    kernel is autotuned over :func:`autotune_configs` for this
    capability, dtype, head dim, item height and ``prefix``, keyed on the schedule's segment-length bucket
    (so a level of short segments and one of long segments tune apart)."""
    kernel = KERNEL_FUNCTIONS[name]
    constants = {
        "BLOCK_M": block_m, "BLOCK_D": block_d(q.shape[-1]), "PRECISION": _precision(q.dtype), "P": prefix,
    }
    heads = q.shape[1]
    if INTERPRETED:
        constants.update(_meta(INTERPRETER_CONFIGS[name], block_m))
        return kernel, (num_items * block_m // constants["PART_M"], heads), constants
    import torch

    dtype = str(q.dtype).removeprefix("torch.")
    key = (name, torch.cuda.get_device_capability(q.device), dtype, q.shape[-1], block_m, prefix)
    if key not in _tuned:
        configs = [
            triton.Config(_meta(c, block_m), num_warps=c.num_warps, num_stages=c.num_stages)
            for c in autotune_configs(name, *key[1:])
        ]
        _tuned[key] = triton.autotune(configs=configs, key=["length_bucket"])(kernel)

    def grid(meta: dict) -> tuple[int, int]:
        return num_items * block_m // meta["PART_M"], heads

    return _tuned[key], grid, constants


def autotuned() -> list[dict]:
    """What autotuning chose in this process: per kernel, GPU capability, dtype, head dim, item
    height, class rows per segment and tuning key (the segment-length bucket), the config's name
    (``bench/attention.py`` records it beside its times)."""
    chosen = []
    for (name, capability, dtype, head_dim, block_m, prefix), tuner in _tuned.items():
        for tuning_key, config in tuner.cache.items():
            rows = config.kwargs["PART_M"]
            part_m = rows if rows < block_m else 0
            picked = KernelConfig(config.kwargs["BLOCK_N"], config.num_warps, config.num_stages, part_m)
            chosen.append({
                "kernel": name, "capability": list(capability), "dtype": dtype, "head_dim": head_dim,
                "block_m": block_m, "prefix": prefix, "tuning_key": [str(part) for part in tuning_key],
                "config": picked.name,
            })
    return chosen


def precision_name(dtype: str) -> str:
    """``tl.dot``'s input precision for inputs of ``dtype`` (a torch dtype's name)."""
    return "ieee" if dtype == "float32" else "tf32"


def _precision(dtype) -> str:
    return precision_name(str(dtype).removeprefix("torch."))


def _prefix(num_class_rows: int, cu) -> int:
    """The kernels' ``P`` constexpr: class rows per segment, 1 also for none (``S = 0`` tells)."""
    return max(1, num_class_rows // (cu.numel() - 1))


def hier_attn_forward(
    q, k, v, cu, items, num_class_rows: int, num_spare_rows: int, block_m: int, length_bucket: int,
    scale: float,
):
    """``(out, lse)``: attention output like ``q`` (contiguous) and base-2 LSE ``(heads, rows)``;
    ``items``, ``block_m`` and ``length_bucket`` come from a ``TileSchedule`` (items on the device).
    The last ``num_spare_rows`` rows each attend to themselves only (their output is their value)."""
    import torch

    rows, heads, dim = q.shape
    active = rows - num_spare_rows
    n = active - num_class_rows
    out = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, rows), dtype=torch.float32, device=q.device)
    if num_spare_rows:  # not on every call: each op costs host time even on empty rows
        out[active:] = v[active:]
        lse[:, active:] = (q[active:].float() * k[active:].float()).sum(-1).t() * (scale * LOG2E)
    kernel, grid, constants = _launcher("fwd", q, block_m, items.numel() // 4, _prefix(num_class_rows, cu))
    kernel[grid](
        q, k, v, out, lse, cu, items, n, num_class_rows, dim,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), scale * LOG2E, length_bucket, **constants,
    )
    return out, lse


def hier_attn_backward(
    grad_out, q, k, v, out, lse, cu, items,
    num_class_rows: int, num_spare_rows: int, block_m: int, length_bucket: int, scale: float,
):
    """``(dq, dk, dv)`` for :func:`hier_attn_forward`'s output gradient ``grad_out``."""
    import torch

    rows, heads, dim = q.shape
    active = rows - num_spare_rows
    n = active - num_class_rows
    delta = (out.float() * grad_out.float()).sum(-1).t().contiguous()  # (heads, rows)
    dq = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if num_spare_rows:
        dq[active:], dk[active:], dv[active:] = 0, 0, grad_out[active:]  # out = v on spare rows
    inputs = (q, k, v, grad_out, lse, delta)
    schedule = (cu, items, n, num_class_rows, dim)
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1),
    )
    kernel, grid, constants = _launcher("dkdv", q, block_m, items.numel() // 4, _prefix(num_class_rows, cu))
    kernel[grid](
        *inputs, dk, dv, *schedule, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), scale * LOG2E, scale, length_bucket, **constants,
    )
    kernel, grid, constants = _launcher("dq", q, block_m, items.numel() // 4, _prefix(num_class_rows, cu))
    kernel[grid](
        *inputs, dq, *schedule, *strides, dq.stride(0), dq.stride(1), lse.stride(0), scale * LOG2E, scale,
        length_bucket, **constants,
    )
    return dq, dk, dv
