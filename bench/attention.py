"""Hierarchical attention backends side by side: forward, backward, forward+backward.

Cases: (a) the segment structures of HLIP's configs — chest CT (2,744 tokens per scan, slice
segments of 196) and brain MRI (2–12 scans of 1,176 tokens; scan and study levels); (b) a sweep
of segment length (64 … 16k tokens on a GPU). Every segment carries its class-token copy, as in
the model. For each backend that runs here: median milliseconds, TFLOP/s counted on useful
(unmasked) work, peak memory, and the speed-up over padded dense SDPA (segments padded to the
longest with a key mask — what one would do without varlen kernels), all measured in this run.

Writes ``bench/results/attention_<device>_<date>.{json,csv,png}`` and the ranking table that
``backend="auto"`` reads (``--install-table`` copies it into the package). On a CPU it measures
the CPU backends at smaller sizes and says that GPU numbers need a GPU.

    python bench/attention.py [--quick] [--install-table]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time

import torch
import torch.nn.functional as F
from common import REPO, RESULTS, machine, measure, median, write_results

from hlip_fast import Layout, hier_attention, list_backends
from hlip_fast.attention import auto, available_backends

SKIP = {"reference"}  # the definition, not a contender


def hlip_cases(gpu: bool) -> dict[str, tuple[Layout, tuple[str, ...]]]:
    """HLIP's real segment structures (scaled down on a CPU)."""
    if gpu:
        chest = Layout.build([(14, 14, 14)] * 8, [1] * 8)
        brain_scans = [2, 6, 9, 12]
        brain = Layout.build([(6, 14, 14)] * sum(brain_scans), brain_scans)
    else:
        chest = Layout.build([(4, 7, 7)] * 2, [1, 1])
        brain = Layout.build([(2, 7, 7)] * 5, [2, 3])
    return {"chest_ct": (chest, ("slice", "study")), "brain_mri": (brain, ("scan", "study"))}


def sweep_cases(gpu: bool, quick: bool) -> dict[str, tuple[Layout, tuple[str, ...]]]:
    """Equal segments of one length each, about ``total`` tokens per case."""
    lengths = [64 * 2**i for i in range(9 if gpu else 5)]  # GPU: 64..16384, CPU: 64..1024
    if quick:
        lengths = lengths[::2]
    total = 65536 if gpu else 2048
    return {
        f"sweep_{n}": (Layout.build([(1, 1, n)] * max(1, total // n), [1] * max(1, total // n)), ("scan",))
        for n in lengths
    }


def padded_sdpa(q, k, v, layout: Layout, level: str, scale: float) -> torch.Tensor:
    """Baseline: every segment (with its class row) padded to the longest, one masked SDPA."""
    lv = layout.level(level)
    n, segments, longest = layout.num_tokens, lv.num_segments, lv.max_seqlen + 1
    key = ("padded_index", level)
    if key not in layout.cache:
        starts = torch.tensor(lv.starts, device=q.device)[:, None]
        lengths = torch.tensor(lv.seqlens, device=q.device)[:, None]
        class_rows = n + torch.arange(segments, device=q.device)[:, None]
        pos = torch.arange(longest, device=q.device)
        # Patch rows, then the class row at position `length`; later positions are padding.
        layout.cache[key] = (torch.where(pos < lengths, starts + pos, class_rows), pos <= lengths)
    index, valid = layout.cache[key]
    pq, pk, pv = (t[index].transpose(1, 2) for t in (q, k, v))  # (segments, heads, longest, dim)
    out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=valid[:, None, None, :], scale=scale)
    out = out.transpose(1, 2)[valid]  # rows in (segment, position) order
    order = index[valid]
    return torch.empty_like(out).index_copy_(0, order, out)


def useful_flops(layout: Layout, level: str, heads: int, dim: int) -> float:
    """Forward FLOPs of attention over the real segments (class row included): QK^T and PV."""
    lengths = layout.level(level).seqlens + 1
    return 4.0 * heads * dim * float((lengths.astype(float) ** 2).sum())


def time_backend(run, q, k, v, repeats: int, with_grad: bool, cuda: bool) -> dict[str, float | None]:
    def forward():
        with torch.no_grad():
            run(q, k, v)

    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)

    def forward_backward():
        run(*inputs).backward(grad)

    fwd = median(measure(forward, repeats)) * 1e3
    if not with_grad:
        return {"fwd_ms": fwd, "fwd_bwd_ms": None, "bwd_ms": None, "peak_mib": None}
    both = median(measure(forward_backward, repeats)) * 1e3
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, "bwd_ms": both - fwd, "peak_mib": peak}


