"""``hier_attention``: one operation, several backends, one dispatcher.

Each backend declares what it supports through ``unsupported_reason``; the dispatcher runs the
requested backend or, for ``"auto"``, the first supported one in the measured ranking of
:mod:`hlip_fast.attention.auto`. When none fits, the error lists every backend's reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layout import Layout, check_level
from .auto import ranked_backends

logger = logging.getLogger(__name__)

ENV_BACKEND = "HLIP_FAST_ATTN_BACKEND"
"""Environment variable that replaces ``backend="auto"`` with a named backend."""


@dataclass(frozen=True)
class AttentionCall:
    """What a backend is asked to do: the inputs plus what the dispatcher derived from them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: Layout
    level: str
    scale: float
    class_tokens: bool

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


@dataclass(frozen=True)
class Backend:
    """A named implementation of hierarchical attention.

    ``unsupported_reason(call)`` returns ``None`` when the backend can run ``call``, else a short
    reason; ``run(call)`` returns the output, shaped like ``call.q``.
    """

    name: str
    run: Callable[[AttentionCall], torch.Tensor]
    unsupported_reason: Callable[[AttentionCall], str | None]


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` available to :func:`hier_attention` under its name."""
    _BACKENDS[backend.name] = backend
    return backend


def list_backends() -> list[str]:
    """Names of all registered backends (available here or not)."""
    return sorted(_BACKENDS)


def available_backends(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, level: str
) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run these inputs, else why not."""
    call = _make_call(q, k, v, layout, level, None)
    return {name: b.unsupported_reason(call) for name, b in sorted(_BACKENDS.items())}


def hier_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    level: str,
    *,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Block-diagonal attention over the segments of ``level``.

    Args:
        q, k, v: ``(rows, heads, head_dim)``. The first ``layout.num_tokens`` rows are the packed
            patch tokens in layout order. Optionally ``layout.num_segments(level)`` more rows
            follow: HLIP's class-token copies, one per segment in segment order. Every row
            attends to the patch rows of its own segment and to that segment's class-token copy.
        layout: the batch's layout, on the same device as ``q``.
        level: ``"slice"``, ``"scan"`` or ``"study"``.
        backend: ``"auto"`` or a name from :func:`list_backends`. With ``"auto"`` the
            environment variable ``HLIP_FAST_ATTN_BACKEND``, when set, names the backend.
        scale: softmax scale; ``head_dim ** -0.5`` by default.

    Returns:
        The attention output, shaped like ``q``.
    """
    call = _make_call(q, k, v, layout, level, scale)
    chosen = _choose(call, backend)
    if not torch.compiler.is_compiling():
        logger.debug("hier_attention level=%s rows=%d backend=%s", level, q.shape[0], chosen.name)
    return chosen.run(call)


def select_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, level: str, backend: str = "auto"
) -> str:
    """The name of the backend :func:`hier_attention` would run for these arguments."""
    return _choose(_make_call(q, k, v, layout, level, None), backend).name


def _make_call(q, k, v, layout: Layout, level: str, scale: float | None) -> AttentionCall:
    check_level(level)
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must share one shape (rows, heads, head_dim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if len({q.dtype, k.dtype, v.dtype}) != 1 or len({q.device, k.device, v.device}) != 1:
        raise ValueError("q, k, v must share one dtype and one device")
    if q.device != layout.device:
        raise ValueError(
            f"inputs are on {q.device} but the layout is on {layout.device}; move the batch "
            "with batch.to(device)"
        )
    tokens, segments = layout.num_tokens, layout.num_segments(level)
    if q.shape[0] not in (tokens, tokens + segments):
        raise ValueError(
            f"q has {q.shape[0]} rows; the layout has {tokens} tokens and {segments} {level} "
            f"segments, so expected {tokens} (no class tokens) or {tokens + segments}"
        )
    return AttentionCall(
        q=q,
        k=k,
        v=v,
        layout=layout,
        level=level,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        class_tokens=q.shape[0] == tokens + segments,
    )


def _choose(call: AttentionCall, backend: str) -> Backend:
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; known: {list_backends()}")
        reason = _BACKENDS[backend].unsupported_reason(call)
        if reason is not None:
            raise RuntimeError(f"attention backend {backend!r} cannot run this call: {reason}")
        return _BACKENDS[backend]
    for name in ranked_backends(call):
        if name in _BACKENDS and _BACKENDS[name].unsupported_reason(call) is None:
            return _BACKENDS[name]
    reasons = "\n".join(
        f"  {name}: {b.unsupported_reason(call) or 'not ranked for this call'}"
        for name, b in sorted(_BACKENDS.items())
    )
    raise RuntimeError(f"no attention backend supports this call:\n{reasons}")


def floating_dtype_reason(call: AttentionCall, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Shared check: ``None`` if ``call``'s dtype is one of ``dtypes``, else the reason."""
    if call.q.dtype not in dtypes:
        return f"dtype {call.q.dtype} not supported (supports {', '.join(map(str, dtypes))})"
    return None
