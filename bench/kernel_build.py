"""The attention kernels' build report, without a GPU: every kernel (forward, dq, dkdv) x every
config the autotuner may choose (``hlip_fast.kernels.configs.autotune_configs``) x every item
height the schedule may choose x head dims 32, 64, 80, 128 (80 runs as the 128 tile) x bf16,
fp16 and fp32 (refused on GPUs; compiled with the bf16 configs to show why) x each claimed
architecture x one and two class rows per segment (``configs.PREFIXES``; fp32 at one only).
Per build: registers, spill bytes, shared memory against the architecture's limit, tensor-core
family and programs per SM. Writes
``bench/results/kernel_build_triton-<version>_<date>.json``.

    python bench/kernel_build.py               # the full report (minutes on 2 cores)
    python bench/kernel_build.py --check       # the CI gate: exit 1 if an offered build spills
    python bench/kernel_build.py --candidates  # the matrix the offered configs are chosen from
    python bench/kernel_build.py --choose      # the choice, from every triton version's matrix

``--check`` takes the newest report of the running triton version. If its source key (the
kernels', configs' and build code's text and the triton version) matches, it recompiles a
sample of the report's builds and requires the same numbers; otherwise it compiles every offered
bf16/fp16 build now. Either way every offered build must be spill-free and fit shared memory.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels do not compile

import triton  # noqa: E402
from result_files import newest_per_triton  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hlip_fast.kernels import configs  # noqa: E402
from hlip_fast.kernels.build import compile_kernel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
HEAD_DIMS = (32, 64, 80, 128)
SOURCES = ("hier_attention.py", "configs.py", "build.py")
SAMPLE_PER_KERNEL = 2
CANDIDATES = {"block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3)}
"""The shapes ``--candidates`` compiles, each whole-item and (for 128-row items) in 64-row parts."""


def source_key() -> str:
    """What a report's numbers depend on: the kernel, config and build sources and triton's version."""
    digest = hashlib.sha256(triton.__version__.encode())
    for name in SOURCES:
        digest.update((REPO / "hlip_fast" / "kernels" / name).read_bytes())
    return digest.hexdigest()[:16]


def jobs(dtypes: tuple[str, ...]) -> list[tuple]:
    """``(kernel, arch, dtype, head_dim, block_m, config, prefix, offered)`` for every distinct
    build: the offered dtypes at every prefix the kernels are built for (offered up to the
    prefix's head dim, ``configs.PREFIX_HEAD_DIMS``; beyond it compiled to show why not), the
    refused dtype at one."""
    out = []
    tiles = {configs.block_d(d): d for d in HEAD_DIMS}  # one build per head-dim tile
    for arch in configs.CLAIMED:
        capability = configs.ARCHITECTURES[arch].capability
        for kernel in configs.KERNELS:
            for dtype in dtypes:
                offered = dtype in configs.DTYPES
                for head_dim in tiles.values():
                    for block_m in configs.BLOCK_MS:
                        asked = dtype if offered else "bfloat16"
                        for config in configs.autotune_configs(kernel, capability, asked, head_dim, block_m):
                            for prefix in configs.PREFIXES if offered else configs.PREFIXES[:1]:
                                served = offered and configs.prefix_reason(prefix, head_dim) is None
                                out.append((kernel, arch, dtype, head_dim, block_m, config, prefix, served))
    return out


def candidate_jobs() -> list[tuple]:
    """Every candidate config for every kernel, head-dim tile, item height and claimed
    architecture, in bf16 (fp16 builds the same code), at one class row per segment (the gate
    holds the chosen ones at two as well)."""
    shapes = [tuple(zip(CANDIDATES, values)) for values in itertools.product(*CANDIDATES.values())]
    out = []
    for arch in configs.CLAIMED:
        for kernel in configs.KERNELS:
            for head_dim in sorted({configs.block_d(d) for d in HEAD_DIMS}):
                for block_m in configs.BLOCK_MS:
                    for part_m in {0, configs.PART_M if block_m > configs.PART_M else 0}:
                        for shape in shapes:
                            config = configs.KernelConfig(**dict(shape), part_m=part_m)
                            out.append((kernel, arch, "bfloat16", head_dim, block_m, config, 1, True))
    return out


def clean_everywhere(rows: list[dict]) -> list[dict]:
    """Per kernel, head-dim tile and item height: the candidates that build clean on every
    claimed architecture, with their most registers (what ``configs._SHAPES`` chooses from)."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["block_d"], row["block_m"]), {}).setdefault(
            row["config"], []
        ).append(row)
    return [
        {
            "kernel": kernel,
            "block_d": tile,
            "block_m": block_m,
            "clean": {
                name: max(r["registers"] for r in builds)
                for name, builds in sorted(candidates.items())
                if all(r["clean"] for r in builds)
            },
            "candidates": len(candidates),
        }
        for (kernel, tile, block_m), candidates in sorted(groups.items())
    ]


