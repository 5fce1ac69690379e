"""``hlip-prepare`` and ``hlip-synth``: the data command-line tools."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from ..boundary import command
from ..cli_options import add_output_flags, add_preprocessing_flags, new_parser
from ..console import Console
from ..errors import RunStopped
from ..files import read_json
from .config import PrepareConfig
from .synth import SIZES
from .volumes import MAX_VOXELS


def _summary(index: dict, out: Path) -> str:
    skipped = read_json(out / "skipped.json")
    return (
        f"{out}: {index['num_studies']} studies, {index['num_scans']} scans, {index['num_tokens']:,} tokens "
        f"in {len(index['shards'])} shard(s); skipped {len(skipped['studies'])} studies and "
        f"{len(skipped['files'])} files (see {out / 'skipped.json'})"
    )


def prepare_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "hlip-prepare",
        "Raw studies (a manifest of NIfTI, DICOM, .npy or .pt scans with reports and labels, or the\n"
        "CT-RATE release as published) -> compressed shards, index.json and skipped.json.\n"
        "Resumable; the same bytes for any --workers, --executor or --part.\n"
        "Joining parts: hlip-prepare merge OUT PART_DIRS... (see hlip-prepare merge --help).",
    )
    parser.add_argument(
        "input",
        type=str,
        metavar="MANIFEST|ROOT",
        help=".csv or .jsonl manifest (study_id, scans, report, labels, modality), or with "
        "--source ct-rate CT-RATE's root folder; either may be an fsspec URL (s3://, gs://, https://)",
    )
    parser.add_argument("out", type=Path, help="output folder (resumable: finished shards are kept)")
    parser.add_argument(
        "--source",
        dest="source_kind",
        choices=["manifest", "ct-rate"],
        default="manifest",
        help="what the input is: a manifest, or CT-RATE's root (volumes, metadata, reports, labels)",
    )
    parser.add_argument("--split", choices=["train", "valid"], help="CT-RATE split (with --source ct-rate)")
    parser.add_argument(
        "--recons",
        choices=["each", "all"],
        help="CT-RATE reconstructions: one study each (HLIP's recipe) or all of a session as one "
        "multi-scan study (with --source ct-rate; default: each)",
    )
    add_preprocessing_flags(parser, "the manifest's studies")
    parser.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8", help="stored integer type")
    parser.add_argument("--studies-per-shard", type=int, default=64, help="studies in each .tar shard")
    parser.add_argument(
        "--no-resample",
        action="store_true",
        help="keep each scan's own depth spacing (default: CT to 3 mm, MR to 4 mm)",
    )
    parser.add_argument(
        "--max-voxels", type=int, default=MAX_VOXELS, help="refuse larger volumes, checked on their headers"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="preprocessing processes (local, or of a local Dask cluster)"
    )
    parser.add_argument(
        "--executor",
        choices=["local", "dask"],
        default="local",
        help="where the studies are prepared: local processes, or a Dask cluster (--scheduler; without "
        "it a local one of --workers processes); OUT must be on storage the workers share",
    )
    parser.add_argument("--scheduler", metavar="ADDRESS", help="the Dask scheduler, e.g. tcp://HOST:8786")
    parser.add_argument(
        "--part",
        metavar="I/K",
        help="prepare only the I-th of K parts of the shards (array jobs); join them with "
        "'hlip-prepare merge OUT PART_DIRS...'",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="OUT was prepared from another manifest or with other settings: redo the shards that differ",
    )
    add_output_flags(parser)
    return parser


def merge_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "hlip-prepare merge",
        "Join the folders of 'hlip-prepare ... --part I/K' runs into one prepared folder: checks\n"
        "that they come from one manifest and one set of flags, cover every part once and are\n"
        "finished; shards are hard-linked (or copied), the parts are left as they are.",
    )
    parser.add_argument("out", type=Path, help="the merged folder")
    parser.add_argument("parts", type=Path, nargs="+", metavar="PART_DIR", help="the part folders")
    add_output_flags(parser)
    return parser


def _merge_main(argv: list[str]) -> int:
    args = merge_parser().parse_args(argv)
    from .parts import merge

    index = merge(args.out, args.parts, Console.for_tool("hlip-prepare merge", args))
    print(_summary(index, args.out))
    return 0


@command("hlip-prepare")
def prepare_main(argv: list[str] | None = None) -> int:
    """``hlip-prepare MANIFEST OUT``: raw studies → shards, index.json and skipped.json;
    ``hlip-prepare merge OUT PART_DIRS...``: parts joined into one folder."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return _merge_main(argv[1:])
    parser = prepare_parser()
    args = parser.parse_args(argv)
    if args.source_kind == "ct-rate" and args.split is None:
        parser.error("--source ct-rate needs --split train or --split valid")
    if args.source_kind == "manifest" and (args.split or args.recons):
        parser.error("--split and --recons apply to --source ct-rate only")
    if args.scheduler and args.executor != "dask":
        parser.error("--scheduler needs --executor dask")
    from .parts import Part

    try:
        part = Part.parse(args.part) if args.part else None
    except ValueError as error:
        parser.error(str(error))
    with ExitStack() as stack:
        client = None
        if args.executor == "dask":
            from .dask_executor import dask_client

            client = stack.enter_context(dask_client(args.scheduler, args.workers))
        index = _prepare(args, part, client)
    print(_summary(index, args.out))
    if index["num_studies"] == 0 and part is None:  # no result: stop as for too much damage
        # (one part of K may hold only skipped studies; the merge of the parts is the result)
        skipped = len(read_json(args.out / "skipped.json")["studies"])
        raise RunStopped(
            f"{args.out}: no study was stored ({skipped} skipped; their reasons are in "
            f"{args.out / 'skipped.json'})"
        )
    return 0


