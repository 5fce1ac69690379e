"""Hierarchical attention: the operation, its reference definition and its backends."""

from . import flex, reference, sdpa, triton_backend, varlen
from .dispatch import (
    ENV_BACKEND,
    AttentionCall,
    Backend,
    available_backends,
    hier_attention,
    list_backends,
    plan_attention,
    register_backend,
    select_backend,
)

for _backend in (
    reference.backend,
    sdpa.backend,
    flex.backend,
    triton_backend.backend,
    varlen.flash_backend,
    varlen.torch_varlen_backend,
    varlen.xformers_backend,
):
    register_backend(_backend)

__all__ = [
    "ENV_BACKEND",
    "AttentionCall",
    "Backend",
    "available_backends",
    "hier_attention",
    "list_backends",
    "plan_attention",
    "register_backend",
    "select_backend",
]
