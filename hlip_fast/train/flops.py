"""Model FLOPs of a training step, counted on the batch's real segment sizes, and the peak
throughput of known accelerators for model FLOP utilisation (MFU)."""

from __future__ import annotations

import numpy as np
import torch

from hlip_fast.layout import Layout
from hlip_fast.models import VisionConfig

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; fp32 runs as TF32.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A40": 149.7, "L4": 121.0}


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense 16-bit peak when it is a known GPU, else ``None`` (MFU not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _segments(layout: Layout, keep: float) -> dict[str, np.ndarray]:
    """Segment lengths per level after patch dropout keeps ``keep`` of every slice's tokens."""
    d, h, w = layout.grids.T
    per_row = np.maximum(1, np.round(keep * h * w)) if keep < 1 else h * w
    scan = d * per_row
    groups = -(-d // layout.slice_depth)
    slices = np.concatenate(
        [
            np.minimum(layout.slice_depth, dd - layout.slice_depth * np.arange(g)) * r
            for dd, g, r in zip(d, groups, per_row)
        ]
    )
    study = np.bincount(layout.scan_study, weights=scan, minlength=layout.num_studies)
    return {"slice": slices, "scan": scan, "study": study}


def vision_forward_flops(config: VisionConfig, layout: Layout, patch_dropout: float = 0.0) -> float:
    """Patch embedding, every block's linears (patch rows and class-token copies) and attention
    (``4 L² C`` per segment of ``L`` rows, class copy included)."""
    c, hidden = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    segments = _segments(layout, 1.0 - patch_dropout)
    tokens = float(segments["scan"].sum())
    patch = 2.0 * layout.num_tokens * config.in_chans * int(np.prod(config.patch_size)) * c
    total = patch
    for level in config.levels:
        lengths = segments[level].astype(np.float64) + 1  # + the segment's class-token copy
        rows = tokens + len(lengths)
        total += 2.0 * rows * c * (4 * c + 2 * hidden) + 4.0 * c * float((lengths**2).sum())
    return total


def text_forward_flops(config, attention_mask: torch.Tensor) -> float:
    """A BERT-style encoder on the real (unpadded) lengths of a tokenised batch (its mask on the
    host, as the tokenizer makes it: read with NumPy, never a device sync)."""
    lengths = attention_mask.numpy().sum(1, dtype=np.float64)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 2.0 * float(lengths.sum()) * (4 * h * h + 2 * h * i) + 4.0 * h * float((lengths**2).sum())
    return layers * per_layer


def train_step_flops(model, layout: Layout, attention_mask: torch.Tensor) -> float:
    """Forward + backward (3× forward for the trained vision tower; 2× for a locked text tower,
    whose weights get no gradients but whose activations do)."""
    vision = vision_forward_flops(model.config.vision, layout, model.config.vision.patch_dropout)
    text = text_forward_flops(model.text.transformer.config, attention_mask)
    locked = model.config.text.lock and model.config.text.unlocked_layers == 0
    return 3.0 * vision + (2.0 if locked else 3.0) * text