def _prepare(args: argparse.Namespace, part, client) -> dict:
    from .prepare import prepare

    config = PrepareConfig(
        grid=tuple(args.grid),
        dtype=args.dtype,
        studies_per_shard=args.studies_per_shard,
        default_modality=args.modality,
        max_voxels=args.max_voxels,
    )
    if args.no_resample:
        config = replace(
            config, modalities={k: replace(m, spacing=None) for k, m in config.modalities.items()}
        )
    console = Console.for_tool("hlip-prepare", args)
    source = args.input
    if args.source_kind == "ct-rate":
        from .ct_rate import read_ct_rate

        ct_rate = read_ct_rate(args.input, args.split, args.recons or "each")
        console.say(ct_rate.describe())
        source = ct_rate.entries
    return prepare(
        source,
        args.out,
        config,
        workers=args.workers,
        console=console,
        rebuild=args.rebuild,
        part=part,
        executor=client,
    )


def synth_parser() -> argparse.ArgumentParser:
    sizes = "; ".join(
        f"{name}: {c.num_studies} studies of {c.min_scans}-{c.max_scans} scans, "
        f"{c.depth_range[0]}-{c.depth_range[1]} slices of {c.grid[0]}x{c.grid[1]}"
        for name, c in SIZES.items()
    )
    parser = new_parser(
        "hlip-synth",
        "A seeded synthetic corpus of phantom studies (brain MRI or chest CT) with findings, reports\n"
        "and labels: straight to shards, or with --raw as NIfTI files + manifest.jsonl for hlip-prepare.\n"
        "Both routes give the same studies.",
    )
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help=f"corpus preset ({sizes})")
    parser.add_argument("--num-studies", type=int, help="studies (default: the size's)")
    parser.add_argument("--modality", choices=["MR", "CT"], type=str.upper, help="default: MR")
    parser.add_argument(
        "--grid", type=int, nargs=2, metavar=("H", "W"), help="in-plane size (default: the size's)"
    )
    parser.add_argument("--min-scans", type=int, help="fewest scans per study (default: the size's)")
    parser.add_argument("--max-scans", type=int, help="most scans per study (default: the size's)")
    parser.add_argument(
        "--finding-scale", type=float, help="multiply every finding's radius (default: 1; larger is easier)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the corpus seed")
    parser.add_argument("--prefix", default="synth", help="study id prefix (e.g. train, test)")
    parser.add_argument("--studies-per-shard", type=int, default=32, help="studies in each .tar shard")
    parser.add_argument(
        "--raw", action="store_true", help="write NIfTI files + manifest.jsonl for hlip-prepare instead"
    )
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")
    parser.add_argument(
        "--rebuild", action="store_true", help="OUT holds another corpus: redo the shards that differ"
    )
    add_output_flags(parser)
    return parser


@command("hlip-synth")
def synth_main(argv: list[str] | None = None) -> int:
    """``hlip-synth OUT``: a synthetic corpus as shards, or ``--raw`` as NIfTI files + manifest."""
    args = synth_parser().parse_args(argv)
    from .synth import synthesize, write_raw

    overrides = {"seed": args.seed, "prefix": args.prefix}
    for name in ("num_studies", "modality", "min_scans", "max_scans", "finding_scale"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.grid:
        overrides["grid"] = tuple(args.grid)
    config = replace(SIZES[args.size], **overrides)
    console = Console.for_tool("hlip-synth", args)
    if args.raw:
        manifest = write_raw(args.out, config, console=console)
        grid = " ".join(map(str, config.grid))
        print(f"{manifest}: {config.num_studies} studies")
        print(f"next: hlip-prepare {manifest} OUT --grid {grid} --modality {config.modality} --no-resample")
        return 0
    settings = PrepareConfig(studies_per_shard=args.studies_per_shard)
    index = synthesize(
        args.out, config, settings, workers=args.workers, console=console, rebuild=args.rebuild
    )
    print(_summary(index, args.out))
    return 0
