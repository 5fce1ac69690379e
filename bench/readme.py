"""Rewrites the README's result sections from the newest files in ``bench/results/``, so that
every figure the README shows is one a script printed and recorded.

Each section sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; ``NAME`` is
the result kind (``demo``, ``encoder``, ``attention``, ``data``, ``data_ct_rate``, ``train``,
``tile_model``, ``layout``, ``kernel_build``, ``monai_vit``) and its newest
``bench/results/NAME_cpu_<date>.json`` fills it (``NAME_<date>.json`` for the device-free kinds;
``kernel_build`` shows the newest report of each triton version).

    python bench/readme.py            # rewrite README.md
    python bench/readme.py --check    # exit 1 and show the difference when README.md is stale
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from result_files import newest_per_triton

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
DEVICE_FREE = {"tile_model", "kernel_build"}  # counted or compiled, not timed: the same on every machine
SECTION = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def newest(kind: str) -> tuple[Path, dict]:
    """The newest result file of ``kind`` (CPU measurements, or the device-free tile model; ISO
    dates in the names sort in time order)."""
    pattern = f"{kind}_*.json" if kind in DEVICE_FREE else f"{kind}_cpu_*.json"
    files = sorted(RESULTS.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {RESULTS.relative_to(REPO)}/{pattern}: run bench/{kind}.py")
    return files[-1], json.loads(files[-1].read_text())


def _machine(result: dict) -> str:
    m = result["machine"]
    return f"{m['date']}, {m['cpu_count']}-core {m['processor']} CPU, torch {m['torch'].split('+')[0]}"


def _text_release(result: dict) -> str:
    """The transformers release of the run, where the file records it (its text tower and
    tokenizer move the demo's figures)."""
    version = result["machine"].get("packages", {}).get("transformers")
    return f", transformers {version}" if version else ""


def _source(path: Path) -> str:
    return f"`{path.relative_to(REPO)}`"


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def demo(path: Path, result: dict) -> str:
    d = result["demo"]
    zeroshot = d["zeroshot"]
    rows = [
        ["**macro**", *(f"{zeroshot['macro'][k]:.3f}" for k in ("auc", "balanced_accuracy", "weighted_f1"))]
    ]
    rows += [
        [name, *(f"{f[k]:.3f}" for k in ("auc", "balanced_accuracy", "weighted_f1"))]
        for name, f in zeroshot["per_finding"].items()
    ]
    recall = d["retrieval"]["study_to_text"]
    return (
        f"The training demo (`bash scripts/demo.sh`; recorded by `python bench/demo.py`, {_machine(result)}"
        f"{_text_release(result)}: "
        f"{d['minutes']:.1f} min "
        f"after the install; {d['studies']} training and {d['val_studies']} held-out studies, "
        f"{d['steps']} steps, `--recipe {d['recipe']}`; {_source(path)}), zero-shot on the held-out "
        "split:\n\n"
        + _table(["finding", "AUC", "balanced acc.", "weighted F1"], rows)
        + f"\n\nRetrieval among the {d['val_studies']} held-out studies: study→report R@1/5/10 = "
        + " / ".join(f"{recall[k]:.3f}" for k in recall)
        + ".\n"
    )


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}–{max(values)}"


def encoder(path: Path, result: dict) -> str:
    c = result["config"]
    rows = []
    for r in result["results"]:
        scans, slices = r["scans_per_study"], [n for study in r["slices_per_scan"] for n in study]
        name = _encoder_case(r["case"])
        t, s = r["tokens"], r["median_seconds_per_study"]
        rows.append(
            [
                f"{name}: {_span(scans)} scans × {_span(slices)} slices",
                f"{s['padded_hlip']:.3f}",
                f"{s['hlip_fast']:.3f}",
                f"{r['speedup']:.2f}×",
                f"{r['speedup_unpermuted']:.2f}×",
                f"{t['padded_hlip']:,} / {t['hlip_fast']:,}",
            ]
        )
    return (
        f"`python bench/encoder_cpu.py` — {_machine(result)}, medians of {c['repeats']} repeats over "
        f"{c['studies']} studies ({_source(path)}):\n\n"
        + _table(
            [
                "case",
                "padded HLIP s/study",
                "hlip_fast s/study",
                "speed-up",
                "speed-up, no row permuted",
                "tokens padded / packed",
            ],
            rows,
        )
        + "\n\nWhere a study's time goes, in ms: one profiled pass, each operator's own CPU time "
        "summed by kind (row copies: gathers, concatenations, copies, fills):\n\n"
        + _op_kinds_table(result["results"])
        + "\n"
        + _variants_table(result)
    )