def choose(clean: dict[str, int]) -> list[str]:
    """Up to three configs for autotuning, from the candidates clean everywhere (name: most
    registers): whole items where two or more are clean (one program per item loads the
    partners once), else 64-row parts beside them; per partner-tile width the one with the
    fewest registers, widest first; then the fewest registers among the rest."""
    whole = {name: r for name, r in clean.items() if "part" not in name}
    pool = sorted((whole if len(whole) >= 2 else clean).items(), key=lambda item: (item[1], item[0]))
    fewest_per_width: dict[int, str] = {}
    for name, _ in pool:
        fewest_per_width.setdefault(_shape(name)[0], name)
    chosen = [fewest_per_width[w] for w in sorted(fewest_per_width, reverse=True)][:3]
    return chosen + [name for name, _ in pool if name not in chosen][: 3 - len(chosen)]


def _shape(name: str) -> tuple[int, int, int, int]:
    """``(block_n, num_warps, num_stages, part_m)`` of a config's name (``KernelConfig.name``)."""
    found = re.fullmatch(r"n(\d+) w(\d+) s(\d+)(?: part(\d+))?", name)
    return tuple(int(part or 0) for part in found.groups())


def chosen_shapes() -> dict[str, list[list[int]]]:
    """``configs._SHAPES`` as the recorded candidate matrices give it: per kernel, head-dim tile
    and item height, :func:`choose` over the candidates clean for every claimed architecture
    under every triton version recorded."""
    matrices = newest_per_triton("kernel_candidates")
    if not matrices:
        raise SystemExit("no bench/results/kernel_candidates_triton-*.json: run --candidates first")
    merged: dict[tuple, dict[str, int]] = {}
    for path in matrices.values():
        for group in json.loads(path.read_text())["clean_everywhere"]:
            key = (group["kernel"], group["block_d"], group["block_m"])
            clean, before = group["clean"], merged.get(key, group["clean"])
            merged[key] = {name: max(r, before[name]) for name, r in clean.items() if name in before}
    return {f"{k} {d} {m}": [list(_shape(n)) for n in choose(c)] for (k, d, m), c in sorted(merged.items())}


def _build(job: tuple) -> dict:
    *args, offered = job
    return {**compile_kernel(*args).row(), "offered": offered}


def compile_all(todo: list[tuple], workers: int) -> list[dict]:
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(_build, todo, chunksize=2), total=len(todo), desc="builds", unit="build"))


