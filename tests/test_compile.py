"""``torch.compile`` over the whole encoder and the text tower: no graph break, the numbers of
eager mode, and a stated number of graphs for two different ragged layouts.

``fullgraph=True`` makes any graph break raise. ``aot_eager`` traces forward and backward as
inductor would, without building C++ kernels (slow on this CPU).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from hlip_fast import create_model, pack_studies
from hlip_fast.text import TextConfig, TextTower

# Scans' depths per study (tiny model: 16 tokens a depth-row, 4 rows a patch). The two layouts
# differ in every size and share none by chance, so duck sizing adds no guard that the second
# fails (two equal sizes in the first batch would cost one more graph, once).
LAYOUTS = ([[16, 8, 4], [12]], [[8], [4, 12], [16, 8]])
GRAPHS = {"triton": 1, "sdpa": 2}
"""Graphs for the two layouts: the custom op is one call per level for any layout; sdpa makes one
call per group of equal-length segments, so a layout with other groups is another graph."""


def forward_backward(model, batch, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)  # patch dropout, stochastic depth and scan positions draw the same
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.square().sum().backward()
    return out.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize(("backend", "checkpointing"), [("triton", False), ("sdpa", True)])
def test_the_compiled_encoder_has_no_graph_break_and_equals_eager(backend, checkpointing, seed):
    if backend == "triton":
        pytest.importorskip("triton")
    model = create_model("vit_tiny_multiscan_h3", drop_path_rate=0.1, patch_dropout=0.25).train()
    model.set_attention_backend(backend)
    model.set_grad_checkpointing(checkpointing)
    patch = model.config.patch_size
    batches = [
        pack_studies([[torch.randn(1, d, 32, 32) for d in s] for s in layout], patch) for layout in LAYOUTS
    ]
    expected = [forward_backward(model, batch, seed) for batch in batches]

    torch._dynamo.reset()
    counters.clear()
    model.compile(backend="aot_eager", fullgraph=True, dynamic=True)
    for batch, (want_out, want_grads) in zip(batches, expected):
        out, grads = forward_backward(model, batch, seed)
        torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == GRAPHS[backend]
    assert not counters["graph_break"]


def test_auto_prefers_a_backend_with_one_graph_when_compiled():
    """Eager, ``auto`` runs sdpa on the CPU; compiled, the Triton op (here interpreted) first."""
    pytest.importorskip("triton")
    model = create_model("vit_tiny_multiscan_h2")
    batch = pack_studies([[torch.randn(1, 8, 32, 32)], [torch.randn(1, 4, 32, 32)]], model.config.patch_size)
    assert set(model._plan(batch.layout)) == {"sdpa"}
    model.compile(backend="aot_eager", fullgraph=True, dynamic=True)
    assert set(model._plan(batch.layout)) == {"triton"}


def test_the_compiled_text_tower_has_no_graph_break_and_equals_eager(tiny_text):
    path, reports = tiny_text
    tower = TextTower(TextConfig(path, lock=False), 16).train()
    batches = [tower.tokenize(reports[:3]), tower.tokenize(reports[3:8])]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]

    def forward_backward_text(tokens):
        torch.manual_seed(0)  # dropout
        tower.zero_grad(set_to_none=True)
        out = tower(tokens)
        out.square().sum().backward()
        return out.detach(), [p.grad for p in tower.parameters()]

    expected = [forward_backward_text(tokens) for tokens in batches]
    torch._dynamo.reset()
    counters.clear()
    tower.compile(backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens, (want_out, want_grads) in zip(batches, expected):
        out, grads = forward_backward_text(tokens)
        torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