def _variants_table(result: dict) -> str:
    """The encoder variants timed side by side (absent from results older than them)."""
    variants, c = result.get("variants"), result["config"]
    if not variants:
        return ""
    rows = [
        [
            v["variant"],
            str(v["blocks"]),
            f"{v['median_seconds_per_study']:.3f}",
            f"{v['ratio']:.2f}× {v['compared_with']}" if v["compared_with"] else "–",
        ]
        for v in variants
    ]
    return (
        f"\nVariants, timed in turn on {c['variant_studies']} of the ragged studies at the same width "
        f"({c['embed_dim']} wide, {c['heads']} heads), medians of {c['variant_repeats']} repeats:\n\n"
        + _table(["variant", "blocks", "s/study", "vs"], rows)
        + "\n"
    )


def _encoder_case(case: str) -> str:
    return case.replace("_", " ").replace("mri", "MRI")


def _op_kinds_table(results: list[dict]) -> str:
    kinds = list(results[0]["profiled_seconds_per_study_by_op_kind"]["hlip_fast"])
    names = {"padded_hlip": "padded HLIP", "hlip_fast": "hlip_fast"}
    rows = [
        [
            f"{_encoder_case(r['case'])} / {names[name]}",
            *(f"{seconds[k] * 1e3:.1f}" for k in kinds),
            f"{sum(seconds.values()) * 1e3:.1f}",
        ]
        for r in results
        for name, seconds in r["profiled_seconds_per_study_by_op_kind"].items()
    ]
    return _table(["case / pipeline", *kinds, "all operators"], rows)


def attention(path: Path, result: dict) -> str:
    c = result["config"]
    padded = {(r["case"], r["level"]): r for r in result["results"] if r["backend"] == "padded_sdpa"}
    rows = [
        [
            f"{r['case'].replace('_', ' ').replace('ct', 'CT').replace('mri', 'MRI')} / {r['level']} "
            f"({r['segments']} segments, up to {r['max_seqlen']} rows)",
            r["backend"],
            f"{padded[r['case'], r['level']]['fwd_bwd_ms']:.3f}",
            f"{r['fwd_bwd_ms']:.3f}",
            f"{r['fwd_bwd_speedup_vs_padded']:.2f}×",
        ]
        for r in result["results"]
        if r["backend"] != "padded_sdpa" and r["fwd_bwd_ms"] is not None and not r["case"].startswith("sweep")
    ]
    dtype = c["dtype"].removeprefix("torch.")
    return (
        f"`python bench/attention.py` — {_machine(result)}, {dtype}, {c['heads']} heads of {c['head_dim']}, "
        f"medians of {c['repeats']} ({_source(path)}); forward+backward against padded dense SDPA on "
        "scaled-down HLIP structures:\n\n"
        + _table(["case / level", "backend", "padded SDPA ms", "backend ms", "speed-up"], rows)
        + "\n"
    )


def data(path: Path, result: dict) -> str:
    c = result["config"]
    names = {"torch_load_pt": "`torch.load` per scan", "hlip_fast_shards": "hlip_fast shards (CPU)"}
    base = next(r for r in result["results"] if r["reader"] == "torch_load_pt")["studies_per_s"]
    rows = [
        [
            names.get(r["reader"], r["reader"]),
            f"{r['studies_per_s']:.1f}",
            f"{r['volumes_per_s']:.1f}",
            f"{r['gb_per_s']:.3f}",
            f"{r['disk_mb']:.1f}",
            f"{r['studies_per_s'] / base:.2f}×",
        ]
        for r in result["results"]
    ]
    text = (
        f"`python bench/data.py` — {_machine(result)}, {c['studies']} studies, {c['workers']} DataLoader "
        f"workers, medians of {c['repeats']} passes ({_source(path)}):\n\n"
        + _table(
            ["reader", "studies/s", "volumes/s", "GB/s (float32 out)", "on disk (MB)", "vs torch.load"], rows
        )
        + "\n"
    )
    if checks := result.get("checksums"):
        text += (
            f"\nVerifying the checksums changed the reader's time by {checks['reader']['overhead']:+.1%} "
            "(through the workers) and a decoding pass in one process by "
            f"{checks['one_process']['overhead']:+.1%} in that run.\n"
        )
    return text


