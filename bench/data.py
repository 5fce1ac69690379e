"""Data benchmark: the shard reader against HLIP's one-file-per-scan ``torch.load`` baseline.

Both read the same synthetic corpus with the same number of DataLoader workers and deliver the
same float32 scans per study; the baseline stores each scan as its own ``.pt`` file (as the
original HLIP does), hlip_fast as uint8 LZ4 slices in tar shards. Reports studies/s, volumes/s,
GB/s of delivered float32 voxels and bytes on disk, medians over ``--repeats`` full passes.
With CUDA (and ``nvidia-nvcomp-cu13``), also the nvCOMP GPU decode of the same shards.

``--preset ct-rate``: HLIP's chest-CT shape (one 112×336×336 uint8 scan per study) instead of
the ``medium`` brain-MRI-like corpus, as the trainer reads it: token-budget batches cut with
HLIP's chest-CT patch (8×24×24), made in DataLoader workers. The baseline is the reader as the
data-at-scale issue found it: ``(x / max - mean) / std`` in three float32 passes per scan, and
float32 batches from the workers. hlip_fast's reader sends the stored uint8 patches with each
scan's intensity map, applied where the batch lands: timed as delivered (on a GPU host the map
runs on the device) and landed on this CPU (``batch.to("cpu")`` in the main process, which
shares the cores with the workers). Volumes/s and GB/s (of float32 model input) per CPU core,
and the projection to a 16-core GPU host against HLIP's training rate (150 volumes/s; a reader
should give twice that). No ``torch.load`` files: they would take 50 MB per volume.

The cost of verifying every study's checksums: passes with and without verification,
interleaved, through the DataLoader workers (the reader's throughput) and in one process (the
CPU time per study; noisy on a shared machine).

    python bench/data.py [--preset medium|ct-rate] [--studies 96] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import measure, median, write_results
from torch.utils.data import DataLoader, Dataset, IterableDataset

from hlip_fast.data import PrepareConfig, list_shards
from hlip_fast.data.batching import Batch, BatchConfig
from hlip_fast.data.config import HLIP_INPUT_MEAN, HLIP_INPUT_STD
from hlip_fast.data.reader import RawStudies, StudyBatches, decode_cpu, token_batches
from hlip_fast.data.synth import SIZES, SynthConfig, synthesize
from hlip_fast.data.transforms import Study, TransformConfig
from hlip_fast.models.registry import get_config

PRESETS = {
    "medium": replace(SIZES["medium"], seed=1),
    "ct-rate": SynthConfig(
        num_studies=24, modality="CT", max_scans=1, depth_range=(112, 112), grid=(336, 336), seed=1
    ),
}
"""The corpora: brain-MRI-like studies (1-6 scans of 16-48 slices, 96×96), or HLIP's chest CT."""
CT_RATE_BATCHING = BatchConfig(
    get_config("vit_base_singlescan_h2_token2744").patch_size, max_tokens=4 * 2744, group_size=8
)
"""``ct-rate`` batches: HLIP's chest-CT patch, 4 volumes of 2,744 tokens a batch."""
TRAINING_RATE, HOST_CORES = 150.0, 16
"""HLIP's ViT-B chest-CT training rate on one GPU (volumes/s) and the cores of the GPU host the
per-core rate is projected to."""


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

    def __init__(self, root: Path, verify: bool = True, transforms: TransformConfig | None = None):
        self.batches = StudyBatches(RawStudies(root, verify=verify), transforms)

    def __iter__(self):
        return (study.normalised() for study in self.batches.studies())


class UnfusedBatches(IterableDataset):
    """The baseline of ``--preset ct-rate``: the same decoded bytes normalised as the reader did
    when the data-at-scale issue was filed (``(x.float() / max - mean) / std``: three float32
    passes and temporaries), batched as float32."""

    def __init__(self, root: Path, transforms: TransformConfig, batching: BatchConfig):
        self.raws, self.transforms, self.batching = RawStudies(root), transforms, batching

    def _studies(self):
        t = self.transforms
        for raw in self.raws:
            top = float(np.iinfo(raw.meta["dtype"]).max)
            scans = [(scan.to(torch.float32) / top - t.mean) / t.std for scan in decode_cpu(raw)]
            yield Study(raw.study_id, scans, raw.meta["report"])

    def __iter__(self):
        return token_batches(self._studies(), self.transforms, self.batching)


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
    """Studies, volumes and voxels a pass delivers (studies as scan lists, or batches)."""
    studies = volumes = voxels = 0
    for item in loader:
        if isinstance(item, Batch):
            studies += len(item.study_ids)
            volumes += item.studies.layout.num_scans
            voxels += item.studies.patches.numel()
        else:
            studies += 1
            volumes += len(item)
            voxels += sum(s.numel() for s in item)
    return studies, volumes, voxels


def landed(loader, device: str):
    """The loader's batches moved to ``device`` (integer patches mapped to float32 there)."""
    for batch in loader:
        batch.studies = batch.studies.to(device)
        yield batch


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


