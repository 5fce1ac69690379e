"""CPU-side costs under pytest-benchmark: layout building and a small encoder step, packed vs padded.

pytest bench --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from common import REPO  # noqa: F401  (puts tests/ on the path for padded_hlip)
from encoder_cpu import packed_step, padded_step, ragged_mix
from padded_hlip import PaddedHLIP

from hlip_fast import Layout, create_model

pytest.importorskip("pytest_benchmark")


def brain_mri_grids(studies: int) -> tuple[list[tuple[int, int, int]], list[int]]:
    depths = ragged_mix(torch.Generator().manual_seed(0), studies)
    grids = [(-(-d // 8), 14, 14) for study in depths for d in study]
    return grids, [len(s) for s in depths]


@pytest.mark.parametrize("studies", [8, 64])
def test_layout_build(benchmark, studies):
    grids, scans = brain_mri_grids(studies)
    benchmark(Layout.build, grids, scans)


@pytest.mark.parametrize("studies", [8, 64])
def test_layout_build_and_kernel_schedules(benchmark, studies):
    """What a training step spends on the host before the Triton kernels run: the layout and
    the tile schedules of its three levels (both item heights tried, as the backend does)."""
    from hlip_fast.kernels.tile_schedule import best_schedule

    grids, scans = brain_mri_grids(studies)

    def build():
        layout = Layout.build(grids, scans)
        for level in ("slice", "scan", "study"):
            best_schedule(layout, level, True, (64, 128))

    benchmark(build)


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