def data_ct_rate(path: Path, result: dict) -> str:
    c, p = result["config"], result["projection"]
    names = {
        "hlip_fast_unfused": "CPU reader as issue 15 found it: three float32 passes, float32 batches",
        "hlip_fast_shards": "CPU reader now: uint8 batches and intensity maps, as delivered",
        "hlip_fast_shards_landed_cpu": 'the same, mapped to float32 on this CPU (`.to("cpu")`)',
        "hlip_fast_shards_landed_cuda": 'the same, moved and mapped on the GPU (`.to("cuda")`)',
    }
    base = result["results"][0]["volumes_per_s"]
    rows = [
        [
            names.get(r["reader"], r["reader"]),
            f"{r['volumes_per_s']:.1f}",
            f"{r['gb_per_s']:.3f}",
            f"{r['volumes_per_s_per_core']:.1f}",
            f"{r['volumes_per_s'] / base:.2f}×",
        ]
        for r in result["results"]
    ]
    depth, (h, w) = c["depth_range"][0], c["grid"]
    patch, tokens = "×".join(map(str, c["batching"]["patch_size"])), c["batching"]["max_tokens"]
    return (
        f"`python bench/data.py --preset ct-rate` — {_machine(result)}, {c['studies']} studies of one "
        f"{depth}×{h}×{w} uint8 scan, batches of {tokens:,} tokens cut with patch {patch}, "
        f"{c['workers']} DataLoader workers, medians of {c['repeats']} passes "
        f"({_source(path)}):\n\n"
        + _table(["reader", "volumes/s", "GB/s (float32 out)", "volumes/s per core", "speed-up"], rows)
        + f"\n\nProjected to a {p['host_cores']}-core GPU host (the per-core rate times the cores, if it "
        f"scales linearly): {p['volumes_per_s']:.0f} volumes/s, {p['margin']:.1f}× HLIP's training rate of "
        f"{p['training_volumes_per_s']:.0f} volumes/s (the goal is 2×).\n"
    )


def train(path: Path, result: dict) -> str:
    c, r = result["config"], result["results"]
    pipelines = (
        ("padded HLIP", "padded_hlip", "1.00×"),
        ("hlip_fast", "hlip_fast", f"{result['speedup']:.2f}×"),
    )
    rows = [
        [name, f"{r[key]['studies_per_s']:.3f}", f"{r[key]['peak_mb_per_study']:.0f}", speedup]
        for name, key, speedup in pipelines
    ]

    def phases(key: str) -> str:
        seconds = r[key]["phase_seconds"]
        total = sum(seconds.values())
        return ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in seconds.items())

    where = "; ".join(f"{name}: {phases(key)}" for name, key, _ in pipelines)
    return (
        f"`python bench/train.py` (preset `{c['preset']}`) — {_machine(result)}, medians of "
        f"{c['repeats']} passes ({_source(path)}):\n\n"
        + _table(["pipeline", "studies/s", "peak memory per study (MB)", "speed-up"], rows)
        + f"\n\nWhere a pass goes (one more pass under `torch.profiler`, CPU time): {where}.\n"
    )


