"""Data benchmark: the shard reader against HLIP's one-file-per-scan ``torch.load`` baseline.

Both read the same synthetic corpus with the same number of DataLoader workers and deliver the
same float32 scans per study; the baseline stores each scan as its own ``.pt`` file (as the
original HLIP does), hlip_fast as uint8 LZ4 slices in tar shards. Reports studies/s, volumes/s,
GB/s of delivered float32 voxels and bytes on disk, medians over ``--repeats`` full passes.
With CUDA (and ``nvidia-nvcomp-cu13``), also the nvCOMP GPU decode of the same shards.

The cost of verifying every study's checksums: passes with and without verification,
interleaved, through the DataLoader workers (the reader's throughput) and in one process (the
CPU time per study; noisy on a shared machine).

    python bench/data.py [--studies 96] [--workers 2] [--repeats 3] [--checksum-repeats 11]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import measure, median, write_results
from torch.utils.data import DataLoader, Dataset, IterableDataset

from hlip_fast.data import PrepareConfig, list_shards
from hlip_fast.data.reader import RawStudies, StudyBatches, decode_cpu
from hlip_fast.data.synth import SIZES, synthesize


class PtFiles(Dataset):
    """The baseline: one ``.pt`` float32 tensor per scan, loaded with ``torch.load``."""

    def __init__(self, studies: list[list[Path]]):
        self.studies = studies

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [torch.load(path, weights_only=True) for path in self.studies[i]]


class DecodedStudies(IterableDataset):
    """hlip_fast's CPU reader up to decoded, normalised studies (no batching, like the baseline)."""

    def __init__(self, root: Path, verify: bool = True):
        self.batches = StudyBatches(RawStudies(root, verify=verify))

    def __iter__(self):
        return (study.scans for study in self.batches.studies())


def write_baseline(root: Path, out: Path) -> list[list[Path]]:
    studies = []
    for shard in list_shards(root):
        for number, raw in enumerate(RawStudies([shard])):
            paths = []
            for k, scan in enumerate(decode_cpu(raw)):
                path = out / f"{shard.stem}_{number:04d}_{k:02d}.pt"
                torch.save(scan.float() / 255.0, path)
                paths.append(path)
            studies.append(paths)
    return studies


def drain(loader) -> tuple[int, int, int]:
    studies = volumes = voxels = 0
    for scans in loader:
        studies += 1
        volumes += len(scans)
        voxels += sum(s.numel() for s in scans)
    return studies, volumes, voxels


def checksum_cost(root: Path, workers: int, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds of a pass over the decoded studies with and without checksum verification
    (passes interleaved, medians): through DataLoader workers as benchmarked above, and in one
    process (the CPU time per study)."""
    makers = {
        "reader": lambda verify: DataLoader(
            DecodedStudies(root, verify), batch_size=None, num_workers=workers
        ),
        "one_process": lambda verify: DecodedStudies(root, verify),
    }
    cost: dict[str, dict[str, float]] = {}
    for name, make in makers.items():
        passes: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats):
            for verify in (True, False):
                start = time.perf_counter()
                drain(make(verify))
                passes[verify].append(time.perf_counter() - start)
        on, off = median(passes[True]), median(passes[False])
        cost[name] = {"verified_s": on, "unverified_s": off, "overhead": on / off - 1}
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--checksum-repeats", type=int, default=11, help="interleaved passes with and without checksums"
    )
    args = parser.parse_args()
    if min(args.studies, args.workers + 1, args.repeats, args.checksum_repeats) < 1:
        parser.error("--studies, --repeats and --checksum-repeats must be >= 1, --workers >= 0")
    config = replace(SIZES["medium"], num_studies=args.studies, seed=1)
    work = Path(tempfile.mkdtemp(prefix="hlip_data_bench_"))
    synthesize(work / "shards", config, PrepareConfig(studies_per_shard=16), workers=args.workers)
    (work / "pt").mkdir()
    baseline_files = write_baseline(work / "shards", work / "pt")
    disk = {
        "torch_load_pt": sum(p.stat().st_size for s in baseline_files for p in s),
        "hlip_fast_shards": sum(p.stat().st_size for p in list_shards(work / "shards")),
    }
    loaders = {
        "torch_load_pt": lambda: DataLoader(
            PtFiles(baseline_files), batch_size=None, num_workers=args.workers, shuffle=True
        ),
        "hlip_fast_shards": lambda: DataLoader(
            DecodedStudies(work / "shards"), batch_size=None, num_workers=args.workers
        ),
    }
    if torch.cuda.is_available():
        try:
            from hlip_fast.data.gpu import NvcompDecoder

            decoder = NvcompDecoder("cuda")
            gpu = StudyBatches(RawStudies(work / "shards"), decode=decoder)
            loaders["hlip_fast_nvcomp_gpu"] = lambda: (s.scans for s in gpu.studies())
            disk["hlip_fast_nvcomp_gpu"] = disk["hlip_fast_shards"]
        except RuntimeError as error:
            print(f"nvCOMP skipped: {error}")
    rows = []
    for name, make in loaders.items():
        counts = {}
        times = measure(
            lambda make=make, counts=counts: counts.update(zip(("s", "v", "x"), drain(make()))), args.repeats
        )
        t = median(times)
        rows.append(
            {
                "reader": name,
                "seconds": t,
                "studies_per_s": counts["s"] / t,
                "volumes_per_s": counts["v"] / t,
                "gb_per_s": counts["x"] * 4 / t / 1e9,
                "disk_mb": disk[name] / 1e6,
                "studies": counts["s"],
                "volumes": counts["v"],
            }
        )
    base = rows[0]["studies_per_s"]
    print(
        f"{config.num_studies} studies, grid {config.grid}, {args.workers} workers, median of {args.repeats}"
    )
    print("| reader | studies/s | volumes/s | GB/s (float32 out) | on disk (MB) | vs torch.load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['reader']} | {r['studies_per_s']:.1f} | {r['volumes_per_s']:.1f} | {r['gb_per_s']:.3f} "
            f"| {r['disk_mb']:.1f} | {r['studies_per_s'] / base:.2f}× |"
        )
    cost = checksum_cost(work / "shards", args.workers, args.checksum_repeats)
    reader, alone = cost["reader"], cost["one_process"]
    print(
        f"checksums: {100 * reader['overhead']:+.1f}% reader time ({args.workers} DataLoader workers), "
        f"{100 * alone['overhead']:+.1f}% in one process ({alone['verified_s']:.3f} vs "
        f"{alone['unverified_s']:.3f} s a pass), medians of {args.checksum_repeats} interleaved passes"
    )
    device = "gpu" if torch.cuda.is_available() else "cpu"
    settings = {
        "studies": args.studies,
        "workers": args.workers,
        "repeats": args.repeats,
        "checksum_repeats": args.checksum_repeats,
        "grid": config.grid,
    }
    path = write_results(f"data_{device}", {"config": settings, "results": rows, "checksums": cost})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
