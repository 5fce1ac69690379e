"""Backends built on general-purpose varlen attention kernels: ``flash``, ``torch_varlen``, ``xformers``.

Those kernels take contiguous segments. Without class tokens the packed rows already are;
with them, the rows are gathered once so that each segment's class-token copies precede its patch rows
(``cu_seqlens + arange``), spare rows last as one-row segments, and the output is scattered
back. The gather plan is built on the host once per (layout, level) and cached on the layout.
All three run on CUDA only and are optional imports: each says why it is unavailable.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .dispatch import AttentionCall, Backend, DeviceSupport, Support
from .permutation import permute_rows

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class VarlenPlan:
    """Row order that makes segments contiguous (``None``: already so) and their boundaries."""

    order: torch.Tensor | None
    inverse: torch.Tensor | None
    cu_seqlens: torch.Tensor
    seqlens: list[int]
    max_seqlen: int


def varlen_plan(call: AttentionCall) -> VarlenPlan:
    """The cached plan of ``call``'s layout, level and class-token mode."""
    key = ("varlen_plan", call.level, call.class_rows_level, call.prefix)
    return call.layout.cached(key, lambda: _build_plan(call))


def _build_plan(call: AttentionCall) -> VarlenPlan:
    layout, lv = call.layout, call.layout.level(call.level)
    if not call.class_tokens:
        return VarlenPlan(None, None, lv.cu_seqlens, lv.seqlens.tolist(), lv.max_seqlen)
    starts, seqlens, prefix = lv.starts, lv.seqlens, call.prefix
    segment = np.repeat(np.arange(lv.num_segments), seqlens + prefix)
    position = np.arange(len(segment)) - np.repeat(
        starts + prefix * np.arange(lv.num_segments), seqlens + prefix
    )
    copy = layout.num_tokens + segment * prefix + position
    order = np.where(position < prefix, copy, starts[segment] + position - prefix)
    order = np.concatenate([order, np.arange(call.active_rows, call.active_rows + call.spare_rows)])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    seqlens = np.concatenate([seqlens + prefix, np.ones(call.spare_rows, dtype=seqlens.dtype)])
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    device = layout.device
    return VarlenPlan(
        order=torch.from_numpy(order).to(device),
        inverse=torch.from_numpy(inverse).to(device),
        cu_seqlens=torch.from_numpy(cu).to(device),
        seqlens=seqlens.tolist(),
        max_seqlen=lv.max_seqlen + prefix,
    )


def run_varlen(call: AttentionCall, attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Gather to contiguous segments, ``attend(q, k, v, plan, scale)``, scatter back."""
    plan = varlen_plan(call)
    q, k, v = call.q, call.k, call.v
    if plan.order is None:
        return attend(q, k, v, plan, call.scale)
    q, k, v = (permute_rows(t, plan.order, plan.inverse) for t in (q, k, v))
    return permute_rows(attend(q, k, v, plan, call.scale), plan.inverse, plan.order)


@functools.cache
def _optional(module: str, name: str) -> tuple[Callable | None, str | None]:
    """``(object, None)`` if ``module.name`` imports, else ``(None, why not)``; imported on first use."""
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as err:  # noqa: BLE001 - any failure means "unavailable", with why
        return None, f"{module}.{name} unavailable ({type(err).__name__}: {err})"


def _flash_fn() -> tuple[Callable | None, str | None]:
    """FlashAttention 2/3 (``flash_attn``) or FlashAttention-4 (``flash-attn-4``: ``flash_attn.cute``)."""
    fn, missing = _optional("flash_attn", "flash_attn_varlen_func")
    if fn is not None:
        return fn, None
    fn, missing4 = _optional("flash_attn.cute", "flash_attn_varlen_func")
    return (fn, None) if fn is not None else (None, f"{missing}; {missing4}")


def _cuda_support(loaded: tuple[Callable | None, str | None], dtypes=_HALF) -> Support:
    """CUDA only, head dims 8..256 in steps of 8; ``missing`` when the kernel did not import."""
    return Support(
        {"cuda": DeviceSupport(dtypes, head_dims=(8, 256), head_dim_multiple=8)}, missing=loaded[1]
    )


def _call_with_supported(fn: Callable, *args, **kwargs):
    """Call ``fn`` with the keyword arguments its signature has (APIs differ across versions)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _flash_attend(q, k, v, plan: VarlenPlan, scale: float) -> torch.Tensor:
    out = _call_with_supported(
        _flash_fn()[0],
        q,
        k,
        v,
        cu_seqlens_q=plan.cu_seqlens,
        cu_seqlens_k=plan.cu_seqlens,
        max_seqlen_q=plan.max_seqlen,
        max_seqlen_k=plan.max_seqlen,
        softmax_scale=scale,
        causal=False,
    )
    return out[0] if isinstance(out, tuple) else out


def _torch_varlen():
    """PyTorch's own varlen flash attention (torch >= 2.10, CUDA)."""
    return _optional("torch.nn.attention.varlen", "varlen_attn")


def _torch_varlen_attend(q, k, v, plan: VarlenPlan, scale: float) -> torch.Tensor:
    varlen_attn = _torch_varlen()[0]
    bounds = (plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen)
    if "scale" not in inspect.signature(varlen_attn).parameters:
        q = q * (scale * q.shape[-1] ** 0.5)  # older signature: fixed 1/sqrt(head_dim) scale
        return varlen_attn(q, k, v, *bounds)
    return varlen_attn(q, k, v, *bounds, scale=scale)


def _xformers():
    """xformers' memory-efficient attention, used with a block-diagonal bias."""
    return _optional("xformers.ops", "fmha")


def _xformers_attend(q, k, v, plan: VarlenPlan, scale: float) -> torch.Tensor:
    fmha = _xformers()[0]
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(plan.seqlens)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]


flash_backend = Backend(
    name="flash",
    run=lambda call: run_varlen(call, _flash_attend),
    support=lambda: _cuda_support(_flash_fn()),
    plan=varlen_plan,
)
torch_varlen_backend = Backend(
    name="torch_varlen",
    run=lambda call: run_varlen(call, _torch_varlen_attend),
    support=lambda: _cuda_support(_torch_varlen()),
    plan=varlen_plan,
)
xformers_backend = Backend(
    name="xformers",
    run=lambda call: run_varlen(call, _xformers_attend),
    support=lambda: _cuda_support(_xformers(), _HALF + (torch.float32,)),
    plan=varlen_plan,
)