def layout_build_us(device: str, repeats: int = 50) -> float:
    """Median microseconds to build a brain-MRI batch's layout and move it to ``device``."""
    scans = [2, 6, 9, 12]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        Layout.build([(6, 14, 14)] * sum(scans), scans).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return median(times) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=None, help="default: 12 on CUDA, 2 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 10 on CUDA, 3 on CPU")
    parser.add_argument("--quick", action="store_true", help="every other sweep length")
    parser.add_argument("--install-table", action="store_true", help="copy the ranking into the package")
    args = parser.parse_args(argv)

    gpu = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    heads = args.heads or (12 if gpu else 2)
    repeats = args.repeats or (10 if gpu else 3)
    if not gpu:
        print(
            "CPU run: CPU backends at small sizes. GPU numbers (triton, flash, torch_varlen, xformers, "
            "compiled flex) need a GPU: run bench/gpu_check.sh there."
        )
    cases = {**hlip_cases(gpu), **sweep_cases(gpu, args.quick)}
    rows = []
    for case, (cpu_layout, levels) in cases.items():
        layout = cpu_layout.to(args.device)
        for level in levels:
            segments = layout.num_segments(level)
            shape = (layout.num_tokens + segments, heads, args.head_dim)
            q, k, v = (torch.randn(shape, device=args.device, dtype=dtype) for _ in range(3))
            flops = useful_flops(layout, level, heads, args.head_dim)
            contenders = {
                "padded_sdpa": lambda q, k, v, layout=layout, level=level: padded_sdpa(
                    q, k, v, layout, level, args.head_dim**-0.5
                )
            }
            with torch.no_grad():
                runs = available_backends(q, k, v, layout, level)
            trains = available_backends(*(t.detach().requires_grad_() for t in (q, k, v)), layout, level)
            for name in list_backends():
                if name not in SKIP and runs[name] is None:
                    contenders[name] = lambda q, k, v, name=name, layout=layout, level=level: hier_attention(
                        q, k, v, layout, level, backend=name
                    )
            for name, run in contenders.items():
                with_grad = name == "padded_sdpa" or trains[name] is None
                print(f"[{case}/{level}] {name}...", flush=True)
                timing = time_backend(run, q, k, v, repeats, with_grad, gpu)
                rows.append(
                    {
                        "case": case,
                        "level": level,
                        "backend": name,
                        "segments": segments,
                        "max_seqlen": layout.level(level).max_seqlen + 1,
                        "tokens": shape[0],
                        **timing,
                        "fwd_tflops": flops / timing["fwd_ms"] / 1e9,
                        "fwd_bwd_tflops": None
                        if timing["fwd_bwd_ms"] is None
                        else 3.5 * flops / timing["fwd_bwd_ms"] / 1e9,
                    }
                )
    for row in rows:
        base = next(
            r
            for r in rows
            if r["case"] == row["case"] and r["level"] == row["level"] and r["backend"] == "padded_sdpa"
        )
        row["fwd_speedup_vs_padded"] = base["fwd_ms"] / row["fwd_ms"]
        row["fwd_bwd_speedup_vs_padded"] = (
            None if row["fwd_bwd_ms"] is None else base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        )

    print_table(rows)
    autotuned = triton_autotuned()
    for pick in autotuned:
        arch = "sm_{}{}".format(*pick["capability"])
        shape = f"{pick['dtype']} d{pick['head_dim']} m{pick['block_m']} key {pick['tuning_key']}"
        print(f"triton autotuned: {pick['kernel']} {arch} {shape}: {pick['config']}")
    table = ranking_table(rows, args.device, str(dtype).removeprefix("torch."), args.head_dim)
    info = machine()
    tag = f"{info['device']} {info['date']}"
    path = write_results(
        f"attention_{'gpu' if gpu else 'cpu'}",
        {
            "config": {"dtype": str(dtype), "heads": heads, "head_dim": args.head_dim, "repeats": repeats},
            "layout_build_and_move_us": layout_build_us(args.device),
            # Graphs torch.compile built in this run (compiled flex on CUDA): one per level and
            # mode means ragged batches caused no recompiles.
            "compiled_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
            "results": rows,
            "auto_table": table,
            "triton_autotuned": autotuned,
        },
    )
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plotted = plot(rows, path.with_suffix(".png"), tag)
    extra = " and a .png plot" if plotted else ""
    print(f"\nwrote {path.name}, {path.with_suffix('.csv').name}{extra} in {RESULTS}")
    if args.install_table:  # into this checkout's source, to be committed
        installed = REPO / "hlip_fast" / "attention" / auto.TABLE_PATH.name
        installed.write_text(json.dumps({"measured_by": path.name, "entries": table}, indent=2) + "\n")
        print(f"installed the ranking into {installed.relative_to(REPO)}")


