"""The work the attention kernels do, counted on the CPU: score entries visited against those
attention needs, for every level of HLIP's four configs and the ragged brain-MRI mix.

- ``triton``: hlip_fast's kernels, counted from the very tile schedule they execute
  (``hlip_fast.kernels.tile_schedule``, the item height the backend picks: 64 or 128 rows,
  partner tiles of 64), one program per item; ``triton_parts``: the same schedule where a
  128-row item runs as two programs of ``configs.PART_M`` rows, as the configs that need it do
  (``configs.autotune_configs``: the forward and key-side backward at head dim 128);
- ``flash_varlen``: FlashAttention varlen with segment-aligned 128×64 tiles, each segment's class
  row gathered in front of its patch rows;
- ``flex``: FlexAttention's non-empty 128×128 blocks of the block mask over the rows as packed
  (patch rows, then the class rows).

useful/visited is the CPU proxy for the kernels' GPU efficiency targets (≥ FlashAttention
varlen's at every level, ≥ 0.6 at the 196-token slice level; class rows ≤ 3% of the work).
Writes ``bench/results/tile_model_<date>.json`` and, with matplotlib, a plot beside it.

    python bench/tile_model.py
"""

from __future__ import annotations

import argparse

import numpy as np
from common import RESULTS, write_results

from hlip_fast import Layout
from hlip_fast.kernels.configs import BLOCK_MS, PART_M
from hlip_fast.kernels.tile_schedule import layout_schedule

FLASH_TILE, FLEX_BLOCK = (128, 64), 128
MIX_SCANS = [2 + i % 11 for i in range(8)]  # 8 studies of the ragged mix's 2-12 scans


def cases(seed: int) -> dict[str, tuple[Layout, tuple[str, ...]]]:
    """HLIP's configs at one GPU step's batch, and the ragged brain-MRI mix (depths 15-60 slices,
    patch depth 8)."""
    rng = np.random.default_rng(seed)
    mix = [(int(np.ceil(rng.integers(15, 61) / 8)), 14, 14) for _ in range(sum(MIX_SCANS))]
    return {
        "chest CT, vit_base_singlescan_h2_token2744": (
            Layout.build([(14, 14, 14)] * 16, [1] * 16),
            ("slice", "study"),
        ),
        "brain MRI, vit_base_multiscan_h2_token588": (
            Layout.build([(3, 14, 14)] * sum(MIX_SCANS), MIX_SCANS),
            ("scan", "study"),
        ),
        "brain MRI, vit_base_multiscan_h2_token1176": (
            Layout.build([(6, 14, 14)] * sum(MIX_SCANS), MIX_SCANS),
            ("scan", "study"),
        ),
        "brain MRI, vit_base_multiscan_h3_token1176": (
            Layout.build([(6, 14, 14)] * sum(MIX_SCANS), MIX_SCANS),
            ("slice", "scan", "study"),
        ),
        "brain MRI ragged mix, 15-60 slices": (Layout.build(mix, MIX_SCANS), ("scan", "study")),
    }


def flash_varlen(lengths: np.ndarray) -> int:
    """Visited entries of segment-aligned tiles (class row gathered in front: ``L + 1`` rows)."""
    rows, cols = FLASH_TILE
    return int((-(-lengths // rows) * rows * (-(-lengths // cols) * cols)).sum())


def flex(seqlens: np.ndarray) -> int:
    """Visited entries of the non-empty ``FLEX_BLOCK``-square blocks of the mask over patch rows
    then class rows: a block is non-empty when the segment ranges of its rows and columns meet."""
    segments = len(seqlens)
    segment_of = np.concatenate([np.repeat(np.arange(segments), seqlens), np.arange(segments)])
    blocks = -(-len(segment_of) // FLEX_BLOCK)
    padded = np.concatenate([segment_of, np.full(blocks * FLEX_BLOCK - len(segment_of), -1)])
    per_block = padded.reshape(blocks, FLEX_BLOCK)
    lo = np.where(per_block >= 0, per_block, np.iinfo(np.int64).max).min(1)
    hi = per_block.max(1)
    # Patch blocks hold a contiguous segment range; the class region too, so ranges decide.
    meet = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])
    return int(meet.sum()) * FLEX_BLOCK * FLEX_BLOCK


def measure(layout: Layout, level: str) -> dict:
    schedule = layout_schedule(layout, level, True, BLOCK_MS)
    seqlens = layout.level(level).seqlens.astype(np.int64)
    useful = schedule.useful()
    return {
        "level": level,
        "segments": len(seqlens),
        "mean_tokens": float(seqlens.mean()),
        "useful": useful,
        "triton_block_m": schedule.block_m,
        "triton_items": schedule.num_items,
        "triton": useful / schedule.visited(),
        "triton_parts": useful / schedule.visited(part_m=PART_M),
        "triton_class_share": schedule.class_share(),
        "flash_varlen": useful / flash_varlen(seqlens + 1),
        "flex": useful / flex(seqlens),
    }


def plot(rows: list[dict], path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    labels = [f"{r['case'].split(',')[1].strip()}\n{r['level']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    for i, name in enumerate(("triton", "flash_varlen", "flex")):
        ax.bar(x + (i - 1) * 0.27, [r[name] for r in rows], width=0.27, label=name)
    ax.axhline(0.6, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("useful / visited score entries")
    ax.set_title("Tile work model (CPU count; the GPU-efficiency proxy)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the ragged mix's depths")
    args = parser.parse_args()
    rows = [
        {"case": name, **measure(layout, level)}
        for name, (layout, levels) in cases(args.seed).items()
        for level in levels
    ]
    line = "{:<44} {:<6} {:>7} {:>7} {:>8} {:>4} {:>6} {:>7} {:>6}"
    print(line.format("case", "level", "tokens", "triton", "parts", "(M)", "class", "varlen", "flex"))
    for r in rows:
        numbers = [f"{r[k]:.3f}" for k in ("triton", "triton_parts", "flash_varlen", "flex")]
        print(
            line.format(
                r["case"],
                r["level"],
                f"{r['mean_tokens']:.0f}",
                *numbers[:2],
                r["triton_block_m"],
                f"{r['triton_class_share']:.1%}",
                *numbers[2:],
            )
        )
    path = write_results(
        "tile_model",
        {
            "config": {
                "seed": args.seed,
                "flash_tile": FLASH_TILE,
                "flex_block": FLEX_BLOCK,
                "block_ms": BLOCK_MS,
            },
            "results": rows,
        },
    )
    print(f"wrote {path}")
    plot(rows, RESULTS / path.name.replace(".json", ".png"))


if __name__ == "__main__":
    main()
