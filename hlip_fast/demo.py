"""Demo: a small HLIP encoder on a ragged synthetic batch, once per attention backend.

Prints each level's segment statistics, then for every backend the forward and
forward+backward time and how far its outputs and gradients are from the reference backend.
Run ``python -m hlip_fast.demo --help`` for options.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING

from .boundary import command
from .cli_options import DEVICE_HELP, new_parser, resolve_device

if TYPE_CHECKING:
    import torch


def synthetic_studies(
    generator: torch.Generator, num_studies: int, patch: tuple[int, int, int]
) -> list[list[torch.Tensor]]:
    """Random studies of 1-4 scans, each with its own depth and in-plane size (patch multiples)."""
    import torch

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    pd, ph, pw = patch
    return [
        [
            torch.randn(
                pd * pick([1, 2, 3, 4, 5]), ph * pick([3, 4]), pw * pick([3, 4, 5]), generator=generator
            )
            for _ in range(pick([1, 2, 3, 4]))
        ]
        for _ in range(num_studies)
    ]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median milliseconds of ``repeats`` calls of ``fn`` (after one warm-up) and its last result;
    on CUDA each call is timed to the end of its kernels, not of their launch."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    result = fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def relative_error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Largest error over all parameters, each relative to that parameter's largest gradient."""
    return max(
        ((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        for g, r in zip(grads, reference)
    )


def parser() -> argparse.ArgumentParser:
    parser = new_parser("python -m hlip_fast.demo", __doc__)
    parser.add_argument(
        "--model", default="vit_tiny_multiscan_h3", help="encoder config (hlip_fast.list_models())"
    )
    parser.add_argument("--studies", type=int, default=4, help="ragged studies in the batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend (medians shown)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the studies and weights")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    return parser


@command("python -m hlip_fast.demo")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import copy

    import numpy as np
    import torch

    from . import create_model, list_backends, pack_studies
    from .attention import available_backends

    args.device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = create_model(args.model).to(args.device).eval()
    studies = synthetic_studies(
        torch.Generator().manual_seed(args.seed), args.studies, model.config.patch_size
    )
    batch = pack_studies(studies, model.config.patch_size).to(args.device)
    layout = batch.layout

    cfg = model.config
    print(f"model {args.model}: width {cfg.embed_dim}, {cfg.depth} blocks at levels {', '.join(cfg.levels)}")
    print(
        f"batch: {layout.num_studies} studies, {layout.num_scans} scans, {layout.num_tokens} tokens "
        f"(scans per study {np.bincount(layout.scan_study).tolist()})\n"
    )
    print(f"{'level':<6} {'segments':>8} {'min':>6} {'median':>8} {'mean':>8} {'max':>6}")
    for level, s in layout.describe().items():
        print(
            f"{level:<6} {s['segments']:>8} {s['min']:>6} {s['median']:>8.1f} {s['mean']:>8.1f} {s['max']:>6}"
        )

    def forward(model=model, batch=batch):
        with torch.no_grad():
            return model(batch)

    def forward_backward(model=model, batch=batch):
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    # The yardstick: the reference backend in float64.
    exact = copy.deepcopy(model).double()
    exact.set_attention_backend("reference")
    ref_out, ref_grads = forward_backward(exact, batch.to(args.device, torch.float64))

    probe = torch.zeros(
        layout.num_tokens,
        cfg.num_heads,
        cfg.embed_dim // cfg.num_heads,
        device=args.device,
        requires_grad=True,
    )
    results, skipped = {}, {}
    with torch.no_grad():
        runs = available_backends(probe, probe, probe, layout, "study")
    trains = available_backends(probe, probe, probe, layout, "study")
    for backend in list_backends():
        if runs[backend] is not None:
            skipped[backend] = runs[backend]
            continue
        model.set_attention_backend(backend)
        fwd_ms, out = timed(forward, args.repeats)
        if trains[backend] is None:
            bwd_ms, (_, grads) = timed(forward_backward, args.repeats)
        else:
            bwd_ms, grads = None, None
        results[backend] = (fwd_ms, bwd_ms, out, grads)

    print(f"\nAgreement with the float64 reference; {cfg.embed_dim}-wide float32 model on {args.device}.")
    print(f"{'backend':<10} {'fwd ms':>8} {'fwd+bwd ms':>11} {'max |out err|':>14} {'max grad err':>13}")
    for backend, (fwd_ms, bwd_ms, out, grads) in results.items():
        out_err = f"{(out.double() - ref_out).abs().max().item():.1e}"
        if grads is None:
            bwd, grad_err = "n/a", "n/a"
        else:
            bwd, grad_err = f"{bwd_ms:.1f}", f"{relative_error(grads, ref_grads):.1e}"
        print(f"{backend:<10} {fwd_ms:>8.1f} {bwd:>11} {out_err:>14} {grad_err:>13}")
    print("n/a: the backend has no backward on this device (flex's CPU path is forward-only).")
    for backend, reason in skipped.items():
        print(f"{backend}: not run here ({reason})")
    print(
        "\nTimes are medians of",
        args.repeats,
        "runs on",
        args.device,
        "(a demo, not a benchmark: see bench/ for measured comparisons).",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
