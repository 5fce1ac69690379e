"""Every backend against the reference definition, forward and backward, plus the dispatcher."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import random_layout, random_rows

from hlip_fast import LEVELS, Layout, hier_attention, list_backends
from hlip_fast.attention import available_backends, select_backend
from hlip_fast.attention.dispatch import _make_call

FAST_BACKENDS = [b for b in list_backends() if b != "reference"]
# Per dtype: (rtol, atol) against a float64 reference.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 2e-2),
}
EDGE_LAYOUT = dict(
    # Segment lengths 1, 7 and 196 side by side, plus an uneven multi-scan study.
    grids=[(1, 1, 1), (1, 1, 7), (1, 14, 14), (3, 2, 5), (2, 1, 3), (4, 1, 1)],
    scans_per_study=[1, 1, 1, 3],
)


def run_backend(backend, q, k, v, layout, level, grad_out, prefix=1):
    q, k, v = (t.detach().requires_grad_(grad_out is not None) for t in (q, k, v))
    out = hier_attention(q, k, v, layout, level, backend=backend, prefix=prefix)
    if grad_out is None:
        return out.detach(), None
    out.backward(grad_out)
    return out.detach(), tuple(t.grad for t in (q, k, v))


def runnable(backend, q, k, v, layout, level, prefix=1) -> tuple[bool, bool]:
    """Whether ``backend`` runs these inputs forward here (else the test skips, saying why) and
    whether it also runs backward."""
    with torch.no_grad():
        reason = available_backends(q, k, v, layout, level, prefix)[backend]
    if reason is not None:
        pytest.skip(f"{backend} unavailable here: {reason}")
    grads = [t.detach().requires_grad_() for t in (q, k, v)]
    return True, available_backends(*grads, layout, level, prefix)[backend] is None


def check_against_reference(
    backend, layout, level, class_tokens, dtype, device="cpu", tolerance=None, dim=16, prefix=1
):
    q, k, v = random_rows(layout, level, class_tokens, dim=dim, prefix=prefix)
    grad_out = torch.randn_like(q)
    expected, expected_grads = run_backend("reference", q, k, v, layout, level, grad_out, prefix)
    layout = layout.to(device)
    cast = [t.to(device, dtype) for t in (q, k, v)]
    _, with_grad = runnable(backend, *cast, layout, level, prefix)
    grad = grad_out.to(device, dtype) if with_grad else None
    out, grads = run_backend(backend, *cast, layout, level, grad, prefix)
    rtol, atol = tolerance or TOLERANCE[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=rtol, atol=atol)
    if with_grad:
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("class_tokens", [False, True, "slice"])  # "slice": spare rows at coarser levels
def test_backend_matches_reference_fp32(backend, level, class_tokens, rng):
    for _ in range(3):
        layout = random_layout(rng)
        check_against_reference(backend, layout, level, class_tokens, torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("class_tokens", [True, "slice"])
def test_backend_matches_reference_with_register_tokens(backend, level, class_tokens, rng):
    """Three prefix tokens (class + 2 registers) per segment, spare ones at coarser levels."""
    for _ in range(2):
        check_against_reference(backend, random_layout(rng), level, class_tokens, torch.float32, prefix=3)


def test_reference_with_register_tokens_is_masked_dense_attention(rng):
    """The reference with ``prefix`` copies per segment equals dense softmax attention under the
    mask "same segment", the copies of segment ``s`` being rows ``N + s·prefix`` onwards."""
    layout = random_layout(rng)
    n = layout.num_tokens
    for level in LEVELS:
        q, k, v = random_rows(layout, level, "slice", prefix=2)
        segment = torch.full((q.shape[0],), -1, dtype=torch.int64)
        cu = layout.level(level).cu_seqlens.tolist()
        for s, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            segment[a:b] = s
            segment[n + 2 * s : n + 2 * s + 2] = s
        spare = segment == -1
        segment[spare] = -2 - torch.arange(int(spare.sum()))  # each spare row alone
        scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        out = hier_attention(q, k, v, layout, level, backend="reference", prefix=2)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_backend_matches_reference_on_edge_lengths(backend, level, seed):
    layout = Layout.build(**EDGE_LAYOUT)
    check_against_reference(backend, layout, level, True, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
def test_sdpa_half_precision(dtype, level, rng):
    check_against_reference("sdpa", random_layout(rng), level, True, dtype)


def test_reference_attends_only_inside_segments(rng):
    """Changing one segment's keys and values changes no other segment's output."""
    layout = random_layout(rng, max_studies=3)
    for level in LEVELS:
        q, k, v = random_rows(layout, level, class_tokens=True)
        base = hier_attention(q, k, v, layout, level, backend="reference")
        ids = layout.segment_ids(level, class_tokens=True)
        target = int(ids[torch.randint(len(ids), ())])
        inside = ids == target
        k2, v2 = k.clone(), v.clone()
        k2[inside] += 1.0
        v2[inside] -= 2.0
        changed = hier_attention(q, k2, v2, layout, level, backend="reference")
        torch.testing.assert_close(changed[~inside], base[~inside], rtol=0, atol=0)
        assert not torch.allclose(changed[inside], base[inside])


def test_single_segment_equals_dense_attention(seed):
    layout = Layout.build([(2, 3, 3)], [1])
    q, k, v = random_rows(layout, "study", class_tokens=False, dtype=torch.float32)
    dense = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5, -1)
    expected = torch.einsum("hqk,khd->qhd", dense, v)
    with torch.no_grad():
        reasons = available_backends(q, k, v, layout, "study")
    for backend in [b for b, reason in reasons.items() if reason is None]:
        out = hier_attention(q, k, v, layout, "study", backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("class_tokens", [True, "slice"])
def test_gradcheck(backend, class_tokens, seed):
    layout = Layout.build([(2, 1, 2), (1, 1, 3), (1, 2, 1)], [2, 1])
    for level in LEVELS:
        q, k, v = random_rows(layout, level, class_tokens, heads=1, dim=3, requires_grad=True)
        fn = lambda q, k, v: hier_attention(q, k, v, layout, level, backend=backend)  # noqa: B023
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_permute_rows_is_a_gather_whose_backward_gathers_by_the_inverse(seed):
    from hlip_fast.attention.permutation import permute_rows

    order = torch.randperm(7)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(7)
    x = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(permute_rows(x, order, inverse), x[order])
    fn = lambda t: permute_rows(t, order, inverse)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,)) and torch.autograd.gradgradcheck(fn, (x,))


def test_spare_rows_attend_to_themselves_and_change_nothing_else(rng):
    """With the class rows of a finer level, the rows before the spare ones are the call
    without them, bit for bit; each spare row's output is its value row."""
    # Every scan at least two slices deep, a slice per depth-row: more slices than scans or studies.
    scans = rng.integers(1, 4, size=rng.integers(1, 4))
    depths, sides = rng.integers(2, 5, size=(scans.sum(), 1)), rng.integers(1, 5, size=(scans.sum(), 2))
    layout = Layout.build(np.concatenate([depths, sides], axis=1), scans.tolist(), slice_depth=1)
    for level in ("scan", "study"):
        q, k, v = random_rows(layout, level, "slice")
        rows = layout.num_rows(level, True)
        assert q.shape[0] > rows
        for backend in ("reference", "sdpa"):
            out = hier_attention(q, k, v, layout, level, backend=backend)
            alone = hier_attention(q[:rows], k[:rows], v[:rows], layout, level, backend=backend)
            torch.testing.assert_close(out[:rows], alone, rtol=0, atol=0)
            torch.testing.assert_close(out[rows:], v[rows:], rtol=0, atol=0)


