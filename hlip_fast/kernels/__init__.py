"""Triton kernels for hierarchical attention (``hier_attention.py``: forward and both backward
kernels, their launch wrappers and configs) and the tile schedule they execute
(``tile_schedule.py``, NumPy only). No model code: ``hlip_fast.attention.triton_backend`` serves
them as the ``triton`` backend.
"""
