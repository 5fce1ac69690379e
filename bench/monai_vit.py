"""MONAI ViT-B forward + backward on one large CT volume: MONAI as shipped, MONAI with
``use_flash_attention=True``, and the same model made hierarchical by
``hlip_fast.integrations.monai.hierarchical`` with an HLIP schedule, side by side in one run.

The volume is 128x256x256 with patches of 4x16x16: 8,192 tokens, 768 wide, 12 blocks, 12 heads.
Each variant runs in a fresh process (its own peak resident memory) under an address-space cap,
so a variant that cannot fit fails with an allocation error instead of waking the OOM killer;
the time is the median of ``--repeats`` steps after one warm-up step. Writes
``bench/results/monai_vit_cpu_<date>.json``.

    python bench/monai_vit.py [--repeats 3] [--schedule vit_base_singlescan_h2_token2744] [--cap-gb 20]
    python bench/monai_vit.py --shape 32 64 64 --repeats 1   # a one-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

VARIANTS = {
    "monai": "MONAI as shipped (einsum attention)",
    "monai_flash": "MONAI, use_flash_attention=True (SDPA)",
    "hlip_fast": "hierarchical(vit, schedule)",
}
SHAPE = (128, 256, 256)
PATCH = (4, 16, 16)


def child(variant: str, schedule: str, repeats: int, cap_gb: float, shape: tuple[int, int, int]) -> dict:
    """In this (fresh) process: build the variant, time its steps, report the peak memory."""
    cap = int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    from monai.networks.nets import ViT

    from hlip_fast.integrations.monai import hierarchical

    torch.manual_seed(0)
    vit = ViT(in_channels=1, img_size=shape, patch_size=PATCH)  # ViT-B: 768 wide, 12 blocks
    if variant == "monai_flash":
        for block in vit.blocks:
            block.attn.use_flash_attention = True
    elif variant == "hlip_fast":
        hierarchical(vit, schedule)
    x = torch.randn(1, 1, *shape)

    def step() -> None:
        out, _ = vit(x)
        out.float().square().mean().backward()
        vit.zero_grad(set_to_none=True)

    times, error = [], None
    try:
        step()
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as failure:  # the cap refused an allocation
        error = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "times_s": times, "peak_mb": peak_mb, "error": error}


def run_variant(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--schedule", args.schedule]
    command += ["--repeats", str(args.repeats), "--cap-gb", str(args.cap_gb)]
    command += ["--shape", *map(str, args.shape)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # killed or crashed: say so, keep the others
        error = f"exit {done.returncode}: {done.stderr[-300:]}"
        return {"variant": variant, "times_s": [], "peak_mb": None, "error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument(
        "--schedule", default="vit_base_singlescan_h2_token2744", help="HLIP schedule for hlip_fast"
    )
    parser.add_argument(
        "--shape", type=int, nargs=3, default=SHAPE, metavar=("D", "H", "W"), help="volume (4x16x16 patches)"
    )
    parser.add_argument("--cap-gb", type=float, default=20.0, help="address-space cap per variant process")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.child:
        print(json.dumps(child(args.child, args.schedule, args.repeats, args.cap_gb, tuple(args.shape))))
        return 0
    from common import median, write_results

    from hlip_fast.models.registry import get_config

    results = []
    for variant in VARIANTS:
        print(f"{variant}: {VARIANTS[variant]} ...", flush=True)
        result = run_variant(variant, args)
        result["median_s"] = median(result["times_s"]) if result["times_s"] else None
        results.append(result)
        shown = f"{result['median_s']:.1f} s/step" if result["median_s"] else result["error"]
        print(f"  {shown}; peak {result['peak_mb'] or 0:.0f} MB", flush=True)
    flash = next(r for r in results if r["variant"] == "monai_flash")["median_s"]
    for r in results:
        r["speedup_over_flash"] = flash / r["median_s"] if flash and r["median_s"] else None
    if any(s % p for s, p in zip(args.shape, PATCH)):
        parser.error(f"--shape {args.shape} is not a multiple of the patch {PATCH}")
    config = {
        "shape": list(args.shape),
        "patch": PATCH,
        "tokens": math.prod(s // p for s, p in zip(args.shape, PATCH)),
        "schedule": args.schedule,
        "levels": list(get_config(args.schedule).levels),
        "repeats": args.repeats,
        "cap_gb": args.cap_gb,
    }
    path = write_results("monai_vit_cpu", {"config": config, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
