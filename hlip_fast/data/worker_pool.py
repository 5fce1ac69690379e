"""A crash-tolerant ordered process pool: every job's result in job order, on spawned worker
processes, surviving workers that die (the out-of-memory killer, a segfault in a reader) without
losing or repeating anything and without waiting on a dead process."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

log = logging.getLogger(__name__)
J = TypeVar("J")
R = TypeVar("R")


def in_order(run: Callable[[J], R], jobs: list[J], workers: int, lost: Callable[[J, str], R]) -> Iterator[R]:
    """``run(job)`` for every job, results in job order, on ``workers`` spawned processes (at
    most ``2 × workers`` jobs in flight). When a worker dies, the jobs in flight that had not
    finished are run again, each in a fresh process of its own; one that kills that process too
    gives ``lost(job, reason)`` as its result. Never waits on a dead process."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(run, jobs)
        return
    context = multiprocessing.get_context("spawn")

    def new_pool(size: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            size, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)
        )

    def isolated(suspects: list[int]) -> None:
        """Run each suspect alone on a one-process pool; a job that kills it is fatal, unless
        a fresh process cannot even run a no-op (then no worker can start: an error)."""
        single = new_pool(1)
        try:
            for j in suspects:
                done: Future = Future()
                try:
                    done.set_result(single.submit(run, jobs[j]).result())
                except BrokenProcessPool:
                    single.shutdown(wait=False, cancel_futures=True)
                    single = new_pool(1)
                    try:
                        single.submit(os.getpid).result()
                    except BrokenProcessPool:
                        raise ChildProcessError(
                            "worker processes die as they start; run with --workers 1 to see the error"
                        ) from None
                    reason = "the process preparing it died twice (killed, e.g. by the out-of-memory killer)"
                    done.set_result(lost(jobs[j], reason))
                futures[j] = done
        finally:
            single.shutdown(wait=False, cancel_futures=True)

    pool, futures, submitted = new_pool(workers), {}, 0
    try:
        for i in range(len(jobs)):
            while submitted < min(len(jobs), i + 2 * workers):
                futures[submitted] = pool.submit(run, jobs[submitted])
                submitted += 1
            try:
                result = futures[i].result()
            except BrokenProcessPool:
                log.warning("a worker process died; retrying its jobs one by one")
                pool.shutdown(wait=False, cancel_futures=True)
                isolated([j for j, f in futures.items() if not (f.done() and f.exception() is None)])
                pool = new_pool(workers)
                result = futures[i].result()
            del futures[i]
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


PARENT_CHECK_S = 0.5
"""How often a worker looks whether its parent still lives."""


def _start_worker(parent: int) -> None:
    """One torch thread per worker, and a watch that ends the worker when its parent dies: a
    parent killed by SIGKILL (the out-of-memory killer, a scheduler) runs no clean-up, and its
    workers would otherwise wait on their result pipes for ever, holding their memory."""
    import torch

    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is re-parented (to init or a subreaper)
        time.sleep(PARENT_CHECK_S)
    os._exit(1)
