"""Packed hlip_fast encoder vs HLIP's padded fixed-shape pipeline: forward+backward per study.

The padded pipeline is HLIP's: every scan resized to one depth (``--fixed-depth`` slices), every
study padded to ``--padded-scans`` scans by repeating its scans, levels switched by reshaping
dense batches (timm blocks with fused SDPA). hlip_fast packs the same studies ragged: each scan
keeps its depth (rounded up to a multiple of the patch depth) and no scan is repeated. Both
models share width, depth, schedule and weights. Resizing is preprocessing in HLIP and is not
timed; only the model's forward+backward is.

Cases: (a) uniform — every study 4 scans of ``--fixed-depth`` slices, identical work for both;
(b) ragged brain-MRI mix — 2–12 scans per study, 15–60 slices per scan, 224×224 in-plane;
the padded pipeline fills every study to the mix's largest study (12 scans), so it drops none.
Each case draws ``--studies`` studies (default 11: one of each scan count from 2 to 12) and runs
them ``--batch`` per step; a repeat runs them all, the two pipelines taking turns step by step
(so a drift in this machine's speed slows both alike). A third contender, ``hlip_fast_unpermuted``,
is hlip_fast with the SDPA backend's row permutation replaced by the identity: its outputs are
wrong (segments attend over the wrong rows) but it runs the same kernels on the same shapes, so
its speed-up is the ceiling of a copy-free SDPA path. After the timing, one pass of each
pipeline runs under ``torch.profiler`` and its operators' own CPU time is summed by kind
(attention, convolution, matrix products, row copies, the rest): where the two pipelines differ.

Variants, timed in turn on the first ``--variant-studies`` studies of the ragged mix at the same
width: the plain encoder beside itself with 3D RoPE, and ViT-L's two schedules (24 blocks: scan
attention with study attention at blocks 5/11/17/23, and the three-level one with slice attention
in 16 blocks) beside each other, so each ratio compares like with like.

    python bench/encoder_cpu.py            # prints tables, writes bench/results/encoder_cpu_<date>.json
"""

from __future__ import annotations

import argparse
import math
from unittest import mock

import torch
from common import measure_interleaved, median, write_results
from torch.profiler import profile

from hlip_fast import create_model, pack_studies
from hlip_fast.attention import sdpa
from hlip_fast.models.registry import get_config
from hlip_fast.padded_hlip import PaddedHLIP

VARIANTS = {
    # name: (overrides of the bench's plain encoder, the variant it is compared with)
    "plain": ({}, None),
    "plain + 3D RoPE": ({"rope": True}, "plain"),
    "ViT-L schedule, scan + study": (
        {"levels": get_config("vit_large_scan_study_dualdinotxt1568").levels},
        None,
    ),
    "ViT-L schedule, slice + scan + study": (
        {"levels": get_config("vit_large_slice_scan_study_dualdinotxt1568").levels},
        "ViT-L schedule, scan + study",
    ),
}
"""Encoder variants timed side by side (at the bench's width; ViT-L's schedules at its 24 blocks)."""


def ragged_mix(gen: torch.Generator, studies: int) -> list[list[int]]:
    """Slice counts of each scan of each study: 2–12 scans, 15–60 slices.

    Scan counts cycle through 2, 3, ..., 12 so that a sample of 11 studies holds the mix's
    range evenly instead of whatever a small random draw gives; depths are drawn uniformly.
    """

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    return [[draw(15, 60) for _ in range(2 + i % 11)] for i in range(studies)]


def packed_step(model, depths, in_plane, gen):
    """Forward+backward of the packed encoder on studies with the given scan depths.

    Each depth is rounded up to a multiple of the patch depth (zero slices appended).
    """
    patch_depth = model.config.patch_size[0]
    studies = [
        [torch.zeros(math.ceil(d / patch_depth) * patch_depth, in_plane, in_plane) for d in study]
        for study in depths
    ]
    for study, study_depths in zip(studies, depths):
        for scan, d in zip(study, study_depths):
            scan[:d] = torch.randn(d, in_plane, in_plane, generator=gen)
    batch = pack_studies(studies, model.config.patch_size)

    def step():
        model.zero_grad(set_to_none=True)
        model(batch).square().sum().backward()

    return step, batch.layout.num_tokens


