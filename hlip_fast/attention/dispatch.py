"""``hier_attention``: one operation, several backends, one dispatcher.

Each backend declares what it supports as data (:class:`Support`: per device type its dtypes,
head dims and whether it has a backward), checked in one place (:func:`unsupported_reason`); the
dispatcher runs the requested backend or, for ``"auto"``, the first supported one in the measured
ranking of :mod:`hlip_fast.attention.auto`. When none fits, the error lists every backend's reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layout import Layout, check_level
from .auto import FIXED_GRAPH_ORDER, ranked_backends

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
    class_rows_level: str | None
    """The level whose segments number the class-token copies (``None``: no copies); when finer
    than ``level``, spare rows follow ``level``'s copies (see :meth:`Layout.class_rows_level`)."""
    prefix: int = 1
    """Class-token copies per segment (the prefix tokens: class token and registers)."""
    dropout_p: float = 0.0
    """Dropout on the attention weights (a training-time option; 0 in evaluation)."""

    @property
    def class_tokens(self) -> bool:
        return self.class_rows_level is not None

    @property
    def spare_rows(self) -> int:
        """Rows after ``level``'s copies: each attends to itself only (its output is its value)."""
        if self.class_rows_level is None:
            return 0
        unused = self.layout.num_segments(self.class_rows_level) - self.layout.num_segments(self.level)
        return self.prefix * unused

    @property
    def num_class_rows(self) -> int:
        """Rows of ``level``'s copies: ``prefix`` per segment, segment by segment."""
        return self.prefix * self.layout.num_segments(self.level) if self.class_tokens else 0

    @property
    def active_rows(self) -> int:
        """The rows before the spare ones."""
        return self.q.shape[0] - self.spare_rows

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


@dataclass(frozen=True)
class DeviceSupport:
    """What a backend runs on one device type."""

    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, int] = (1, 1 << 16)
    head_dim_multiple: int = 1
    backward: bool = True
    dtype_note: str = ""
    """Why the dtypes stop where they do, added to a dtype refusal."""


@dataclass(frozen=True)
class Support:
    """What a backend runs: per device type (``"any"``: every device) a :class:`DeviceSupport`;
    ``missing`` says why it cannot run here at all (an optional import failed); ``hint`` is added
    to the reason when the device is not supported."""

    devices: dict[str, DeviceSupport]
    missing: str | None = None
    hint: str = ""
    check: Callable[[AttentionCall], str | None] | None = None
    """A last check of the call (a GPU's compute capability, limits that depend on the class
    rows): ``None`` or why not."""
    dropout: bool = False
    """Whether the backend drops attention weights (``dropout_p > 0``)."""


@dataclass(frozen=True)
class Backend:
    """A named implementation of hierarchical attention: ``run(call)`` returns the output,
    shaped like ``call.q``; ``support()`` what it can run (a function: optional imports and the
    Triton interpreter are looked at on first use); ``plan(call)``, when given, builds and caches
    on the layout what ``run`` derives from it on the host, so that ``run`` then does none;
    ``fixed_graph``: whether ``run`` traces to the same operations for every layout, so that a
    compiled model keeps one graph across batches (a backend that loops over groups of segments
    does not)."""

    name: str
    run: Callable[[AttentionCall], torch.Tensor]
    support: Callable[[], Support]
    plan: Callable[[AttentionCall], object] | None = None
    fixed_graph: bool = True

    def unsupported_reason(self, call: AttentionCall) -> str | None:
        return unsupported_reason(self.support(), call)


_DEVICE_NAMES = {"cuda": "CUDA", "cpu": "the CPU"}


