"""Reordering packed rows by a permutation, with the inverse permutation as its backward.

The gathering backends (``sdpa``, ``flash``, ``torch_varlen``, ``xformers``) put every row in a
new order and the output back. ``index_select``'s own backward cannot know its indices form a
permutation: it zero-fills a tensor and scatter-adds into it. Here the backward is one more
gather, by the inverse permutation: no fill, no atomic adds.
"""

from __future__ import annotations

import torch


class _PermuteRows(torch.autograd.Function):
    # forward(ctx, ...), not setup_context: Function.apply then skips inspecting signatures,
    # which costs more than the gather on small inputs.
    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None  # differentiable again: index_select's


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[order]`` where ``order`` is a permutation of ``x``'s rows and ``inverse`` its inverse
    (``order[inverse] == arange``); differentiable any number of times."""
    return _PermuteRows.apply(x, order, inverse)