def loaders_and_disk(preset: str, root: Path, workers: int) -> tuple[dict, dict]:
    """The readers to time (the baseline first) and the bytes each reads from disk."""
    shards = sum(p.stat().st_size for p in list_shards(root / "shards"))
    if preset == "ct-rate":
        hlip = TransformConfig(mean=HLIP_INPUT_MEAN, std=HLIP_INPUT_STD)

        def batches(dataset: IterableDataset) -> DataLoader:
            return DataLoader(dataset, batch_size=None, num_workers=workers)

        def shard_batches() -> DataLoader:
            return batches(StudyBatches(RawStudies(root / "shards"), hlip, CT_RATE_BATCHING))

        loaders = {
            "hlip_fast_unfused": lambda: batches(UnfusedBatches(root / "shards", hlip, CT_RATE_BATCHING)),
            "hlip_fast_shards": shard_batches,
            "hlip_fast_shards_landed_cpu": lambda: landed(shard_batches(), "cpu"),
        }
        if torch.cuda.is_available():
            loaders["hlip_fast_shards_landed_cuda"] = lambda: landed(shard_batches(), "cuda")
        return loaders, dict.fromkeys(loaders, shards)
    (root / "pt").mkdir()
    baseline_files = write_baseline(root / "shards", root / "pt")
    loaders = {
        "torch_load_pt": lambda: DataLoader(
            PtFiles(baseline_files), batch_size=None, num_workers=workers, shuffle=True
        ),
        "hlip_fast_shards": lambda: DataLoader(
            DecodedStudies(root / "shards"), batch_size=None, num_workers=workers
        ),
    }
    return loaders, {
        "torch_load_pt": sum(p.stat().st_size for s in baseline_files for p in s),
        "hlip_fast_shards": shards,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="medium", help="the corpus (see above)")
    parser.add_argument("--studies", type=int, help="studies (default: 96 for medium, 24 for ct-rate)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--checksum-repeats",
        type=int,
        default=11,
        help="interleaved passes with and without checksums (medium)",
    )
    args = parser.parse_args()
    studies = args.studies or (96 if args.preset == "medium" else PRESETS[args.preset].num_studies)
    if min(studies, args.workers + 1, args.repeats, args.checksum_repeats) < 1:
        parser.error("--studies, --repeats and --checksum-repeats must be >= 1, --workers >= 0")
    config = replace(PRESETS[args.preset], num_studies=studies)
    work = Path(tempfile.mkdtemp(prefix="hlip_data_bench_"))
    synthesize(
        work / "shards", config, PrepareConfig(grid=config.grid, studies_per_shard=16), workers=args.workers
    )
    loaders, disk = loaders_and_disk(args.preset, work, args.workers)
    if torch.cuda.is_available():
        try:
            from hlip_fast.data.gpu import NvcompDecoder

            decoder = NvcompDecoder("cuda")
            gpu = StudyBatches(RawStudies(work / "shards"), decode=decoder)
            loaders["hlip_fast_nvcomp_gpu"] = lambda: (s.normalised() for s in gpu.studies())
            disk["hlip_fast_nvcomp_gpu"] = disk["hlip_fast_shards"]
        except RuntimeError as error:
            print(f"nvCOMP skipped: {error}")
    cores = max(1, args.workers)
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
                "volumes_per_s_per_core": counts["v"] / t / cores,
                "gb_per_s_per_core": counts["x"] * 4 / t / 1e9 / cores,
                "disk_mb": disk[name] / 1e6,
                "studies": counts["s"],
                "volumes": counts["v"],
            }
        )
    base = rows[0]["studies_per_s"]
    print(
        f"{args.preset}: {config.num_studies} studies, grid {config.grid}, {args.workers} workers, "
        f"median of {args.repeats}"
    )
    print(f"| reader | studies/s | volumes/s | GB/s (float32 out) | on disk (MB) | vs {rows[0]['reader']} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['reader']} | {r['studies_per_s']:.1f} | {r['volumes_per_s']:.1f} | {r['gb_per_s']:.3f} "
            f"| {r['disk_mb']:.1f} | {r['studies_per_s'] / base:.2f}× |"
        )
    settings = {
        "preset": args.preset,
        "studies": studies,
        "workers": args.workers,
        "repeats": args.repeats,
        "grid": config.grid,
        "depth_range": config.depth_range,
    }
    payload = {"config": settings, "results": rows}
    device = "gpu" if torch.cuda.is_available() else "cpu"
    if args.preset == "ct-rate":
        settings["batching"] = {k: getattr(CT_RATE_BATCHING, k) for k in ("patch_size", "max_tokens")}
        reader = next(r for r in rows if r["reader"] == "hlip_fast_shards")
        projected = reader["volumes_per_s_per_core"] * HOST_CORES
        payload["projection"] = {
            "host_cores": HOST_CORES,
            "volumes_per_s": projected,
            "training_volumes_per_s": TRAINING_RATE,
            "margin": projected / TRAINING_RATE,
        }
        per_core = f"{reader['volumes_per_s_per_core']:.1f} volumes/s, {reader['gb_per_s_per_core']:.3f} GB/s"
        print(
            f"per core: {per_core}; on {HOST_CORES} cores (if it scales linearly): {projected:.0f} "
            f"volumes/s = {projected / TRAINING_RATE:.1f}× HLIP's {TRAINING_RATE:.0f} volumes/s training "
            "rate (want >= 2×)"
        )
        path = write_results(f"data_ct_rate_{device}", payload)
    else:
        cost = checksum_cost(work / "shards", args.workers, args.checksum_repeats)
        reader, alone = cost["reader"], cost["one_process"]
        print(
            f"checksums: {100 * reader['overhead']:+.1f}% reader time ({args.workers} DataLoader workers), "
            f"{100 * alone['overhead']:+.1f}% in one process ({alone['verified_s']:.3f} vs "
            f"{alone['unverified_s']:.3f} s a pass), medians of {args.checksum_repeats} interleaved passes"
        )
        settings["checksum_repeats"] = args.checksum_repeats
        payload["checksums"] = cost
        path = write_results(f"data_{device}", payload)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