def summary(rows: list[dict]) -> list[dict]:
    """Per architecture, dtype and offered or not: class rows per segment and head-dim tiles
    built, builds, spilling, overflowing, registers, tensor cores, programs/SM."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arch"], row["dtype"], not row["offered"]), []).append(row)
    return [
        {
            "arch": arch,
            "dtype": dtype,
            "offered": not refused,
            "prefixes": sorted({r["prefix"] for r in group}),
            "head_dims": sorted({r["block_d"] for r in group}),
            "builds": len(group),
            "spilling": sum(r["spills"] for r in group),
            "max_spill_bytes": max(r["spill_stores"] for r in group),
            "over_shared": sum(r["overflows_shared"] for r in group),
            "registers": [min(r["registers"] for r in group), max(r["registers"] for r in group)],
            "max_shared": max(r["shared"] for r in group),
            "shared_limit": group[0]["shared_limit"],
            "tensor_cores": sorted({r["tensor_cores"] for r in group}),
            "programs_per_sm": [
                min(r["programs_per_sm"] for r in group),
                max(r["programs_per_sm"] for r in group),
            ],
        }
        for (arch, dtype, refused), group in sorted(groups.items())
    ]


def print_summary(rows: list[dict]) -> None:
    line = "{:<8} {:<9} {:>7} {:>5} {:>10} {:>6} {:>9} {:>6} {:>9} {:>16} {:<8} {:>8}"
    print(
        line.format(
            "arch",
            "dtype",
            "offered",
            "P",
            "head dims",
            "builds",
            "spilling",
            "smem>",
            "registers",
            "max shared (KB)",
            "tensor",
            "prog/SM",
        )
    )
    for s in summary(rows):
        print(
            line.format(
                s["arch"],
                s["dtype"],
                "yes" if s["offered"] else "no",
                ",".join(map(str, s["prefixes"])),
                ",".join(map(str, s["head_dims"])),
                s["builds"],
                s["spilling"],
                s["over_shared"],
                "{}-{}".format(*s["registers"]),
                f"{s['max_shared'] / 1024:.0f} / {s['shared_limit'] / 1024:.0f}",
                "/".join(s["tensor_cores"]),
                "{}-{}".format(*s["programs_per_sm"]),
            )
        )


def _key(row: dict) -> tuple:
    return (
        row["kernel"],
        row["arch"],
        row["dtype"],
        row["block_d"],
        row["block_m"],
        row["prefix"],
        row["config"],
    )


def newest_report() -> dict | None:
    path = newest_per_triton("kernel_build").get(triton.__version__)
    return json.loads(path.read_text()) if path else None


def check(workers: int) -> int:
    """The gate: every offered build clean, proven by a matching report and a recompiled sample,
    or by compiling every offered build now."""
    todo = [job for job in jobs(configs.DTYPES) if job[-1]]  # the offered builds
    report = newest_report()
    if report is not None and report["source_key"] == source_key():
        rows = {_key(r): r for r in report["builds"]}
        keyed = {_key(_job_fields(job)): job for job in todo}
        if missing := [k for k in keyed if k not in rows]:
            print(f"the report lacks {len(missing)} offered builds, e.g. {missing[0]}", file=sys.stderr)
            return 1
        offered = [rows[k] for k in keyed]
        sample = _sample(offered)
        print(f"report matches the sources (key {source_key()}): recompiling {len(sample)} of its builds")
        for fresh in compile_all([keyed[_key(r)] for r in sample], workers):
            if fresh != rows[_key(fresh)]:
                print(
                    f"a fresh build differs from the report:\n  report {rows[_key(fresh)]}\n  fresh  {fresh}",
                    file=sys.stderr,
                )
                return 1
    else:
        why = "no report" if report is None else "the report's source key differs"
        print(f"{why} for triton {triton.__version__}: compiling all {len(todo)} offered builds")
        offered = compile_all(todo, workers)
    bad = [r for r in offered if not r["clean"]]
    for r in bad:
        print(
            f"SPILL/SHARED: {r['kernel']} {r['arch']} {r['dtype']} d{r['block_d']} m{r['block_m']} "
            f"P{r['prefix']} "
            f"{r['config']}: "
            f"{r['spill_stores']} B spill stores, shared {r['shared']} of {r['shared_limit']}",
            file=sys.stderr,
        )
    print(
        f"{len(offered)} offered builds, {len(bad)} spill or overflow shared memory "
        f"(triton {triton.__version__})"
    )
    return 1 if bad else 0


def _job_fields(job: tuple) -> dict:
    """The identifying fields of a job, named as a report row names them."""
    kernel, arch, dtype, head_dim, block_m, config, prefix, _ = job
    return {
        "kernel": kernel,
        "arch": arch,
        "dtype": dtype,
        "block_d": configs.block_d(head_dim),
        "block_m": block_m,
        "prefix": prefix,
        "config": config.name,
    }


def _sample(rows: list[dict]) -> list[dict]:
    """The builds nearest to spilling: per kernel, the ones with the most registers."""
    out = []
    for kernel in configs.KERNELS:
        mine = sorted((r for r in rows if r["kernel"] == kernel), key=lambda r: (-r["registers"], _key(r)))
        out += mine[:SAMPLE_PER_KERNEL]
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--workers must be at least 1, got {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="the CI gate (see above)")
    parser.add_argument("--workers", type=_positive, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("--no-fp32", action="store_true", help="leave out the (refused) fp32 builds")
    parser.add_argument("--candidates", action="store_true", help="compile the candidate matrix (see above)")
    parser.add_argument(
        "--choose", action="store_true", help="print the configs chosen from the matrices (JSON)"
    )
    args = parser.parse_args()
    if args.check:
        return check(args.workers)
    if args.choose:
        print(json.dumps(chosen_shapes(), indent=1))
        return 0
    sys.path.insert(0, str(REPO / "bench"))
    from common import write_results

    if args.candidates:
        rows = compile_all(candidate_jobs(), args.workers)
        choice = clean_everywhere(rows)
        for c in choice:
            print(
                f"{c['kernel']:<5} d{c['block_d']:<4} m{c['block_m']:<4} clean on every claimed arch: "
                f"{len(c['clean'])} of {c['candidates']}: "
                + ", ".join(f"{n} ({r})" for n, r in c["clean"].items())
            )
        path = write_results(
            f"kernel_candidates_triton-{triton.__version__}",
            {
                "triton": triton.__version__,
                "source_key": source_key(),
                "candidates": CANDIDATES,
                "clean_everywhere": choice,
                "builds": rows,
            },
        )
        print(f"wrote {path}")
        return 0
    dtypes = configs.DTYPES if args.no_fp32 else (*configs.DTYPES, "float32")
    rows = compile_all(jobs(dtypes), args.workers)
    print_summary(rows)
    path = write_results(
        f"kernel_build_triton-{triton.__version__}",
        {
            "triton": triton.__version__,
            "source_key": source_key(),
            "claimed": list(configs.CLAIMED),
            "head_dims": list(HEAD_DIMS),
            "summary": summary(rows),
            "builds": rows,
        },
    )
    print(f"wrote {path}")
    return 0 if all(r["clean"] for r in rows if r["offered"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
