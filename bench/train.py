"""Training-step throughput: hlip_fast against HLIP's padded fixed-shape pipeline.

One full contrastive step each — vision tower, text tower, projections, InfoNCE loss, backward
and AdamW update — on the same ragged studies and reports. hlip_fast packs the studies as they
are; the padded pipeline (HLIP's recipe, ``hlip_fast/padded_hlip.py`` with timm blocks) resizes
every scan to one depth and fills every study to a fixed scan count by repeating its scans.
Reported: studies per second (median of ``--repeats`` passes over all steps), peak memory
per study (GPU: ``max_memory_allocated``; CPU: the peak resident-set growth of a child
process that runs only that pipeline), and where a step's time goes: one more pass under
``torch.profiler`` with the forward, backward and optimizer phases marked (CPU time, or the
GPU's time on CUDA). Batches are made before timing and one process runs each pipeline, so
there is no data wait or communication here; ``hlip-train --profile-steps N`` gives the same
breakdown of a real run with both (``metrics.jsonl``, a console line, a Chrome trace).

With ``--torchcompile`` both pipelines are compiled (hlip_fast: ``model.visual.compile()`` and
the text tower, dynamic shapes; padded: its ViT and BERT); the warm-up pass compiles.

    python bench/train.py                      # CPU: small model, ragged brain-MRI mix
    python bench/train.py --preset ct-rate     # GPU: ViT-B, CT-RATE-shaped volumes, bf16
    python bench/train.py --preset ct-rate --torchcompile
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import tempfile

import torch
from common import measure, median, write_results
from encoder_cpu import ragged_mix
from transformers import BertModel

from hlip_fast import create_clip, pack_studies
from hlip_fast.losses import ClipLoss
from hlip_fast.models.registry import get_config
from hlip_fast.padded_hlip import OriginalHLIPClip
from hlip_fast.text import TextConfig, build_tiny_text_model
from hlip_fast.train.profiling import StepProfiler, phase

REPORT = "There is a small mass in the left hemisphere. No haemorrhage. The ventricles are normal in size."
PRESETS = {
    # CPU: the encoder benchmark's small model on the ragged brain-MRI mix.
    "brain-mri": dict(
        model="vit_base_multiscan_h2_token1176",
        overrides=dict(embed_dim=96, num_heads=2, depth=3, levels=("scan", "scan", "study")),
        text=dict(hidden=64, layers=2, heads=2),
        studies=11,
        batch=2,
        in_plane=224,
        fixed_depth=48,
        padded_scans=12,
    ),
    # GPU: HLIP's chest CT model (ViT-B, 112×336×336 volumes, 2,744 tokens each), BERT-base text.
    "ct-rate": dict(
        model="vit_base_singlescan_h2_token2744",
        overrides=dict(),
        text=dict(hidden=768, layers=12, heads=12),
        studies=32,
        batch=16,
        in_plane=336,
        fixed_depth=112,
        padded_scans=1,
    ),
}


def studies_for(preset: dict, gen: torch.Generator) -> list[list[int]]:
    """Scan depths per study: the ragged brain-MRI mix, or one 112-slice volume per study."""
    if preset["padded_scans"] == 1:
        return [[preset["fixed_depth"]] for _ in range(preset["studies"])]
    return ragged_mix(gen, preset["studies"])


def make_models(preset: dict, text_dir: str, device: torch.device):
    vision = get_config(preset["model"], **preset["overrides"])
    packed = create_clip(vision, TextConfig(text_dir, lock=False, pooling="cls"), embed_dim=512)
    padded = OriginalHLIPClip(vision, BertModel.from_pretrained(text_dir, add_pooling_layer=False), 512)
    return packed.to(device).train(), padded.to(device).train()


PHASES = ("forward", "backward", "optimizer")  # no data wait or communication here


def step(forward, optimizer) -> None:
    """One training step, its phases marked for the profiler as hlip-train marks them."""
    with phase("forward"):
        value = forward()
    with phase("backward"):
        value.backward()
    with phase("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def phase_seconds(run, device: torch.device) -> dict[str, float]:
    """Seconds of each phase in one pass of ``run`` under the profiler (GPU time on CUDA)."""
    profiler = StepProfiler(0, 1, device)
    profiler.begin(0)
    run()
    return {name: seconds for name, seconds in profiler.finish().items() if name in PHASES}


def packed_steps(model, depths, preset, gen, device, dtype):
    pd = model.config.vision.patch_size[0]
    size = preset["in_plane"]
    steps = []
    for start in range(0, len(depths), preset["batch"]):
        chunk = depths[start : start + preset["batch"]]
        studies = [[torch.randn(math.ceil(d / pd) * pd, size, size, generator=gen) for d in s] for s in chunk]
        batch = pack_studies(studies, model.config.vision.patch_size).to(device)
        tokens = model.tokenize([REPORT] * len(chunk))
        steps.append((batch, tokens))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss = ClipLoss()

    def forward(batch, tokens):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(batch, tokens)
            return loss(out["study_features"], out["text_features"], out["logit_scale"])

    def run():
        for batch, tokens in steps:
            step(lambda batch=batch, tokens=tokens: forward(batch, tokens), optimizer)

    return run


def padded_steps(model, depths, preset, gen, device, dtype, tokenizer):
    size, depth, slots = preset["in_plane"], preset["fixed_depth"], preset["padded_scans"]
    steps = []
    for start in range(0, len(depths), preset["batch"]):
        chunk = depths[start : start + preset["batch"]]
        volumes = torch.randn(len(chunk), slots, 1, depth, size, size, generator=gen)
        for i, study in enumerate(chunk):  # HLIP repeats a study's scans to fill its slots
            for slot in range(len(study), slots):
                volumes[i, slot] = volumes[i, slot % len(study)]
        tokens = tokenizer([REPORT] * len(chunk), padding=True, return_tensors="pt")
        steps.append(
            (volumes.to(device), tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss = ClipLoss()

    def forward(volumes, ids, mask):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return loss(model.encode_image(volumes), model.encode_text(ids, mask), model.logit_scale.exp())

    def run():
        for volumes, ids, mask in steps:
            step(lambda v=volumes, i=ids, m=mask: forward(v, i, m), optimizer)

    return run


def _pipeline(name: str, args, text_dir: str) -> dict:
    """Time one pipeline; on the CPU this runs in its own process so its peak RSS is its own."""
    preset, device = PRESETS[args.preset], torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(args.seed)
    depths = studies_for(preset, gen)
    packed, padded = make_models(preset, text_dir, device)
    if args.torchcompile:
        for module in (packed.visual, packed.text, padded.visual.trunk, padded.text.transformer):
            module.compile(dynamic=True)
    if name == "hlip_fast":
        del padded
        run = packed_steps(packed, depths, preset, gen, device, dtype)
    else:
        tokenizer = packed.text.tokenizer
        del packed
        run = padded_steps(padded, depths, preset, gen, device, dtype, tokenizer)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = measure(run, args.repeats, warmup=1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) * 1024
    studies = len(depths)
    return {
        "studies_per_s": studies / median(times),
        "seconds": times,
        "peak_mb_per_study": peak / 2**20 / preset["batch"],
        "phase_seconds": phase_seconds(run, device),
    }


def _child(name, args, text_dir, queue):
    try:
        queue.put(_pipeline(name, args, text_dir))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(error)
        raise


def run_isolated(name: str, args, text_dir: str) -> dict:
    if torch.device(args.device).type == "cuda":
        return _pipeline(name, args, text_dir)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(name, args, text_dir, queue))
    process.start()
    result = queue.get()
    process.join()
    if isinstance(result, BaseException):
        raise RuntimeError(f"the {name} pipeline failed in its process") from result
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torchcompile", action="store_true", help="torch.compile both pipelines")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("ct-rate" if args.device.startswith("cuda") else "brain-mri")
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as text_dir:
        build_tiny_text_model(text_dir, [REPORT], **preset["text"])
        results = {name: run_isolated(name, args, text_dir) for name in ("padded_hlip", "hlip_fast")}
    speedup = results["hlip_fast"]["studies_per_s"] / results["padded_hlip"]["studies_per_s"]
    compiled = ", compiled" if args.torchcompile else ""
    print(
        f"{args.preset} on {args.device}{compiled}: studies/s and peak MB per study (batch {preset['batch']})"
    )
    print(f"{'pipeline':<12} {'studies/s':>10} {'peak MB/study':>14}")
    for name, r in results.items():
        print(f"{name:<12} {r['studies_per_s']:>10.3f} {r['peak_mb_per_study']:>14.1f}")
    print(f"speed-up {speedup:.2f}x")
    print(
        "where a pass's time goes (one profiled pass; "
        + ("GPU time" if args.device.startswith("cuda") else "CPU time")
        + "):"
    )
    for name, r in results.items():
        total = sum(r["phase_seconds"].values())
        shares = ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in r["phase_seconds"].items())
        print(f"{name:<12} {shares}")
    if not args.no_write:
        config = {k: v for k, v in vars(args).items() if k != "no_write"}
        payload = {"config": config, "preset": preset, "results": results, "speedup": speedup}
        kind = "train_compiled" if args.torchcompile else "train"
        path = write_results(f"{kind}_{torch.device(args.device).type}", payload)
        print(f"wrote {path.relative_to(path.parents[2])}")


if __name__ == "__main__":
    main()