def tile_model(path: Path, result: dict) -> str:
    rows = [
        [
            re.sub(r"(vit_\w+)", r"`\1`", r["case"]),
            r["level"],
            f"{r['mean_tokens']:,.0f}",
            f"{r['triton']:.3f} ({r['triton_block_m']})",
            f"{r['triton_parts']:.3f}",
            f"{r['triton_class_share']:.1%}",
            f"{r['flash_varlen']:.3f}",
            f"{r['flex']:.3f}",
        ]
        for r in result["results"]
    ]
    header = [
        "case",
        "level",
        "tokens/segment",
        "triton (item rows)",
        "in 64-row parts",
        "class rows' share",
        "flash varlen",
        "flex",
    ]
    return (
        f"`python bench/tile_model.py` ({result['machine']['date']}, {_source(path)}; plot beside it), "
        "useful / visited score entries:\n\n" + _table(header, rows) + "\n"
    )


def layout(path: Path, result: dict) -> str:
    c = result["config"]
    rows = [
        [
            f"{r['studies']}",
            f"{r['scans']}",
            f"{r['tokens']:,}",
            f"{r['layout_build_ms']:.3f}",
            f"{r['with_schedules_ms']:.3f}",
            " / ".join(f"{n:,}" for n in r["items"].values()),
        ]
        for r in result["results"]
    ]
    header = [
        "studies",
        "scans",
        "tokens",
        "Layout.build ms",
        "with the schedules ms",
        "items slice / scan / study",
    ]
    return (
        f"`python bench/layout_host.py` — {_machine(result)}, medians of {c['repeats']} repeats of "
        f"{c['calls']} calls ({_source(path)}):\n\n" + _table(header, rows) + "\n"
    )


def kernel_build(path: Path, result: dict) -> str:
    """The build report's summary, one table per triton version (the newest report of each)."""
    del path, result  # every version's newest report, not only the newest file
    newest_of = newest_per_triton("kernel_build")
    header = [
        "arch",
        "dtype",
        "offered",
        "class rows / segment",
        "head-dim tiles",
        "builds",
        "spilling",
        "over shared memory",
        "registers",
        "max shared / limit KB",
        "tensor cores",
        "programs/SM",
    ]
    parts = []
    for version, file in newest_of.items():
        report = json.loads(file.read_text())
        rows = [
            [
                s["arch"],
                s["dtype"],
                "yes" if s["offered"] else "refused",
                ", ".join(map(str, s["prefixes"])),
                ", ".join(map(str, s["head_dims"])),
                f"{s['builds']}",
                f"{s['spilling']}" + (f" (≤ {s['max_spill_bytes']:,} B)" if s["spilling"] else ""),
                f"{s['over_shared']}",
                "{}–{}".format(*s["registers"]),
                f"{s['max_shared'] / 1024:.0f} / {s['shared_limit'] / 1024:.0f}",
                "/".join(s["tensor_cores"]),
                "{}–{}".format(*s["programs_per_sm"]),
            ]
            for s in report["summary"]
        ]
        parts.append(
            f"`{report['command']}` under triton {version} ({report['machine']['date']}, {_source(file)}), "
            f"head dims {', '.join(map(str, report['head_dims']))}:\n\n" + _table(header, rows) + "\n"
        )
    return "\n".join(parts)


