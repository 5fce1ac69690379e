"""CLIP, SigLIP and dual losses: 2 gloo ranks against one process on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hlip_fast.losses import ClipLoss, DualClipLoss, SigLipLoss

WORLD, PER_RANK, DIM = 2, 3, 8


def batch(seed: int, pairs: bool = False):
    g = torch.Generator().manual_seed(seed)
    shape = (WORLD * PER_RANK, 2, DIM) if pairs else (WORLD * PER_RANK, DIM)
    image = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)


def loss_fn(kind: str):
    if kind == "siglip":
        return SigLipLoss(), True
    if kind == "dual":
        return DualClipLoss(local_loss=True, gather_with_grad=True), False
    local, with_grad = {"clip_local_grad": (True, True), "clip_global_grad": (False, True)}[kind]
    return ClipLoss(local_loss=local, gather_with_grad=with_grad), False


def compute(kind: str, image, text, scale, bias):
    loss, sig = loss_fn(kind)
    return loss(image, text, scale, bias) if sig else loss(image, text, scale)


def rank_main(rank: int, init_file: str, kind: str, seed: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    image, text, scale, bias = batch(seed, kind == "dual")
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
    loss = compute(kind, image, text, scale, bias)
    loss.backward()
    torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip_local_grad", "clip_global_grad", "siglip", "dual"])
def test_two_gloo_ranks_match_one_process(kind, tmp_path, seed):
    mp.spawn(
        rank_main, args=(str(tmp_path / "init"), kind, seed, str(tmp_path / "out")), nprocs=WORLD, join=True
    )
    image, text, scale, bias = batch(seed, kind == "dual")
    image.requires_grad_()
    text.requires_grad_()
    full = compute(kind, image, text, scale, bias)
    full.backward()
    results = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(WORLD)]
    mean_loss = sum(r["loss"] for r in results) / WORLD
    torch.testing.assert_close(mean_loss, full.detach(), rtol=1e-10, atol=1e-12)
    # DDP averages parameter gradients over ranks: rank r's feature gradient / WORLD is the
    # full-batch gradient of its rows.
    for r, result in enumerate(results):
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        torch.testing.assert_close(result["image"] / WORLD, image.grad[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["text"] / WORLD, text.grad[rows], rtol=1e-10, atol=1e-12)


def test_single_process_clip_matches_definition(seed):
    image, text, scale, _ = batch(seed)
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    expected = (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    torch.testing.assert_close(ClipLoss()(image, text, scale), expected)


def test_dual_loss_is_half_sentence_half_report(seed):
    image, text, scale, _ = batch(seed, pairs=True)
    clip = ClipLoss()
    expected = 0.5 * clip(image[:, 0], text[:, 0], scale) + 0.5 * clip(image[:, 1], text[:, 1], scale)
    torch.testing.assert_close(DualClipLoss()(image, text, scale), expected)
    swapped = DualClipLoss()(image, text.flip(1), scale)
    assert not torch.allclose(swapped, expected)  # which embedding meets which text matters
    with pytest.raises(ValueError, match=r"\(n, 2, E\)"):
        DualClipLoss()(image[:, 0], text[:, 0], scale)
