"""CPU-side costs under pytest-benchmark: layout building and a small encoder step, packed vs padded.

pytest bench --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from encoder_cpu import packed_step, padded_step, ragged_mix
from layout_host import brain_mri_grids, build_with_schedules

from hlip_fast import Layout, create_model
from hlip_fast.padded_hlip import PaddedHLIP

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("studies", [8, 64])
def test_layout_build(benchmark, studies):
    grids, scans = brain_mri_grids(studies)
    benchmark(Layout.build, grids, scans)


@pytest.mark.parametrize("studies", [8, 64])
def test_layout_build_and_kernel_schedules(benchmark, studies):
    """What a training step spends on the host before the Triton kernels run: the layout and
    the tile schedules of its three levels (both item heights weighed, as the backend does)."""
    grids, scans = brain_mri_grids(studies)
    benchmark(build_with_schedules, grids, scans)


@pytest.fixture(scope="module")
def small_models():
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny_multiscan_h2", img_size=(32, 64, 64), patch_size=(8, 16, 16), max_num_scans=40
    ).train()
    return model, PaddedHLIP.from_encoder(model).train()


def test_step_packed_ragged(benchmark, small_models):
    model, _ = small_models
    depths = ragged_mix(torch.Generator().manual_seed(0), 2)
    step, _ = packed_step(model, depths, 64, torch.Generator().manual_seed(1))
    benchmark(step)


def test_step_padded_ragged(benchmark, small_models):
    _, padded = small_models
    depths = ragged_mix(torch.Generator().manual_seed(0), 2)
    step, _ = padded_step(padded, depths, 32, 12, 64, torch.Generator().manual_seed(1))
    benchmark(step)