def padded_step(model, depths, fixed_depth, padded_scans, in_plane, gen):
    """Forward+backward of the padded pipeline: fixed depth, scans repeated to a fixed count."""
    volumes = torch.randn(len(depths), padded_scans, 1, fixed_depth, in_plane, in_plane, generator=gen)
    for i, study in enumerate(depths):  # HLIP repeats a study's scans to fill its slots
        for slot in range(len(study), padded_scans):
            volumes[i, slot] = volumes[i, slot % len(study)]

    def step():
        model.zero_grad(set_to_none=True)
        model(volumes).square().sum().backward()

    tokens = (
        volumes[0, 0, 0].numel() // math.prod(model.patch_embed.proj.kernel_size) * padded_scans * len(depths)
    )
    return step, tokens


def without_row_permutation(step):
    """``step`` with the SDPA backend's row permutation replaced by the identity (wrong outputs,
    same kernels and shapes): the time hlip_fast would take if it moved no row for SDPA."""

    def run():
        calls = []

        def identity(rows, order, inverse):
            calls.append(None)
            return rows

        with mock.patch.object(sdpa, "permute_rows", identity):
            step()
        if not calls:  # another backend ran: this contender would time plain hlip_fast
            raise RuntimeError("hlip_fast's attention did not run the sdpa backend; nothing was unpermuted")

    return run


def time_per_study(pipelines: dict[str, list], studies: int, repeats: int) -> dict[str, list[float]]:
    """Per pipeline, seconds per study of running every step once, for each repeat (after one
    warm-up step). The pipelines take turns step by step: each step of one is timed next to the
    same studies' step of the other, so that this machine's drifts in speed slow both alike."""
    for steps in pipelines.values():
        steps[0]()
    per_step = [
        measure_interleaved({name: steps[i] for name, steps in pipelines.items()}, repeats, warmup=0)
        for i in range(len(next(iter(pipelines.values()))))
    ]
    return {name: [sum(t[name][r] for t in per_step) / studies for r in range(repeats)] for name in pipelines}


OP_KINDS = {
    "attention": lambda op: "scaled_dot_product" in op,
    "convolution": lambda op: "convolution" in op,
    "matrix products": lambda op: op in ("aten::mm", "aten::addmm", "aten::bmm"),
    "row copies": lambda op: (
        op in ("aten::index_select", "aten::index", "aten::cat", "aten::stack", "aten::copy_", "aten::fill_")
    ),
}
"""Operator kinds of the breakdown, first match wins; every other operator counts as ``other``
(LayerNorm, GELU, additions, reductions). Row copies: gathers, concatenations, copies, fills."""


def op_kind(op: str) -> str:
    return next((kind for kind, matches in OP_KINDS.items() if matches(op)), "other")


def time_by_op_kind(steps: list, studies: int) -> dict[str, float]:
    """Seconds per study of each operator kind in one profiled pass of ``steps`` (each operator's
    own CPU time, its children's excluded, so that nothing counts twice)."""
    with profile() as prof:
        for step in steps:
            step()
    seconds = dict.fromkeys((*OP_KINDS, "other"), 0.0)
    for event in prof.key_averages():
        seconds[op_kind(event.key)] += event.self_cpu_time_total / 1e6 / studies
    return seconds


