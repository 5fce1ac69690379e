"""Data benchmark: the shard reader against HLIP's one-file-per-scan ``torch.load`` baseline.

Both read the same synthetic corpus with the same number of DataLoader workers and deliver the
same float32 scans per study; the baseline stores each scan as its own ``.pt`` file (as the
original HLIP does), hlip_fast as uint8 LZ4 slices in tar shards. Reports studies/s, volumes/s,
GB/s of delivered float32 voxels and bytes on disk, medians over ``--repeats`` full passes.
With CUDA (and ``nvidia-nvcomp-cu13``), also the nvCOMP GPU decode of the same shards.

The cost of verifying every study's checksums: the shard reader with and without verification,
as DataLoader rows and, less noisy, in one process with the two passes interleaved; and the
hashing alone (XXH3 over every shard byte) as a share of one verified pass.

    python bench/data.py [--studies 96] [--workers 2] [--repeats 3]
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
from hlip_fast.integrity import digest


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


def checksum_cost(root: Path, repeats: int) -> dict[str, float]:
    """Seconds of one in-process pass over the decoded studies with and without checksum
    verification (passes interleaved, medians), and of hashing every shard byte alone."""
    passes: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for verify in (True, False):
            start = time.perf_counter()
            drain(DecodedStudies(root, verify))
            passes[verify].append(time.perf_counter() - start)
    blobs = [path.read_bytes() for path in list_shards(root)]
    hashing = median(measure(lambda: [digest(b) for b in blobs], repeats))
    verified, unverified = median(passes[True]), median(passes[False])
    return {
        "verified_s": verified,
        "unverified_s": unverified,
        "overhead": verified / unverified - 1,
        "hashing_s": hashing,
        "hashing_share": hashing / verified,
        "hash_gb_per_s": sum(map(len, blobs)) / hashing / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = replace(SIZES["medium"], num_studies=args.studies, seed=1)
    work = Path(tempfile.mkdtemp(prefix="hlip_data_bench_"))
    synthesize(
        work / "shards", config, PrepareConfig(studies_per_shard=16), workers=args.workers, progress=False
    )
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
        "hlip_fast_shards_unverified": lambda: DataLoader(
            DecodedStudies(work / "shards", verify=False), batch_size=None, num_workers=args.workers
        ),
    }
    disk["hlip_fast_shards_unverified"] = disk["hlip_fast_shards"]
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
    cost = checksum_cost(work / "shards", max(5, args.repeats))
    by_name = {r["reader"]: r["studies_per_s"] for r in rows}
    loader_overhead = by_name["hlip_fast_shards_unverified"] / by_name["hlip_fast_shards"] - 1
    print(
        f"checksums: {100 * loader_overhead:+.1f}% time with DataLoader workers; in one process "
        f"{100 * cost['overhead']:+.1f}% ({cost['verified_s']:.3f} vs {cost['unverified_s']:.3f} s a pass); "
        f"hashing alone {100 * cost['hashing_share']:.2f}% of a pass ({cost['hash_gb_per_s']:.1f} GB/s)"
    )
    device = "gpu" if torch.cuda.is_available() else "cpu"
    settings = {
        "studies": args.studies,
        "workers": args.workers,
        "repeats": args.repeats,
        "grid": config.grid,
    }
    checksums = {"dataloader_overhead": loader_overhead, **cost}
    path = write_results(f"data_{device}", {"config": settings, "results": rows, "checksums": checksums})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
