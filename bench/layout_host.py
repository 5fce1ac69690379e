"""Host cost of a step's layout metadata: ``Layout.build`` alone, and with the ``triton``
kernels' tile schedules of all three levels (what a training step spends on the host before
its first attention kernel), for batches of 8 and 64 studies of the ragged brain-MRI mix (2–12
scans of 15–60 slices, patch depth 8, 14×14 patches in-plane). Target: ≤ 0.5 ms at 64 studies.
With ``--device cuda`` the layout is built for the GPU and the schedules are copied there, as
in a step (host time, not synchronised).

    python bench/layout_host.py     # prints a table, writes bench/results/layout_<cpu|gpu>_<date>.json
"""

from __future__ import annotations

import argparse
import timeit
from functools import partial

import torch
from common import median, write_results
from encoder_cpu import ragged_mix

from hlip_fast import LEVELS, Layout
from hlip_fast.kernels.configs import BLOCK_MS
from hlip_fast.kernels.tile_schedule import layout_schedule


def brain_mri_grids(studies: int) -> tuple[list[tuple[int, int, int]], list[int]]:
    """Patch grids and scans per study of ``studies`` studies of the ragged brain-MRI mix."""
    depths = ragged_mix(torch.Generator().manual_seed(0), studies)
    grids = [(-(-d // 8), 14, 14) for study in depths for d in study]
    return grids, [len(s) for s in depths]


def build_with_schedules(grids, scans, device: str = "cpu") -> Layout:
    layout = Layout.build(grids, scans, device=device)
    for level in LEVELS:
        layout_schedule(layout, level, True, BLOCK_MS).on(layout.device)
    return layout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats; the median is reported")
    parser.add_argument("--calls", type=int, default=200, help="calls per repeat")
    parser.add_argument("--device", default="cpu", help="where the layout's tensors go (cpu, cuda)")
    args = parser.parse_args()
    if min(args.repeats, args.calls) < 1:
        parser.error("--repeats and --calls must be >= 1")

    results = []
    for studies in (8, 64):
        grids, scans = brain_mri_grids(studies)
        layout = build_with_schedules(grids, scans, args.device)
        row = {"studies": studies, "scans": len(grids), "tokens": layout.num_tokens}
        for name, fn in (
            ("layout_build_ms", partial(Layout.build, grids, scans, device=args.device)),
            ("with_schedules_ms", partial(build_with_schedules, grids, scans, args.device)),
        ):
            fn()
            times = timeit.repeat(fn, number=args.calls, repeat=args.repeats)
            row[name] = median(times) / args.calls * 1e3
        row["items"] = {level: layout_schedule(layout, level, True, BLOCK_MS).num_items for level in LEVELS}
        results.append(row)
        print(
            f"{studies:3d} studies, {row['tokens']:,} tokens: Layout.build {row['layout_build_ms']:.3f} ms, "
            f"with the three levels' schedules {row['with_schedules_ms']:.3f} ms"
        )
    config = {"repeats": args.repeats, "calls": args.calls, "heights": BLOCK_MS, "device": args.device}
    kind = "gpu" if torch.device(args.device).type == "cuda" else "cpu"
    path = write_results(f"layout_{kind}", {"config": config, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