def unsupported_reason(support: Support, call: AttentionCall) -> str | None:
    """``None`` when ``support`` covers ``call``, else the first reason it does not."""
    if support.missing:
        return support.missing
    if call.dropout_p and not support.dropout:
        return f"no dropout on the attention weights (asked for dropout_p={call.dropout_p})"
    device = call.q.device.type
    entry = support.devices.get(device, support.devices.get("any"))
    if entry is None:
        wanted = " or ".join(_DEVICE_NAMES.get(d, d) for d in support.devices)
        return f"needs {wanted}; got {device}" + (f" ({support.hint})" if support.hint else "")
    head_dim, (low, high) = call.q.shape[-1], entry.head_dims
    if not low <= head_dim <= high or head_dim % entry.head_dim_multiple:
        multiple = f", a multiple of {entry.head_dim_multiple}" if entry.head_dim_multiple > 1 else ""
        return f"head_dim {head_dim} outside {low}..{high}{multiple} on {device}"
    if call.q.dtype not in entry.dtypes:
        supported = ", ".join(map(str, entry.dtypes)) + (f"; {entry.dtype_note}" if entry.dtype_note else "")
        return f"dtype {call.q.dtype} not supported on {device} (supports {supported})"
    if call.needs_grad and not entry.backward:
        with_backward = [d for d, e in support.devices.items() if e.backward]
        names = " or ".join(_DEVICE_NAMES.get(d, d) for d in with_backward) or "no device"
        return f"backward runs only on {names} (the {device} path is forward-only)"
    return support.check(call) if support.check else None


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` available to :func:`hier_attention` under its name."""
    _BACKENDS[backend.name] = backend
    return backend


def list_backends() -> list[str]:
    """Names of all registered backends (available here or not)."""
    return sorted(_BACKENDS)


def backend_problem(name: str, device_type: str) -> str | None:
    """Why backend ``name`` (or ``"auto"``) cannot run on ``device_type`` here, before any call
    (unknown, an optional import missing, another device), or ``None``."""
    if name == "auto":
        return None
    if name not in _BACKENDS:
        return f"unknown attention backend {name!r}; known: auto, {', '.join(list_backends())}"
    support = _BACKENDS[name].support()
    if support.missing:
        return f"attention backend {name!r} is unavailable here: {support.missing}"
    if device_type not in support.devices and "any" not in support.devices:
        wanted = " or ".join(_DEVICE_NAMES.get(d, d) for d in support.devices)
        hint = f" ({support.hint})" if support.hint else ""
        return f"attention backend {name!r} needs {wanted}; this run is on {device_type}{hint}"
    return None


def available_backends(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, level: str, prefix: int = 1
) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run these inputs (``prefix`` class-token copies per
    segment), else why not."""
    call = _make_call(q, k, v, layout, level, None, prefix)
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
    prefix: int = 1,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Block-diagonal attention over the segments of ``level``.

    Args:
        q, k, v: ``(rows, heads, head_dim)``. The first ``layout.num_tokens`` rows are the packed
            patch tokens in layout order. Optionally ``layout.num_segments(level)`` more rows
            follow: HLIP's class-token copies, ``prefix`` per segment (class token, then
            registers), segment by segment. Every row attends to the patch rows of its own
            segment and to that segment's copies.
            Spare rows may follow the copies, up to one copy per segment of a finer level
            (:meth:`Layout.class_rows_level`): each attends to itself only.
        layout: the batch's layout, on the same device as ``q``.
        level: ``"slice"``, ``"scan"`` or ``"study"``.
        backend: ``"auto"`` or a name from :func:`list_backends`. With ``"auto"`` the
            environment variable ``HLIP_FAST_ATTN_BACKEND``, when set, names the backend.
        scale: softmax scale; ``head_dim ** -0.5`` by default.
        prefix: class-token copies per segment (1 + the model's register tokens).
        dropout_p: dropout on the attention weights, for training (pass 0 in evaluation);
            only the backends that declare it run such a call (``sdpa``, ``reference``).

    Returns:
        The attention output, shaped like ``q``.
    """
    call = _make_call(q, k, v, layout, level, scale, prefix, dropout_p)
    chosen = _choose(call, backend)
    if not torch.compiler.is_compiling():
        logger.debug("hier_attention level=%s rows=%d backend=%s", level, q.shape[0], chosen.name)
    return chosen.run(call)


def plan_attention(
    layout: Layout,
    level: str,
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    class_tokens: bool | str = True,
    requires_grad: bool = False,
    backend: str = "auto",
    fixed_graph: bool = False,
    prefix: int = 1,
) -> str:
    """Choose the backend for such a call and build its plan now, on the host, so that
    :func:`hier_attention` with the returned name does no host work on these inputs: what lets a
    compiled model trace it without a graph break. ``class_tokens``: one copy per segment of
    ``level``, or of the finer level it names (spare rows), or none; ``prefix`` copies per
    segment. With ``fixed_graph``,
    ``"auto"`` prefers the backends that trace to one graph for every layout (see :class:`Backend`)."""
    rows = layout.num_rows(level, class_tokens, prefix)
    # A stand-in with the inputs' shape, dtype and device that owns no memory.
    stand_in = torch.empty((), dtype=dtype, device=layout.device, requires_grad=requires_grad)
    stand_in = stand_in.expand(rows, heads, head_dim)
    call = _make_call(stand_in, stand_in, stand_in, layout, level, None, prefix)
    chosen = _choose(call, backend, fixed_graph)
    if chosen.plan is not None:
        chosen.plan(call)
    return chosen.name


def select_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    level: str,
    backend: str = "auto",
    prefix: int = 1,
) -> str:
    """The name of the backend :func:`hier_attention` would run for these arguments."""
    return _choose(_make_call(q, k, v, layout, level, None, prefix), backend).name


def _make_call(
    q, k, v, layout: Layout, level: str, scale: float | None, prefix: int = 1, dropout_p: float = 0.0
) -> AttentionCall:
    check_level(level)
    if prefix < 1:
        raise ValueError(f"prefix must be >= 1 (class-token copies per segment), got {prefix}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
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
    return AttentionCall(
        q=q,
        k=k,
        v=v,
        layout=layout,
        level=level,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        class_rows_level=layout.class_rows_level(level, q.shape[0], prefix),
        prefix=prefix,
        dropout_p=float(dropout_p),
    )


def _choose(call: AttentionCall, backend: str, fixed_graph: bool = False) -> Backend:
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; known: {list_backends()}")
        reason = _BACKENDS[backend].unsupported_reason(call)
        if reason is not None:
            raise RuntimeError(f"attention backend {backend!r} cannot run this call: {reason}")
        return _BACKENDS[backend]
    # The ranking depends on the call's kind only: cached per layout, every block of a step shares it.
    q = call.q
    kind = (
        call.level,
        call.class_rows_level,
        call.prefix,
        q.dtype,
        q.shape[-1],
        q.device.type,
        call.needs_grad,
        call.dropout_p > 0,
        fixed_graph,
    )
    return _BACKENDS[call.layout.cached(("auto_backend", *kind), lambda: _rank(call, fixed_graph).name)]


def _rank(call: AttentionCall, fixed_graph: bool) -> Backend:
    """The first backend of the measured ranking that supports ``call``; with ``fixed_graph``,
    those that trace to one graph for every layout come first (unmeasured: in ``FIXED_GRAPH_ORDER``)."""
    names = ranked_backends(call)
    if fixed_graph:
        fixed = [n for n in names + FIXED_GRAPH_ORDER if n in _BACKENDS and _BACKENDS[n].fixed_graph]
        names = (*fixed, *names)
    for name in names:
        if name in _BACKENDS and _BACKENDS[name].unsupported_reason(call) is None:
            return _BACKENDS[name]
    reasons = "\n".join(
        f"  {name}: {b.unsupported_reason(call) or 'not ranked for this call'}"
        for name, b in sorted(_BACKENDS.items())
    )
    raise RuntimeError(f"no attention backend supports this call:\n{reasons}")
