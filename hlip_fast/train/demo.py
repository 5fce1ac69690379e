"""The README demo: the whole pipeline on a CPU in a few minutes.

1. hlip-synth --raw: phantom chest CT studies (soft-tissue and lung reconstructions; nodule,
   consolidation and effusion enlarged three-fold so a tiny model sees them in minutes) as NIfTI
   files + manifests, a training and a held-out split;
2. hlip-prepare: both into compressed shards;
3. hlip-train --recipe scratch-tiny: a tiny HLIP CLIP from scratch (3 blocks of width 48; a
   2-layer BERT whose vocabulary comes from the training reports, warmed up by masked-language
   modelling on them);
4. hlip-eval: zero-shot classification and retrieval on the held-out split, printed as a table.

The run folder keeps everything (metrics.jsonl, checkpoints, eval/, final/) and demo.json, the
figures the README shows (bench/demo.py records them in bench/results/). The environment variable
HLIP_FAST_DEMO_SIZE=smoke shrinks the defaults to a one-minute smoke run (what the tests use).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

from hlip_fast.boundary import command
from hlip_fast.cli_options import add_output_flags, new_parser

TARGET_AUC = 0.90
PROMPTS = "synth_ct"
RECIPE = "scratch-tiny"
SIZES = {  # training studies, held-out studies, steps, masked-language-model warm-up steps
    "full": {"studies": 768, "val_studies": 96, "steps": 800, "mlm_steps": 400},
    "smoke": {"studies": 32, "val_studies": 16, "steps": 6, "mlm_steps": 5},
}
SIZE_VARIABLE = "HLIP_FAST_DEMO_SIZE"


def _size() -> dict:
    name = os.environ.get(SIZE_VARIABLE, "full")
    if name not in SIZES:
        raise ValueError(f"{SIZE_VARIABLE}={name!r}: expected one of {list(SIZES)}")
    return SIZES[name]


def _corpus_steps(out: Path, name: str, studies: int, seed: int, workers: int) -> list[tuple[str, list[str]]]:
    """``hlip-synth --raw`` then ``hlip-prepare --no-resample`` (phantoms keep their spacing)."""
    raw, shards = out / f"raw_{name}", out / f"shards_{name}"
    synth = f"--raw --size small --modality CT --num-studies {studies} --min-scans 2 --max-scans 2 "
    synth += f"--finding-scale 3 --grid 32 32 --seed {seed} --prefix {name}"
    prepare = f"--grid 32 32 --modality CT --no-resample --studies-per-shard 32 --workers {workers}"
    return [
        ("synth", [str(raw), *shlex.split(synth)]),
        ("prepare", [str(raw / "manifest.jsonl"), str(shards), *shlex.split(prepare)]),
    ]


def parser() -> argparse.ArgumentParser:
    size = _size()
    parser = new_parser("python -m hlip_fast.train.demo", __doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_run"), help="folder for data and the run")
    parser.add_argument("--studies", type=int, default=size["studies"], help="training studies")
    parser.add_argument("--val-studies", type=int, default=size["val_studies"], help="held-out studies")
    parser.add_argument("--steps", type=int, default=size["steps"], help="training steps")
    parser.add_argument(
        "--mlm-steps", type=int, default=size["mlm_steps"], help="masked-language-model warm-up steps"
    )
    parser.add_argument("--workers", type=int, default=2, help="hlip-prepare processes")
    add_output_flags(parser)
    return parser


@command("python -m hlip_fast.train.demo")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from hlip_fast.data.cli import prepare_main, synth_main
    from hlip_fast.evaluation.cli import eval_main

    from .cli import main as train_main

    tools = {"synth": synth_main, "prepare": prepare_main}

    started = time.perf_counter()
    output = [*(["--quiet"] if args.quiet else []), *([] if args.progress else ["--no-progress"])]
    say = (lambda message: None) if args.quiet else (lambda message: print(f"[demo] {message}", flush=True))
    say(f"1-2/4 synthesising and preparing {args.studies} + {args.val_studies} chest CT studies")
    train, val = args.out / "shards_train", args.out / "shards_val"
    steps = _corpus_steps(args.out, "train", args.studies, 0, args.workers)
    steps += _corpus_steps(args.out, "val", args.val_studies, 1, args.workers)
    for tool, tool_args in steps:
        if code := tools[tool]([*tool_args, *output]):
            return code
    say(f"3/4 training with --recipe {RECIPE} ({args.steps} steps)")
    run = args.out / "run"
    checkpoint_every = str(max(1, args.steps // 4))
    train_flags = ["--recipe", RECIPE, "--train-data", str(train), "--val-data", str(val)]
    train_flags += ["--prompts", PROMPTS, "--steps", str(args.steps), "--text-mlm-steps", str(args.mlm_steps)]
    train_flags += ["--warmup", str(min(20, max(1, args.steps // 4)))]
    train_flags += ["--save-every", checkpoint_every, "--zeroshot-every", checkpoint_every]
    train_flags += ["--logs", str(args.out), "--name", "run", "--workers", "1", "--resume", "latest"]
    if code := train_main([*train_flags, *output]):
        return code
    say("4/4 zero-shot evaluation on the held-out split")
    eval_flags = ["--model", str(run / "final"), "--prompts", PROMPTS, "--out", str(run / "eval_final")]
    if code := eval_main([str(val), *eval_flags, *output]):
        return code
    results = json.loads((run / "eval_final" / "results.json").read_text())
    minutes = (time.perf_counter() - started) / 60
    summary = {
        "studies": args.studies,
        "val_studies": args.val_studies,
        "steps": args.steps,
        "mlm_steps": args.mlm_steps,
        "recipe": RECIPE,
        "minutes": minutes,
        "zeroshot": results["zeroshot"][PROMPTS],
        "retrieval": results["retrieval"],
    }
    (run / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    auc = summary["zeroshot"]["macro"]["auc"]
    verdict = "meets" if auc >= TARGET_AUC else "misses"
    print(
        f"[demo] zero-shot macro AUC {auc:.3f} on {results['studies']} held-out studies ({verdict} the "
        f"{TARGET_AUC:.2f} target) in {minutes:.1f} min; run folder {run}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
