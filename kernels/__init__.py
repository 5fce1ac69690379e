"""Triton kernels for hierarchical attention, installed as ``hlip_fast.kernels``.

Kernels and their launch wrappers only; no model code. The block-sparse flash-attention kernel
arrives with the kernels issue and registers itself as the ``triton`` backend.
"""
