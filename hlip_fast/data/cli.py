"""``hlip-prepare`` and ``hlip-synth``: the data command-line tools."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .config import PrepareConfig
from .prepare import prepare
from .synth import SIZES, synthesize, write_raw


def _summary(index: dict, out: Path) -> str:
    skipped = json.loads((out / "skipped.json").read_text())
    return (
        f"{out}: {index['num_studies']} studies, {index['num_scans']} scans, {index['num_tokens']:,} tokens "
        f"in {len(index['shards'])} shard(s); skipped {len(skipped['studies'])} studies and "
        f"{len(skipped['files'])} files (see {out / 'skipped.json'})"
    )


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
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = PrepareConfig(
            grid=tuple(args.grid),
            dtype=args.dtype,
            studies_per_shard=args.studies_per_shard,
            default_modality=args.modality.upper(),
        )
        if args.no_resample:
            config = replace(
                config, modalities={k: replace(m, spacing=None) for k, m in config.modalities.items()}
            )
        index = prepare(args.manifest, args.out, config, workers=args.workers, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as error:
        print(f"hlip-prepare: {error}", file=sys.stderr)
        return 2
    print(_summary(index, args.out))
    return 0


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
    parser.add_argument(
        "--raw", action="store_true", help="write NIfTI files + manifest.jsonl for hlip-prepare"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, "prefix": args.prefix}
    for name in ("num_studies", "modality", "min_scans", "max_scans", "finding_scale"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.grid:
        overrides["grid"] = tuple(args.grid)
    try:
        config = replace(SIZES[args.size], **overrides)
    except ValueError as error:
        print(f"hlip-synth: {error}", file=sys.stderr)
        return 2
    if args.raw:
        manifest = write_raw(args.out, config, progress=not args.quiet)
        grid = " ".join(map(str, config.grid))
        print(f"{manifest}: {config.num_studies} studies")
        print(f"next: hlip-prepare {manifest} OUT --grid {grid} --modality {config.modality} --no-resample")
        return 0
    index = synthesize(args.out, config, workers=args.workers, progress=not args.quiet)
    print(_summary(index, args.out))
    return 0
