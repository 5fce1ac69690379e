"""Shared fixtures: fresh random ragged layouts, reproducible through HLIP_FAST_TEST_SEED."""

from __future__ import annotations

import os
import secrets

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Run hlip_fast's Triton kernels on CPU tensors. Must precede the kernels' import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (fixed by HLIP_FAST_TEST_SEED); printed when the test fails."""
    value = int(os.environ.get("HLIP_FAST_TEST_SEED", secrets.randbits(31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"HLIP_FAST_TEST_SEED={value}")
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)
