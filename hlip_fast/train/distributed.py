"""Process group setup for ``torchrun`` (DDP/FSDP2) and the single-process case."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

from hlip_fast.cli_options import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by ``torchrun`` (NCCL on CUDA, gloo on the CPU);
    ``auto`` is this rank's GPU when there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device)
    if device in ("", "auto") and target.type == "cuda":
        target = torch.device("cuda", local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, world_size, target)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """End this process with ``status``. A rank of a multi-process run (``WORLD_SIZE`` > 1) skips
    Python's interpreter teardown, after flushing its logs and output, because that teardown can
    abort a run that succeeded: once a DDP model was built, gloo's worker threads outlive
    :func:`teardown`, and one that drops its last reference to a Python-made tensor (a
    ``broadcast_object_list`` buffer) after teardown has begun ends the process with SIGABRT,
    "terminate called without an active exception". Call it after :func:`teardown`; it must be
    the last thing the process does."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (a device scalar, 0.0 or 1.0), 1.0 where any rank has 1.0: a collective on the
    device, no host sync."""
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def reduce_packed(values: torch.Tensor) -> list[float]:
    """Sums over ranks of a 1-D float64 tensor of numbers, in one collective, read on the host
    (one sync)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values.tolist()


def reduce_sum(value: float, device: torch.device) -> float:
    """Sum of ``value`` over ranks (the value itself in one process)."""
    return reduce_sums([value], device)[0]


def reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sums of ``values`` over ranks in one collective."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def on_main(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 only; its exception is raised on every rank, so no rank waits forever
    at the next collective for one that failed. The other ranks get ``None``."""
    if not dist.is_initialized():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 - re-raised on every rank just below
            error = caught
    error = broadcast(error)
    if error is not None:
        raise error
    return result


def broadcast(value, src: int = 0):
    """Rank ``src``'s picklable ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(value) -> list:
    """Every rank's picklable ``value`` on every rank, in rank order."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank when FSDP2 shards it: a collective)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (its shard under FSDP2)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
