"""``hlip-eval`` (zero-shot and retrieval over studies with reports and labels) and
``hlip-embed`` (study embeddings for a folder of studies)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save

from ..boundary import add_debug_flag, command
from ..checkpoint import load_hlip_checkpoint, load_pretrained
from ..data.batching import Batch
from ..data.config import PrepareConfig
from ..data.reader import decoded_studies
from ..data.sources import open_studies
from ..errors import ON_ERROR
from ..files import atomic_write
from .prompts import builtin_prompt_sets, load_prompts
from .run import embed_batches, evaluate_embeddings, reader_config, study_batches, to_markdown
from .zeroshot import ZeroShotClassifier

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        type=Path,
        help="prepared shard folder, .tar shard, .csv/.jsonl manifest, or a folder of study folders",
    )
    parser.add_argument(
        "--grid",
        type=int,
        nargs=2,
        default=[224, 224],
        metavar=("H", "W"),
        help="in-plane grid for raw studies",
    )
    parser.add_argument("--modality", default="CT", help="modality of raw studies that name none (CT or MR)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="patch tokens per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="autocast dtype")
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="raise",
        help="a damaged stored study: stop naming it, or skip it and list it with the results",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(parser)


def model_from_args(args: argparse.Namespace):
    if (args.model is None) == (args.hlip_checkpoint is None):
        raise ValueError("give exactly one of --model or --hlip-checkpoint")
    if args.model is not None:
        return load_pretrained(args.model)
    if not args.vision or not args.text:
        raise ValueError(
            "--hlip-checkpoint needs --vision (config name) and --text (local text model folder)"
        )
    return load_hlip_checkpoint(args.hlip_checkpoint, args.vision, args.text)


def batches_from_args(model, args: argparse.Namespace, skipped: list[dict]) -> Iterator[Batch]:
    """The data argument as token-budget batches shaped for ``model`` (evaluation order)."""
    prepare = PrepareConfig(grid=tuple(args.grid), default_modality=args.modality.upper())
    raws = open_studies(args.data, prepare, skipped, on_error=args.on_error)
    damaged = None if args.on_error == "raise" else lambda error: skipped.append(error.record())
    studies = decoded_studies(raws, reader_config(model), train=False, epoch=0, on_damage=damaged)
    return study_batches(model, studies, args.max_tokens)


def _embed_data(model, args: argparse.Namespace, with_text: bool):
    """The data argument's study (and report) embeddings, and the items skipped on the way."""
    skipped: list[dict] = []
    embeddings = embed_batches(
        model,
        batches_from_args(model, args, skipped),
        device=args.device,
        with_text=with_text,
        autocast_dtype=PRECISIONS[args.precision],
        progress=not args.quiet,
    )
    return embeddings, skipped


@command("hlip-eval")
def eval_main(argv: list[str] | None = None) -> int:
    """``hlip-eval DATA --model DIR --prompts FILE ...``."""
    parser = argparse.ArgumentParser(
        "hlip-eval", description="Zero-shot classification and study-report retrieval."
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
    args = parser.parse_args(argv)
    model = model_from_args(args).to(args.device)
    classifiers = [ZeroShotClassifier.build(model, load_prompts(p)) for p in args.prompts]
    embeddings, skipped = _embed_data(model, args, with_text=not args.no_retrieval)
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


@command("hlip-embed")
def embed_main(argv: list[str] | None = None) -> int:
    """``hlip-embed DATA --model DIR --out embeddings.safetensors``."""
    parser = argparse.ArgumentParser(
        "hlip-embed", description="Study embeddings (normalised) for a folder of studies."
    )
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--out", type=Path, default=Path("embeddings.safetensors"), help="output .safetensors file"
    )
    args = parser.parse_args(argv)
    model = model_from_args(args).to(args.device)
    embeddings, skipped = _embed_data(model, args, with_text=False)
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