def print_table(rows: list[dict]) -> None:
    columns = ("case/level", "backend", "fwd ms", "bwd ms", "f+b ms", "f+b TFLOP/s", "vs padded", "peak MiB")
    print("\n{:<22} {:<13} {:>9} {:>9} {:>9} {:>12} {:>10} {:>9}".format(*columns))

    def fmt(value, places=3):
        return "n/a" if value is None else f"{value:.{places}f}"

    for r in rows:
        cells = (
            f"{r['case']}/{r['level']}",
            r["backend"],
            fmt(r["fwd_ms"]),
            fmt(r["bwd_ms"]),
            fmt(r["fwd_bwd_ms"]),
            fmt(r["fwd_bwd_tflops"]),
            fmt(r["fwd_bwd_speedup_vs_padded"], 2),
            fmt(r["peak_mib"], 1),
        )
        print("{:<22} {:<13} {:>9} {:>9} {:>9} {:>12} {:>10} {:>9}".format(*cells))


def triton_autotuned() -> list[dict]:
    """The launch configs autotuning chose for the triton kernels in this run (none on the CPU)."""
    if "hlip_fast.kernels.hier_attention" not in sys.modules:
        return []
    return sys.modules["hlip_fast.kernels.hier_attention"].autotuned()


def ranking_table(rows: list[dict], device: str, dtype: str, head_dim: int) -> list[dict]:
    """One entry per measured (case, level): backends ordered by forward+backward time."""
    entries = []
    for case, level in dict.fromkeys((r["case"], r["level"]) for r in rows):
        group = [
            r
            for r in rows
            if (r["case"], r["level"]) == (case, level)
            and r["fwd_bwd_ms"] is not None
            and r["backend"] != "padded_sdpa"
        ]
        if group:
            ranking = [r["backend"] for r in sorted(group, key=lambda r: r["fwd_bwd_ms"])]
            entries.append(
                {
                    "device_type": torch.device(device).type,
                    "dtype": dtype,
                    "head_dim": head_dim,
                    "seqlen": group[0]["max_seqlen"],
                    "ranking": ranking,
                    "case": f"{case}/{level}",
                }
            )
    return entries


def plot(rows: list[dict], path, title: str) -> bool:
    """TFLOP/s (forward+backward) against segment length for the sweep; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    sweep = [r for r in rows if r["case"].startswith("sweep_") and r["fwd_bwd_tflops"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for backend in dict.fromkeys(r["backend"] for r in sweep):
        points = sorted((r["max_seqlen"], r["fwd_bwd_tflops"]) for r in sweep if r["backend"] == backend)
        ax.plot(*zip(*points), marker="o", label=backend)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("segment length (tokens, class row included)")
    ax.set_ylabel("useful TFLOP/s (forward+backward)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


if __name__ == "__main__":
    main()
