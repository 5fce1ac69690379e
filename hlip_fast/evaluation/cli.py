"""``hlip-eval`` (zero-shot and retrieval over studies with reports and labels) and
``hlip-embed`` (study embeddings for a folder of studies)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from ..boundary import command
from ..cli_options import (
    add_device_flags,
    add_output_flags,
    add_preprocessing_flags,
    autocast_dtype,
    new_parser,
    resolve_device,
)
from ..console import Console
from ..data.config import DEFAULT_MAX_TOKENS
from ..data.shards import SHARD_SOURCES
from ..errors import ON_ERROR
from .prompts import builtin_prompt_sets


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (an hlip_fast folder, or an original HLIP checkpoint)")
    group.add_argument("--model", type=Path, help="folder written by hlip_fast.save_pretrained / hlip-train")
    group.add_argument(
        "--hlip-checkpoint", type=Path, help="original HLIP .pt/.safetensors (open_clip layout)"
    )
    group.add_argument(
        "--vision",
        help="with --hlip-checkpoint: the encoder config name, e.g. vit_base_multiscan_h2_token1176",
    )
    group.add_argument(
        "--text", help="with --hlip-checkpoint: local folder with the text model's config and tokenizer"
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        help=f"stored shards ({SHARD_SOURCES}), a .csv/.jsonl manifest, or a folder of study folders",
    )
    add_preprocessing_flags(parser, "raw studies")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="patch tokens per batch")
    add_device_flags(parser)
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="raise",
        help="a damaged stored study: stop naming it, or skip it and list it with the results",
    )
    add_output_flags(parser)


def model_from_args(args: argparse.Namespace):
    from ..pretrained import load_hlip_checkpoint, load_pretrained

    if (args.model is None) == (args.hlip_checkpoint is None):
        raise ValueError("give exactly one of --model or --hlip-checkpoint")
    if args.model is not None:
        return load_pretrained(args.model)
    if not args.vision or not args.text:
        raise ValueError(
            "--hlip-checkpoint needs --vision (config name) and --text (local text model folder)"
        )
    return load_hlip_checkpoint(args.hlip_checkpoint, args.vision, args.text)


def batches_from_args(model, args: argparse.Namespace, skipped: list[dict]) -> tuple[Iterator, int | None]:
    """The data argument as token-budget batches shaped for ``model`` (evaluation order), and the
    number of studies it lists (``None`` when unknown)."""
    from ..data.config import PrepareConfig
    from ..data.reader import decoded_studies
    from ..data.sources import open_studies
    from ..data.transforms import model_transforms
    from .run import study_batches

    prepare = PrepareConfig(grid=tuple(args.grid), default_modality=args.modality)
    source = open_studies(args.data, prepare, skipped, on_error=args.on_error)
    damaged = None if args.on_error == "raise" else lambda error: skipped.append(error.record())
    studies = decoded_studies(source, model_transforms(model), train=False, epoch=0, on_damage=damaged)
    return study_batches(model, studies, args.max_tokens), source.total


def _embed_data(model, args: argparse.Namespace, console: Console, with_text: bool):
    """The data argument's study (and report) embeddings, and the items skipped on the way;
    non-finite embeddings are an error (nothing is written)."""
    import torch

    from .run import embed_batches

    skipped: list[dict] = []
    batches, total = batches_from_args(model, args, skipped)
    embeddings = embed_batches(
        model,
        batches,
        device=args.device,
        with_text=with_text,
        autocast_dtype=autocast_dtype(args.precision, args.device.type),
        console=console,
        total=total,
    )
    for name, values in (("study", embeddings.study), ("report", embeddings.text)):
        if values is not None and not bool(torch.isfinite(values).all()):
            bad = (~torch.isfinite(values)).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(
                f"{len(bad)} of {len(values)} {name} embeddings are not finite (first: study "
                f"{embeddings.study_ids[bad[0]]}); nothing written: check the model's weights"
            )
    return embeddings, skipped


def _load(args: argparse.Namespace, console: Console):
    """The model of the arguments, on their device."""
    args.device = resolve_device(args.device)
    console.say(f"loading the model onto {args.device}")
    return model_from_args(args).to(args.device)


@command("hlip-eval")
def eval_main(argv: list[str] | None = None) -> int:
    """``hlip-eval DATA --model DIR --prompts FILE ...``."""
    args = eval_parser().parse_args(argv)
    from ..files import atomic_write
    from .prompts import load_prompts
    from .run import evaluate_embeddings, to_markdown
    from .zeroshot import ZeroShotClassifier

    console = Console.for_tool("hlip-eval", args)
    model = _load(args, console)
    classifiers = [ZeroShotClassifier.build(model, load_prompts(p)) for p in args.prompts]
    embeddings, skipped = _embed_data(model, args, console, with_text=not args.no_retrieval)
    console.say(f"scoring {len(embeddings.study_ids)} studies")
    results = evaluate_embeddings(
        embeddings, classifiers, model.logit_scale.exp().item(), threshold=args.threshold
    )
    results["skipped"] = skipped
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "results.json", json.dumps(results, indent=2))
    markdown = to_markdown(results)
    atomic_write(args.out / "results.md", markdown + "\n")
    print(markdown)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}; skipped {len(skipped)} item(s)")
    return 0


def eval_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "hlip-eval",
        "Zero-shot classification (HLIP's protocol: one prompt pair per finding) and study<->report\n"
        "retrieval (R@1/5/10) of a trained model on studies with reports and labels.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--prompts",
        nargs="+",
        default=[],
        help=f"YAML/JSON prompt files or built-in sets {builtin_prompt_sets()}",
    )
    parser.add_argument(
        "--threshold",
        choices=["pair", "roc"],
        default="pair",
        help="binary decisions: larger of the pair, or the ROC corner",
    )
    parser.add_argument("--no-retrieval", action="store_true", help="skip report embedding and retrieval")
    parser.add_argument(
        "--out", type=Path, default=Path("eval"), help="folder for results.json and results.md"
    )
    return parser


@command("hlip-embed")
def embed_main(argv: list[str] | None = None) -> int:
    """``hlip-embed DATA --model DIR --out embeddings.safetensors``."""
    args = embed_parser().parse_args(argv)
    from safetensors.torch import save

    from ..files import atomic_write

    console = Console.for_tool("hlip-embed", args)
    model = _load(args, console)
    embeddings, skipped = _embed_data(model, args, console, with_text=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "study_ids": json.dumps(embeddings.study_ids),
        "normalized": "true",
        "skipped": json.dumps(skipped),
    }
    atomic_write(args.out, save({"embeddings": embeddings.study.contiguous()}, metadata=metadata))
    print(
        f"wrote {len(embeddings.study_ids)} embeddings of width {embeddings.study.shape[1]} to {args.out}; "
        f"skipped {len(skipped)} item(s)" + "".join(f"\n  {s}" for s in skipped)
    )
    return 0


def embed_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "hlip-embed",
        "Study embeddings (L2-normalised) of a trained model for a folder, manifest or shards of\n"
        "studies, written to one safetensors file with the study ids in its metadata.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--out", type=Path, default=Path("embeddings.safetensors"), help="output .safetensors file"
    )
    return parser
