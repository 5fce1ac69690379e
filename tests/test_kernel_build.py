"""The kernels' launch configs and their build without a GPU: ``autotune_configs`` answers for any
architecture, refuses what the kernels do not serve, and every config it offers builds without a
register spill within shared memory (``bench/kernel_build.py --check``, compiled for sm_80 to
sm_100a by the running triton)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hlip_fast import Layout
from hlip_fast.attention.dispatch import AttentionCall, DeviceSupport, Support, unsupported_reason
from hlip_fast.attention.triton_backend import gpu_support, unclaimed_reason
from hlip_fast.kernels import configs

triton = pytest.importorskip("triton")
from hlip_fast.kernels.build import _ptxas_numbers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _kernel_build(flag: str, timeout: int) -> subprocess.CompletedProcess:
    """``bench/kernel_build.py FLAG`` in this process's environment without ``TRITON_INTERPRET``
    (interpreted kernels do not compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "bench/kernel_build.py", flag]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_offered_build_is_spill_free_and_fits_shared_memory():
    """The CI gate, under the triton this process imports (.ci/run runs it under 3.6 too)."""
    done = _kernel_build("--check", timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"(triton {triton.__version__})" in done.stdout
    assert ", 0 spill or overflow shared memory" in done.stdout


@pytest.mark.parametrize("arch", configs.CLAIMED)
def test_configs_are_offered_for_every_served_case(arch):
    capability = configs.ARCHITECTURES[arch].capability
    for kernel in configs.KERNELS:
        for dtype in configs.DTYPES:
            for head_dim in range(configs.HEAD_DIMS[0], configs.HEAD_DIMS[1] + 1, configs.HEAD_DIM_MULTIPLE):
                for block_m, prefix in itertools.product(configs.BLOCK_MS, configs.PREFIXES):
                    if head_dim > configs.PREFIX_HEAD_DIMS[prefix]:
                        continue
                    offered = configs.autotune_configs(kernel, capability, dtype, head_dim, block_m, prefix)
                    assert len(set(offered)) == len(offered) >= 2  # a real choice for autotuning
                    parts = (0, configs.PART_M) if block_m > configs.PART_M else (0,)
                    for config in offered:
                        assert config.part_m in parts
                        assert config.rows_per_program(block_m) == (config.part_m or block_m)


def test_the_offered_configs_are_the_ones_chosen_from_the_recorded_candidates():
    """``configs._SHAPES`` is what ``kernel_build.py --choose`` gives from the committed
    candidate matrices (every claimed architecture, every recorded triton version)."""
    done = _kernel_build("--choose", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    table = {
        f"{k} {d} {m}": [list(shape) for shape in shapes] for (k, d, m), shapes in configs._SHAPES.items()
    }
    assert json.loads(done.stdout) == table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bwd", (9, 0), "bfloat16", 64, 64), "unknown kernel 'bwd'"),
        (("fwd", (7, 5), "bfloat16", 64, 64), "compute capability (7, 5) is not claimed"),
        (("dq", (9, 0), "float32", 64, 64), "dtype float32 is not served on a GPU"),
        (("dkdv", (8, 0), "float16", 16, 64), "head_dim 16 outside 32..128"),
        (("dkdv", (8, 0), "float16", 40, 64), "a multiple of 16"),
        (("fwd", (10, 0), "bfloat16", 256, 64), "head_dim 256 outside"),
        (("fwd", (9, 0), "bfloat16", 64, 32), "item height 32 is not one of (64, 128)"),
        (("dq", (8, 6), "bfloat16", 128, 64, 2), "2 class rows per segment are served up to head_dim 64"),
        (("fwd", (9, 0), "float16", 64, 64, 3), "3 class rows per segment are not built (builds: 1, 2)"),
    ],
)
def test_configs_refuse_what_the_kernels_do_not_serve(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        configs.autotune_configs(*args)


def test_programs_per_sm_take_the_tightest_limit():
    hopper, ampere_86 = configs.ARCHITECTURES["sm_90a"], configs.ARCHITECTURES["sm_86"]
    assert hopper.programs_per_sm(255, 8, 0) == 1  # 8,192 registers a warp x 8 warps: the whole file
    assert hopper.programs_per_sm(128, 4, 48 * 1024) == 4  # registers and shared memory both
    assert hopper.programs_per_sm(128, 4, 100_000) == 2  # shared memory
    assert ampere_86.programs_per_sm(64, 4, 0) == 8  # registers (threads would allow 12)
    assert ampere_86.programs_per_sm(32, 1, 0) == 16  # the block limit
    assert ampere_86.programs_per_sm(64, 4, 200_000) == 0  # does not fit at all


def test_ptxas_report_is_read_and_its_absence_is_an_error():
    log = (
        "ptxas info    : Function properties for hier_attn_bwd_dkdv_kernel\n"
        "    24 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size\n"
    )
    assert _ptxas_numbers(log) == {"registers": 255, "spill_stores": 16, "spill_loads": 20, "stack_frame": 24}
    with pytest.raises(RuntimeError, match="no ptxas report"):
        _ptxas_numbers("ptxas fatal: nothing")


def _call(dim: int, dtype: torch.dtype) -> AttentionCall:
    layout = Layout.build([(1, 2, 2)], [1])
    q = torch.zeros(4, 1, dim, dtype=dtype)
    return AttentionCall(q, q, q, layout, "scan", 1.0, False)


def test_the_gpu_backend_refuses_float32_and_unbuilt_head_dims_with_the_reason():
    """The triton backend's CUDA support, checked on a CPU tensor under the same rules."""
    gpu = gpu_support()
    as_here = Support({"cpu": gpu.devices["cuda"]})
    assert unsupported_reason(as_here, _call(64, torch.bfloat16)) is None
    assert unsupported_reason(as_here, _call(80, torch.float16)) is None
    assert "float32 builds spill registers" in unsupported_reason(as_here, _call(64, torch.float32))
    assert unsupported_reason(as_here, _call(40, torch.bfloat16)) == (
        "head_dim 40 outside 32..128, a multiple of 16 on cpu"
    )
    assert unsupported_reason(gpu, _call(64, torch.bfloat16)).startswith("needs CUDA; got cpu")


def test_an_unclaimed_gpu_is_refused_naming_the_claimed_ones(monkeypatch):
    assert unclaimed_reason((9, 0)) is None
    assert unclaimed_reason((8, 6)) is None
    reason = unclaimed_reason((12, 0))
    assert reason.startswith("compute capability 12.0 is not claimed") and "sm_90a" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert gpu_support().check(_call(64, torch.bfloat16)).startswith("compute capability 7.5")
    checked = Support({"cpu": DeviceSupport((torch.float32,))}, check=lambda call: f"no {call.q.device}")
    assert unsupported_reason(checked, _call(16, torch.float32)) == "no cpu"  # asked last, after the rest
    assert unsupported_reason(checked, _call(16, torch.float16)).startswith("dtype torch.float16")


def test_the_gpu_backend_refuses_class_rows_its_builds_do_not_serve(monkeypatch):
    """Two class rows per segment (register tokens) to head dim 64; three not at all."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    layout = Layout.build([(1, 2, 2)], [1])

    def call(prefix: int, dim: int) -> AttentionCall:
        q = torch.zeros(4 + prefix, 1, dim, dtype=torch.bfloat16)
        return AttentionCall(q, q, q, layout, "scan", 1.0, "scan", prefix=prefix)

    check = gpu_support().check
    assert check(call(1, 128)) is None and check(call(2, 64)) is None
    assert check(call(2, 128)).startswith("2 class rows per segment are served up to head_dim 64")
    assert check(call(3, 64)).startswith("3 class rows per segment are not built")


def test_autotuned_names_the_chosen_configs(monkeypatch):
    from hlip_fast.kernels import hier_attention

    class Tuned:  # what triton.autotune keeps: the chosen config per tuning key
        cache = {("3",): triton.Config({"BLOCK_N": 64, "PART_M": 64}, num_warps=8, num_stages=2)}

    monkeypatch.setattr(hier_attention, "_tuned", {("dkdv", (9, 0), "bfloat16", 64, 128, 2): Tuned()})
    assert hier_attention.autotuned() == [
        {
            "kernel": "dkdv",
            "capability": [9, 0],
            "dtype": "bfloat16",
            "head_dim": 64,
            "block_m": 128,
            "prefix": 2,
            "tuning_key": ["3"],
            "config": "n64 w8 s2 part64",
        }
    ]
