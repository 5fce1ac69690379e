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


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> tuple[str, list[str]]:
    """A tiny random BERT with a WordPiece vocabulary trained on synthetic reports (local folder),
    and those reports."""
    from dataclasses import replace

    from hlip_fast.data.synth import SIZES, make_study
    from hlip_fast.text import build_tiny_text_model

    config = replace(SIZES["tiny"], num_studies=30)
    reports = [make_study(config, i)[0].report for i in range(30)]
    return str(build_tiny_text_model(tmp_path_factory.mktemp("bert"), reports)), reports