def test_class_rows_of_a_coarser_level_are_refused(rng):
    layout = Layout.build([(2, 1, 2), (1, 1, 3)], [2])
    q, k, v = random_rows(layout, "slice", "scan")
    with pytest.raises(ValueError, match=r"slice or a finer level: 10 \(slice\)"):
        hier_attention(q, k, v, layout, "slice")


def test_non_contiguous_inputs(rng):
    layout = random_layout(rng)
    rows = layout.num_tokens + layout.num_segments("scan")
    qkv = torch.randn(rows, 3, 2, 16, dtype=torch.float64)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    expected = hier_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), layout, "scan", backend="reference"
    )
    strided = qkv.float().unbind(1)  # fast backends in float32, still non-contiguous
    reasons = available_backends(*strided, layout, "scan")
    for backend in [b for b in FAST_BACKENDS if reasons[b] is None]:
        out = hier_attention(*strided, layout, "scan", backend=backend)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_custom_scale(rng):
    layout = random_layout(rng)
    q, k, v = random_rows(layout, "scan", class_tokens=True)
    expected = hier_attention(q * 0.5, k, v, layout, "scan", backend="reference", scale=16**-0.5)
    out = hier_attention(q, k, v, layout, "scan", backend="sdpa", scale=0.5 * 16**-0.5)
    torch.testing.assert_close(out, expected)


