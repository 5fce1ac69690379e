"""Hierarchical attention: the operation, its reference definition and its backends."""

from . import flex, reference, sdpa, triton_backend
from .dispatch import (
    AUTO_ORDER,
    ENV_BACKEND,
    AttentionCall,
    Backend,
    available_backends,
    hier_attention,
    list_backends,
    register_backend,
    select_backend,
)

for _module in (reference, sdpa, flex, triton_backend):
    register_backend(_module.backend)

__all__ = [
    "AUTO_ORDER",
    "ENV_BACKEND",
    "AttentionCall",
    "Backend",
    "available_backends",
    "hier_attention",
    "list_backends",
    "register_backend",
    "select_backend",
]
