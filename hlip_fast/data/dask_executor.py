"""``prepare`` on a Dask cluster (``hlip-prepare ... --executor dask --scheduler tcp://HOST:PORT``,
or a ``distributed.Client`` given to the Python API): the cluster users already run, on SLURM
through dask-jobqueue or on Kubernetes through dask-kubernetes.

One task per unfinished shard: the worker that runs it prepares the shard's studies one by one
(the same per-study job as a local run) and writes the shard and its side file into the output
folder, which must be on storage the workers share. Shards are the same bytes as a local run's.
A worker that dies is noticed by the scheduler and its task is run again elsewhere (the shard is
written through a temporary file, so nothing is written twice); a shard whose task kills
workers every time is redone study by study, and a study that still kills its worker is
skipped with the reason, as the local pool does.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .shards import PREPARE_CONFIG

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 20


@contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator:
    """A ``distributed.Client`` of the scheduler at ``scheduler``, or of a local cluster of
    ``workers`` one-thread processes when it is ``None`` (closed with the client); a one-line
    error naming ``--scheduler`` when none answers."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise RuntimeError("--executor dask needs dask.distributed: pip install 'hlip-fast[dask]'") from None
    with ExitStack() as stack:
        if scheduler is None:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
            client = stack.enter_context(Client(stack.enter_context(cluster)))
        else:
            try:
                client = stack.enter_context(Client(scheduler, timeout=CONNECT_TIMEOUT_S))
            except (OSError, TimeoutError, ValueError) as error:
                raise ValueError(
                    f"--scheduler {scheduler}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s "
                    f"({type(error).__name__}: {error})"
                ) from None
        yield client


def _prepare_shard(job, studies: list, run: Callable, root: str) -> int:
    """On a worker: prepare and write one shard; returns its number of studies."""
    import torch

    torch.set_num_threads(1)  # the worker's threads are the parallelism
    if not (Path(root) / PREPARE_CONFIG).is_file():
        raise FileNotFoundError(
            f"{root}: not visible from Dask worker {socket.gethostname()}; the output folder must be "
            "on storage every worker shares"
        )
    return job.write(run(study) for study in studies)


def run_on_dask(
    client, root: Path, shard_jobs: list, run: Callable, lost: Callable, progress: Callable
) -> None:
    """Write every ``(ShardJob, jobs)`` of ``shard_jobs`` on the cluster of ``client``, calling
    ``progress(n)`` as each shard's ``n`` studies finish; the first other error stops the run."""
    from distributed import KilledWorker, as_completed

    run_id = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            _prepare_shard,
            job,
            studies,
            run,
            str(root),
            key=f"hlip-prepare-{job.path.stem}-{run_id}",
            pure=False,
        ): (job, studies)
        for job, studies in shard_jobs
    }
    try:
        for future in as_completed(futures):
            job, studies = futures[future]
            try:
                progress(future.result())
            except KilledWorker:
                log.warning(
                    "%s: its task killed the workers that ran it; retrying its studies one by one",
                    job.path.name,
                )
                progress(job.write(_one_by_one(client, studies, run, lost, run_id)))
    finally:
        client.cancel(list(futures))


def _one_by_one(client, studies: list, run: Callable, lost: Callable, run_id: str):
    """Each study of a shard as its own task, in order; one that kills its workers is lost."""
    from distributed import KilledWorker

    futures = [
        client.submit(run, study, key=f"hlip-prepare-study-{run_id}-{uuid.uuid4().hex}") for study in studies
    ]
    for study, future in zip(studies, futures):
        try:
            yield future.result()
        except KilledWorker:
            yield lost(
                study,
                "the Dask workers preparing it died each time (killed, e.g. by the out-of-memory killer)",
            )