def backends_logged(caplog) -> list[str]:
    """Backends the dispatcher reported running, in order."""
    records = [r for r in caplog.records if r.name == "hlip_fast.attention.dispatch"]
    return [r.getMessage().split("backend=")[1] for r in records]


def test_env_variable_forces_backend(monkeypatch, caplog, rng):
    layout = random_layout(rng)
    q, k, v = random_rows(layout, "slice", class_tokens=True, dtype=torch.float32)
    monkeypatch.setenv("HLIP_FAST_ATTN_BACKEND", "flex")
    with caplog.at_level(logging.DEBUG, logger="hlip_fast.attention.dispatch"):
        hier_attention(q, k, v, layout, "slice")
        hier_attention(q, k, v, layout, "slice", backend="sdpa")  # an explicit name wins
    assert backends_logged(caplog) == ["flex", "sdpa"]


def test_auto_picks_sdpa_on_cpu(caplog, rng):
    layout = random_layout(rng)
    q, k, v = random_rows(layout, "scan", class_tokens=False)
    with caplog.at_level(logging.DEBUG, logger="hlip_fast.attention.dispatch"):
        hier_attention(q, k, v, layout, "scan")
    assert backends_logged(caplog) == ["sdpa"]
    assert select_backend(q, k, v, layout, "scan") == "sdpa"


def test_forced_backend_that_cannot_run_says_why(rng):
    layout = random_layout(rng)
    q, k, v = random_rows(layout, "scan", class_tokens=False, requires_grad=True)
    with pytest.raises(RuntimeError, match="'flex' cannot run this call: backward runs only on CUDA"):
        hier_attention(q, k, v, layout, "scan", backend="flex")


def test_no_backend_fits_lists_every_reason():
    layout = Layout.build([(1, 2, 2)], [1])
    q = torch.zeros(4, 1, 4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="no attention backend") as err:
        hier_attention(q, q, q, layout, "scan")
    for name in list_backends():
        assert f"  {name}: " in str(err.value)
    reasons = available_backends(q, q, q, layout, "scan")
    assert set(reasons) == set(list_backends()) and all(reasons.values())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda q: (q[:-1], q[:-1], q[:-1], "scan", "sdpa"), "has 3 rows"),
        (lambda q: (q, q, q[:, :, :2], "scan", "sdpa"), "share one shape"),
        (lambda q: (q, q, q.float(), "scan", "sdpa"), "one dtype"),
        (lambda q: (q, q, q, "series", "sdpa"), "unknown attention level"),
        (lambda q: (q, q, q, "scan", "magic"), "unknown attention backend 'magic'"),
    ],
)
def test_bad_calls_get_clear_errors(make, message):
    layout = Layout.build([(1, 2, 2)], [1])
    q = torch.zeros(4, 1, 4, dtype=torch.float64)
    *args, level, backend = make(q)
    with pytest.raises(ValueError, match=message):
        hier_attention(*args, layout, level, backend=backend)


def test_layout_on_another_device_is_refused():
    layout = Layout.build([(1, 2, 2)], [1]).to("meta")
    q = torch.zeros(4, 1, 4)
    with pytest.raises(ValueError, match="batch.to"):
        hier_attention(q, q, q, layout, "scan")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("class_tokens", [True, "slice"])
def test_backend_matches_reference_cuda(backend, dtype, level, class_tokens, rng):
    layout = random_layout(rng, max_side=16)
    tolerance = (1e-3, 1e-3) if dtype == torch.float32 else None  # tf32 allowed on the GPU
    # Head dim 64, HLIP's: every GPU backend serves it (the triton kernels from 32).
    check_against_reference(
        backend, layout, level, class_tokens, dtype, device="cuda", tolerance=tolerance, dim=64
    )


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("class_tokens", [False, True, "slice"])
@pytest.mark.parametrize("prefix", [1, 2])
def test_varlen_plan_makes_segments_contiguous(level, class_tokens, prefix, rng):
    """The gather plan of the flash/torch_varlen/xformers backends, checked on the CPU with a
    plain per-segment attention standing in for their CUDA kernels."""
    from hlip_fast.attention.varlen import run_varlen

    def contiguous_attention(q, k, v, plan, scale):
        cu = plan.cu_seqlens.tolist()
        assert cu[-1] == q.shape[0] and max(b - a for a, b in zip(cu[:-1], cu[1:])) == plan.max_seqlen
        parts = []
        for a, b in zip(cu[:-1], cu[1:]):
            weights = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale, -1)
            parts.append(torch.einsum("hqk,khd->qhd", weights, v[a:b]))
        return torch.cat(parts)

    layout = random_layout(rng)
    q, k, v = random_rows(layout, level, class_tokens, prefix=prefix)
    out = run_varlen(_make_call(q, k, v, layout, level, None, prefix), contiguous_attention)
    expected = hier_attention(q, k, v, layout, level, backend="reference", prefix=prefix)
    torch.testing.assert_close(out, expected)


