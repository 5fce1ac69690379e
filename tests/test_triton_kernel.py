"""hlip_fast's Triton kernel: custom-op registration, dtypes, head dims and edge cases.

On the CPU it runs under ``TRITON_INTERPRET=1`` (set in conftest.py) with small shapes; the
shared backend-vs-reference tests in test_attention.py cover it too.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import random_layout, random_rows

from hlip_fast import Layout, hier_attention
from hlip_fast.attention import available_backends

pytest.importorskip("triton")
from hlip_fast.attention import triton_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# What the kernels serve here: fp32 from head dim 16 under the interpreter; on a GPU fp16/bf16
# from head dim 32 (hlip_fast.kernels.configs), where fp16 is checked to its tolerance.
DTYPE, DIM, TOLERANCE = (torch.float32, 16, 1e-5) if DEVICE == "cpu" else (torch.float16, 32, 1e-2)


def test_runs_under_the_expected_triton():
    """.ci/run runs this file a second time under the GPU image's triton (3.6) and says so with
    HLIP_FAST_EXPECT_TRITON: that run must really import that version."""
    import triton

    expected = os.environ.get("HLIP_FAST_EXPECT_TRITON", "")
    assert triton.__version__.startswith(expected), (triton.__version__, expected)


def op_inputs(layout: Layout, level: str, class_tokens: bool | str, dim=DIM, dtype=DTYPE) -> tuple:
    """The custom op's arguments: q, k, v, the layout's (cu, items, class rows, spare rows, item
    height, length bucket) and the scale; ``class_tokens`` as ``random_rows`` takes it."""
    q, k, v = (
        t.to(DEVICE, dtype).requires_grad_() for t in random_rows(layout, level, class_tokens, dim=dim)
    )
    spare = q.shape[0] - layout.num_rows(level, bool(class_tokens))
    layout = layout.to(DEVICE)
    schedule = triton_backend.schedule_inputs(layout, level, bool(class_tokens), q.device, spare)
    return (q, k, v, *schedule, dim**-0.5)


@pytest.mark.parametrize("class_tokens", [True, "slice"])
def test_custom_op_passes_opcheck(class_tokens, rng):
    """Fake (meta) implementation, schema and autograd registration agree with the kernel."""
    layout = Layout.build([(1, 2, 3), (2, 1, 5)], [1, 1])
    torch.library.opcheck(
        triton_backend.hier_attn_fwd,
        op_inputs(layout, "scan", class_tokens),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_composes_with_torch_compile(rng):
    layout = random_layout(rng, max_studies=2, max_scans=2).to(DEVICE)
    q, k, v = (t.to(DEVICE, DTYPE) for t in random_rows(layout.to("cpu"), "study", True, dim=DIM))

    def attend(q, k, v):
        return hier_attention(q, k, v, layout, "study", backend="triton")

    expected = attend(q, k, v)  # eager first: fills the layout's per-level cache, as a step does
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    torch.testing.assert_close(compiled(q, k, v), expected)


@pytest.mark.parametrize("dim", [48, 80, 96])
def test_head_dims_that_are_not_powers_of_two(dim, rng):
    layout = Layout.build([(1, 3, 5), (2, 2, 2)], [2])
    q, k, v = random_rows(layout, "scan", True, heads=1, dim=dim)
    grad = torch.randn_like(q)
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = hier_attention(*refs, layout, "scan", backend="reference")
    expected.backward(grad)
    mine = [t.to(DEVICE, DTYPE).requires_grad_() for t in (q, k, v)]
    out = hier_attention(*mine, layout.to(DEVICE), "scan", backend="triton")
    out.backward(grad.to(DEVICE, DTYPE))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=TOLERANCE, atol=TOLERANCE)
    for got, want in zip(mine, refs):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU, autotune_configs chooses the split")
@pytest.mark.parametrize("part_m", [0, 4, 8])
def test_items_run_whole_or_in_parts_give_the_same_attention(part_m, monkeypatch, rng):
    """Every kernel run with one program per item, or several programs per item (some parts of
    a short item then hold no row), against the reference, forward and backward."""
    from hlip_fast.kernels import hier_attention as kernels
    from hlip_fast.kernels.configs import KernelConfig

    config = KernelConfig(block_n=16, num_warps=1, num_stages=1, part_m=part_m)
    monkeypatch.setattr(kernels, "INTERPRETER_CONFIGS", dict.fromkeys(kernels.KERNEL_FUNCTIONS, config))
    layout = random_layout(rng, max_studies=2, max_scans=3)
    for level in ("slice", "study"):
        q, k, v = random_rows(layout, level, True)
        grad = torch.randn_like(q)
        refs = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = hier_attention(*refs, layout, level, backend="reference")
        expected.backward(grad)
        mine = [t.float().requires_grad_() for t in (q, k, v)]
        out = hier_attention(*mine, layout, level, backend="triton")
        out.backward(grad.float())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(mine, refs):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_float16(rng):
    layout = random_layout(rng, max_studies=2)
    q, k, v = random_rows(layout, "study", True, dim=DIM)
    expected = hier_attention(q, k, v, layout, "study", backend="reference")
    half = [t.to(DEVICE, torch.float16) for t in (q, k, v)]
    out = hier_attention(*half, layout.to(DEVICE), "study", backend="triton")
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-2, atol=1e-2)


def test_unsupported_inputs_say_why():
    layout = Layout.build([(1, 2, 2)], [1])
    q = torch.zeros(4, 1, 8)
    assert "head_dim 8 outside" in available_backends(q, q, q, layout, "scan")["triton"]
    q = torch.zeros(4, 1, 32, dtype=torch.float64)
    assert "float64" in available_backends(q, q, q, layout, "scan")["triton"]
    if DEVICE == "cuda":
        q = torch.zeros(4, 1, 32, device=DEVICE)
        assert "float32 builds spill" in available_backends(q, q, q, layout.to(DEVICE), "scan")["triton"]
    else:
        q = torch.zeros(4, 1, 16, dtype=torch.bfloat16)
        assert "bfloat16" in available_backends(q, q, q, layout, "scan")["triton"]
