"""``hlip-prepare`` and ``hlip-synth``: the data command-line tools."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..boundary import add_debug_flag, command
from ..files import read_json
from .config import PrepareConfig
from .prepare import prepare
from .synth import SIZES, synthesize, write_raw
from .volumes import MAX_VOXELS


def _summary(index: dict, out: Path) -> str:
    skipped = read_json(out / "skipped.json")
    return (
        f"{out}: {index['num_studies']} studies, {index['num_scans']} scans, {index['num_tokens']:,} tokens "
        f"in {len(index['shards'])} shard(s); skipped {len(skipped['studies'])} studies and "
        f"{len(skipped['files'])} files (see {out / 'skipped.json'})"
    )


@command("hlip-prepare")
def prepare_main(argv: list[str] | None = None) -> int:
    """``hlip-prepare MANIFEST OUT``: raw studies → shards, index.json and skipped.json."""
    parser = argparse.ArgumentParser(
        "hlip-prepare", description="Raw studies (manifest) -> compressed shards."
    )
    parser.add_argument(
        "manifest", type=Path, help=".csv or .jsonl: study_id, scans, report, labels, modality"
    )
    parser.add_argument("out", type=Path, help="output folder (resumable: finished shards are kept)")
    parser.add_argument("--grid", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8")
    parser.add_argument("--studies-per-shard", type=int, default=64)
    parser.add_argument("--modality", default="CT", help="modality of rows that name none (CT or MR)")
    parser.add_argument("--no-resample", action="store_true", help="keep each scan's own depth spacing")
    parser.add_argument(
        "--max-voxels",
        type=int,
        default=MAX_VOXELS,
        help=f"refuse volumes larger than this, checked on their headers (default {MAX_VOXELS:,})",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="OUT was prepared from another manifest or with other settings: redo the shards that differ",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    config = PrepareConfig(
        grid=tuple(args.grid),
        dtype=args.dtype,
        studies_per_shard=args.studies_per_shard,
        default_modality=args.modality.upper(),
        max_voxels=args.max_voxels,
    )
    if args.no_resample:
        config = replace(
            config, modalities={k: replace(m, spacing=None) for k, m in config.modalities.items()}
        )
    index = prepare(
        args.manifest, args.out, config, workers=args.workers, progress=not args.quiet, rebuild=args.rebuild
    )
    print(_summary(index, args.out))
    return 0


@command("hlip-synth")
def synth_main(argv: list[str] | None = None) -> int:
    """``hlip-synth OUT``: a synthetic corpus as shards, or ``--raw`` as NIfTI files + manifest."""
    parser = argparse.ArgumentParser(
        "hlip-synth", description="A seeded synthetic corpus of phantom studies."
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--num-studies", type=int)
    parser.add_argument("--modality", choices=["MR", "CT"])
    parser.add_argument("--grid", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--min-scans", type=int)
    parser.add_argument("--max-scans", type=int)
    parser.add_argument("--finding-scale", type=float, help="multiply every finding's radius")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="synth", help="study id prefix (e.g. train, test)")
    parser.add_argument("--studies-per-shard", type=int, default=32)
    parser.add_argument(
        "--raw", action="store_true", help="write NIfTI files + manifest.jsonl for hlip-prepare"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--rebuild", action="store_true", help="OUT holds another corpus: redo the shards that differ"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, "prefix": args.prefix}
    for name in ("num_studies", "modality", "min_scans", "max_scans", "finding_scale"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.grid:
        overrides["grid"] = tuple(args.grid)
    config = replace(SIZES[args.size], **overrides)
    if args.raw:
        manifest = write_raw(args.out, config, progress=not args.quiet)
        grid = " ".join(map(str, config.grid))
        print(f"{manifest}: {config.num_studies} studies")
        print(f"next: hlip-prepare {manifest} OUT --grid {grid} --modality {config.modality} --no-resample")
        return 0
    settings = PrepareConfig(studies_per_shard=args.studies_per_shard)
    index = synthesize(
        args.out, config, settings, workers=args.workers, progress=not args.quiet, rebuild=args.rebuild
    )
    print(_summary(index, args.out))
    return 0