def time_variants(args, mix: list[list[int]], gen: torch.Generator) -> list[dict]:
    """Each of ``VARIANTS`` on the same ragged studies, timed in turn; seconds per study."""
    depths = mix[: args.variant_studies]
    chunks = [depths[i : i + args.batch] for i in range(0, len(depths), args.batch)]
    steps, blocks = {}, {}
    for name, (overrides, _) in VARIANTS.items():
        levels = overrides.get("levels", (("scan", "scan", "study") * args.depth)[: args.depth])
        model = create_model(
            "vit_base_multiscan_h2_token1176",
            embed_dim=args.embed_dim,
            num_heads=args.heads,
            **{**overrides, "depth": len(levels), "levels": levels},
        ).train()
        steps[name] = [packed_step(model, c, args.in_plane, gen)[0] for c in chunks]
        blocks[name] = len(levels)
    print(
        f"[variants] timing {', '.join(VARIANTS)} in turn: "
        f"{len(chunks)} steps x {args.variant_repeats} repeats"
    )
    times = time_per_study(steps, len(depths), args.variant_repeats)
    medians = {name: median(t) for name, t in times.items()}
    return [
        {
            "variant": name,
            "blocks": blocks[name],
            "seconds_per_study": times[name],
            "median_seconds_per_study": medians[name],
            "compared_with": base,
            "ratio": medians[name] / medians[base] if base else None,
        }
        for name, (_, base) in VARIANTS.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=11, help="studies drawn per case")
    parser.add_argument("--batch", type=int, default=2, help="studies per forward+backward step")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=3, help="blocks, scheduled scan, scan, study, ...")
    parser.add_argument("--in-plane", type=int, default=224)
    parser.add_argument("--fixed-depth", type=int, default=48, help="slices per scan in the padded pipeline")
    parser.add_argument("--padded-scans", type=int, default=12, help="scans per study in the padded pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant-studies", type=int, default=4, help="ragged studies the variants run")
    parser.add_argument("--variant-repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = create_model(
        "vit_base_multiscan_h2_token1176",
        embed_dim=args.embed_dim,
        num_heads=args.heads,
        depth=args.depth,
        levels=(("scan", "scan", "study") * args.depth)[: args.depth],
    ).train()
    padded = PaddedHLIP.from_encoder(model).train()
    gen = torch.Generator().manual_seed(args.seed)

    cases = {
        "uniform": ([[args.fixed_depth] * 4] * args.studies, 4),
        "ragged_brain_mri": (ragged_mix(gen, args.studies), args.padded_scans),
    }
    rows = []
    for case, (depths, scans) in cases.items():
        chunks = [depths[i : i + args.batch] for i in range(0, len(depths), args.batch)]
        packed = [packed_step(model, c, args.in_plane, gen) for c in chunks]
        padded_ = [padded_step(padded, c, args.fixed_depth, scans, args.in_plane, gen) for c in chunks]
        print(
            f"[{case}] timing padded_hlip, hlip_fast and hlip_fast_unpermuted in turn: "
            f"{len(packed)} steps x {args.repeats} repeats"
        )
        pipelines = {
            "padded_hlip": [fn for fn, _ in padded_],
            "hlip_fast": [fn for fn, _ in packed],
            "hlip_fast_unpermuted": [without_row_permutation(fn) for fn, _ in packed],
        }
        times = time_per_study(pipelines, len(depths), args.repeats)
        by_kind = {
            name: time_by_op_kind(pipelines[name], len(depths)) for name in ("padded_hlip", "hlip_fast")
        }
        medians = {k: median(v) for k, v in times.items()}
        rows.append(
            {
                "case": case,
                "scans_per_study": [len(s) for s in depths],
                "slices_per_scan": depths,
                "tokens": {"padded_hlip": sum(t for _, t in padded_), "hlip_fast": sum(t for _, t in packed)},
                "seconds_per_study": times,
                "median_seconds_per_study": medians,
                "speedup": medians["padded_hlip"] / medians["hlip_fast"],
                "speedup_unpermuted": medians["padded_hlip"] / medians["hlip_fast_unpermuted"],
                "profiled_seconds_per_study_by_op_kind": by_kind,
            }
        )

    header = ("case", "padded s/study", "hlip_fast s/study", "speed-up", "unpermuted", "tokens padded/packed")
    print("\n{:<18} {:>15} {:>18} {:>9} {:>11} {:>21}".format(*header))
    for r in rows:
        m, t = r["median_seconds_per_study"], r["tokens"]
        print(
            f"{r['case']:<18} {m['padded_hlip']:>15.3f} {m['hlip_fast']:>18.3f} {r['speedup']:>8.2f}x "
            f"{r['speedup_unpermuted']:>10.2f}x {t['padded_hlip']:>10}/{t['hlip_fast']}"
        )
    print("\nwhere a study's time goes (one profiled pass; operators' own CPU time, s/study):")
    kinds = list(rows[0]["profiled_seconds_per_study_by_op_kind"]["hlip_fast"])
    print(f"{'case / pipeline':<30}" + "".join(f"{k:>17}" for k in (*kinds, "all")))
    for r in rows:
        for name, seconds in r["profiled_seconds_per_study_by_op_kind"].items():
            cells = [seconds[k] for k in kinds] + [sum(seconds.values())]
            print(f"{r['case'] + ' / ' + name:<30}" + "".join(f"{c:>17.3f}" for c in cells))
    variants = time_variants(args, ragged_mix(torch.Generator().manual_seed(args.seed), args.studies), gen)
    print(f"\nvariants on {args.variant_studies} ragged studies (s/study, median of {args.variant_repeats}):")
    for v in variants:
        ratio = f"  {v['ratio']:.2f}x of {v['compared_with']}" if v["compared_with"] else ""
        print(f"  {v['variant']:<40} {v['blocks']:>3} blocks {v['median_seconds_per_study']:>8.3f}{ratio}")
    config = {k: v for k, v in vars(args).items() if k != "no_write"}
    if not args.no_write:
        path = write_results("encoder_cpu", {"config": config, "results": rows, "variants": variants})
        print(f"\nwrote {path.relative_to(path.parents[2])}")


if __name__ == "__main__":
    main()