def prepare(path: Path, result: dict) -> str:
    c, summary = result["config"], result["summary"]
    names = {
        "hlip": "HLIP's method (SimpleITK, HU, trilinear to 3×1×1 mm, float32 `.pt`)",
        "hlip_fast": "`hlip-prepare --source ct-rate --grid 336 336 --workers 1`",
    }
    base = next(r for r in result["results"] if r["method"] == "hlip")["s_per_volume"]
    rows = []
    for r in result["results"]:
        name = names.get(r["method"], f"floor: inflate only, {r['method'].removeprefix('floor-')}")
        written = r["written_mb_per_volume"]
        rows.append([
            name,
            f"{r['s_per_volume']:.3f}",
            f"{r['volumes_per_s_per_core']:.2f}",
            f"{r['input_mb_per_s']:.0f}",
            "–" if written is None else f"{written:.1f}",
            f"{base / r['s_per_volume']:.2f}×",
        ])  # fmt: skip
    depths = ", ".join(str(shape[0]) for shape in c["shapes"])
    mb = sum(c["compressed_mb"]) / len(c["compressed_mb"])
    header = ["method", "s / volume", "volumes/s per core", "MB/s in", "MB written / volume", "vs HLIP"]
    text = (
        f"`{result['command']}` — {_machine(result)}, one thread each, {c['volumes']} volumes of "
        f"512×512×({depths}) int16 ({mb:.0f} MB of `.nii.gz` each), medians of {c['repeats']} passes "
        f"({_source(path)}):\n\n"
        + _table(header, rows)
        + f"\n\nhlip_fast is {summary['speedup_over_hlip']:.2f}× HLIP's method and "
        f"{summary['over_floor']:.2f}× the floor ({summary['floor'].removeprefix('floor-')})."
    )
    if memory := result.get("memory"):
        ours, theirs = memory["hlip_fast"], memory["hlip"]
        shape = "×".join(map(str, memory["shape"][::-1]))
        text += (
            f" Peak resident memory of one process preparing one {shape} volume "
            f"({memory['raw_mb']:.0f} MB of int16, {memory['compressed_mb']:.0f} MB compressed): "
            f"hlip_fast {ours['peak_mb']:.0f} MB ({ours['peak_over_raw']:.2f}× the raw volume, the "
            f"interpreter and torch included), HLIP's method {theirs['peak_mb']:.0f} MB "
            f"({theirs['peak_over_raw']:.2f}×)."
        )
    return text + "\n"


def monai_vit(path: Path, result: dict) -> str:
    c = result["config"]
    names = {
        "monai": "MONAI as shipped (einsum attention)",
        "monai_flash": "MONAI, `use_flash_attention=True`",
        "hlip_fast": f'`hierarchical(vit, "{c["schedule"]}")`',
    }
    rows = []
    for r in result["results"]:
        if r["median_s"] is None:
            refused = "can't allocate memory" in (r["error"] or "")
            why = f"out of memory under the {c['cap_gb']:.0f} GB cap" if refused else f"failed: {r['error']}"
            peak = "–" if r["peak_mb"] is None else f"{r['peak_mb'] / 1024:.1f} when refused"
            rows.append([names[r["variant"]], why, peak, "–"])
            continue
        speedup = r["speedup_over_flash"]
        rows.append([
            names[r["variant"]],
            f"{r['median_s']:.1f}",
            f"{r['peak_mb'] / 1024:.1f}",
            "–" if speedup is None else f"{speedup:.2f}×",
        ])  # fmt: skip
    shape = "×".join(map(str, c["shape"]))
    header = ["model", "s / step", "peak resident GB", "vs MONAI flash"]
    return (
        f"`{result['command']}` — {_machine(result)}, one {shape} volume ({c['tokens']:,} tokens), "
        f"medians of {c['repeats']} steps after one warm-up, {c['cap_gb']:.0f} GB address-space cap "
        f"per variant ({_source(path)}):\n\n" + _table(header, rows) + "\n"
    )


RENDERERS: dict[str, Callable[[Path, dict], str]] = {
    "demo": demo,
    "encoder": encoder,
    "attention": attention,
    "data": data,
    "data_ct_rate": data_ct_rate,
    "prepare": prepare,
    "train": train,
    "tile_model": tile_model,
    "layout": layout,
    "kernel_build": kernel_build,
    "monai_vit": monai_vit,
}


def render(text: str) -> str:
    """``text`` (the README) with every marked section regenerated."""
    found = set()

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise ValueError(f"README.md: unknown results section {name!r}; known: {sorted(RENDERERS)}")
        found.add(name)
        return match[1] + RENDERERS[name](*newest(name)) + match[4]

    text = SECTION.sub(fill, text)
    if missing := sorted(set(RENDERERS) - found):
        raise ValueError(f"README.md has no <!-- results:NAME --> section for {missing}")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md is stale")
    args = parser.parse_args()
    current = README.read_text()
    wanted = render(current)
    if wanted == current:
        print("README.md: result sections are up to date")
        return 0
    if args.check:
        diff = difflib.unified_diff(
            current.splitlines(), wanted.splitlines(), "README.md", "generated", lineterm=""
        )
        print("\n".join(diff))
        print("README.md is stale: run python bench/readme.py", file=sys.stderr)
        return 1
    README.write_text(wanted)
    print("README.md: result sections rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
