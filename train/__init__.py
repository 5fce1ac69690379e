"""The lean distributed trainer, installed as ``hlip_fast.train`` (``hlip-train``).

Arrives with the trainer issue.
"""