def test_auto_follows_the_measured_table(caplog, rng):
    """A table entry ranks backends for its device type, dtype, head dim and segment length."""
    from hlip_fast.attention import auto

    table = (
        {"device_type": "cpu", "dtype": "float32", "head_dim": 16, "seqlen": 8, "ranking": ["flex", "sdpa"]},
        {"device_type": "cpu", "dtype": "float32", "head_dim": 16, "seqlen": 4096, "ranking": ["reference"]},
        {"device_type": "cuda", "dtype": "float32", "head_dim": 16, "seqlen": 8, "ranking": ["triton"]},
    )
    layout = Layout.build([(1, 2, 2), (1, 1, 3)], [1, 1])
    q, k, v = random_rows(layout, "scan", True, dtype=torch.float32)
    call = _make_call(q, k, v, layout, "scan", None)
    assert auto.ranked_backends(call, table) == ("flex", "sdpa", "sdpa")
    assert auto.ranked_backends(
        _make_call(q.double(), k.double(), v.double(), layout, "scan", None), table
    ) == ("sdpa",)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auto, "load_table", lambda: table)
        assert select_backend(q, k, v, layout, "scan") == "flex"  # forward: ranked first
        grads = [t.requires_grad_() for t in (q, k, v)]
        assert select_backend(*grads, layout, "scan") == "sdpa"  # flex has no CPU backward


def test_backend_support_is_data_checked_in_one_place():
    from hlip_fast.attention.dispatch import AttentionCall, DeviceSupport, Support, unsupported_reason

    layout = Layout.build([(1, 2, 2)], [1])

    def call(dim=16, dtype=torch.float32, grad=False):
        q = torch.zeros(4, 1, dim, dtype=dtype, requires_grad=grad)
        return AttentionCall(q, q, q, layout, "scan", 1.0, False)

    support = Support(
        {"cpu": DeviceSupport((torch.float32,), head_dims=(8, 64), head_dim_multiple=8, backward=False)}
    )
    assert unsupported_reason(support, call()) is None
    assert unsupported_reason(support, call(dim=12)) == "head_dim 12 outside 8..64, a multiple of 8 on cpu"
    assert "dtype torch.float16 not supported on cpu" in unsupported_reason(
        support, call(dtype=torch.float16)
    )
    assert unsupported_reason(support, call(grad=True)).startswith("backward runs only on no device")
    cuda_only = Support({"cuda": DeviceSupport((torch.float32,))}, hint="try the interpreter")
    assert unsupported_reason(cuda_only, call()) == "needs CUDA; got cpu (try the interpreter)"
    assert unsupported_reason(
        Support({"any": DeviceSupport((torch.float32,))}, missing="no module"), call()
    ) == ("no module")


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_attention_dropout_keeps_the_mean_and_is_refused_where_not_served(backend, rng):
    """Dropout on the attention weights, a training option: each call draws its own mask, and
    the draws average to the output without dropout; backends without it refuse the call."""
    layout = random_layout(rng)
    q, k, v = random_rows(layout, "scan", True)
    plain = hier_attention(q, k, v, layout, "scan", backend=backend)
    draws = torch.stack(
        [hier_attention(q, k, v, layout, "scan", backend=backend, dropout_p=0.25) for _ in range(600)]
    )
    assert not torch.equal(draws[0], draws[1])
    assert ((draws.mean(0) - plain).abs().mean() / plain.abs().mean()) < 0.1
    with pytest.raises(RuntimeError, match="no dropout on the attention weights"):
        hier_attention(q, k, v, layout, "scan", backend="flex", dropout_p=0.25)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        hier_attention(q, k, v, layout, "scan", dropout_p=1.0)
