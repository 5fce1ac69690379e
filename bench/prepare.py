"""Preparing CT-RATE on one core: HLIP's method, the inflate floor and ``hlip-prepare``, side by side.

A miniature CT-RATE release of full-size volumes (512×512 in-plane, 217-294 slices of stored
int16 values with noise, about 70 MB of ``.nii.gz`` each, CT-RATE's CSV columns) is written
once, then every repeat runs, per volume and on one thread each:

- ``hlip``: HLIP's ``data/ct_rate/process.py`` method, rewritten here as the baseline:
  SimpleITK read, rescale to HU, array, torch trilinear to 3×1×1 mm, float32 ``torch.save``;
- ``floor-<inflater>``: only inflating the same ``.nii.gz`` into one buffer, with Python's zlib,
  ``zlib-ng``, ``isal`` (igzip) and ``indexed_gzip``; the fastest is the floor;
- ``hlip_fast``: ``prepare`` of the release (``hlip-prepare --source ct-rate --grid 336 336
  --workers 1``), shards and index included.

A ``prepare`` call takes its voxel buffer once (the first volume pays its page faults, see
``nifti.VoxelBuffer``), so a release of more volumes approaches an archive run's steady state.
Figures are medians over ``--repeats`` of seconds per volume, volumes/s per core and MB/s of
compressed input. ``--memory`` adds the peak resident memory of one process preparing one
1024×1024×500 volume (HLIP's method and hlip_fast), each in a fresh process.

    python bench/prepare.py [--volumes 6] [--repeats 3] [--memory]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import median, write_results

FULL_SIZE = [(217, 1.5, 0.75), (256, 1.25, 0.7), (294, 1.0, 0.78)]
"""(slices, z spacing, xy spacing) of the benchmark's volumes, cycled: CT-RATE's range."""
HLIP_SPACING = (3.0, 1.0, 1.0)
PROBE_SHAPE = (500, 1024, 1024)


def _slices(depth: int, height: int, width: int, seed: int):
    """Stored CT values (HU + 1024) slice by slice: body, lungs, spine, CT-like noise everywhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    body = ((xx - width / 2) / (0.42 * width)) ** 2 + ((yy - height / 2) / (0.33 * height)) ** 2 < 1
    lungs = (
        ((np.abs(xx - width / 2) - 0.18 * width) / (0.12 * width)) ** 2
        + ((yy - height / 2) / (0.2 * height)) ** 2
    ) < 1
    spine = (xx - width / 2) ** 2 + (yy - 0.72 * height) ** 2 < (0.05 * width) ** 2
    plane = np.where(body, 1064.0, 24.0)
    plane[lungs & body], plane[spine] = 174.0, 2024.0
    for _ in range(depth):
        yield (plane + rng.normal(0, 30, plane.shape)).clip(0, 4095).astype("<i2")


def write_nifti(
    path: Path, shape: tuple[int, int, int], zooms: tuple[float, float, float], seed: int
) -> None:
    """A ``.nii.gz`` of stored int16 values, written slice by slice (bounded memory)."""
    import nibabel as nib
    from isal import igzip

    depth, height, width = shape
    header = nib.Nifti1Header()
    header.set_data_shape((width, height, depth))
    header.set_data_dtype(np.int16)
    affine = np.diag([-zooms[2], -zooms[1], zooms[0], 1.0])
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header["vox_offset"] = 352
    with igzip.open(path, "wb", compresslevel=1) as out:
        out.write(header.binaryblock + b"\0" * 4)
        for plane in _slices(depth, height, width, seed):
            out.write(plane.tobytes())


def write_release(root: Path, volumes: int) -> list[tuple[Path, dict]]:
    """A CT-RATE ``valid`` split of full-size volumes; ``(path, metadata row)`` per volume."""
    from hlip_fast.evaluation.prompts import load_prompts

    findings = list(load_prompts("ct_rate").options)
    rows = []
    for n in range(volumes):
        depth, z, xy = FULL_SIZE[n % len(FULL_SIZE)]
        name = f"valid_{n + 1}_a_1.nii.gz"
        path = root / "valid" / f"valid_{n + 1}" / f"valid_{n + 1}_a" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_nifti(path, (depth, 512, 512), (z, xy, xy), seed=n)
        rows.append(
            (
                path,
                {
                    "VolumeName": name,
                    "RescaleSlope": 1,
                    "RescaleIntercept": -1024,
                    "XYSpacing": f"[{xy}, {xy}]",
                    "ZSpacing": z,
                },
            )
        )
    tables = {
        "metadata/valid_metadata.csv": [r for _, r in rows],
        "radiology_text_reports/valid_reports.csv": [
            {"VolumeName": r["VolumeName"], "Findings_EN": "No nodules.", "Impressions_EN": "Normal."}
            for _, r in rows
        ],
        "multi_abnormality_labels/valid_predicted_labels.csv": [
            {"VolumeName": r["VolumeName"], **{f: 0 for f in findings}} for _, r in rows
        ],
    }
    import csv

    for name, table in tables.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        with open(root / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return rows


def hlip_method(path: Path, row: dict, out: Path) -> int:
    """HLIP's process.py per volume: SimpleITK, HU, trilinear to 3×1×1 mm, float32 .pt; bytes written."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    image = image * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])
    array = sitk.GetArrayFromImage(image)
    xy, z = json.loads(row["XYSpacing"])[0], float(row["ZSpacing"])
    size = tuple(int(n * s / t) for n, s, t in zip(array.shape, (z, xy, xy), HLIP_SPACING))
    volume = torch.nn.functional.interpolate(
        torch.from_numpy(array).float()[None, None], size=size, mode="trilinear"
    )
    target = out / f"{path.name.removesuffix('.nii.gz')}.pt"
    torch.save(volume[0, 0].to(torch.float32), target)
    return target.stat().st_size


def inflaters() -> dict:
    """Every inflater installed: ``name -> path -> uncompressed bytes read``."""
    from hlip_fast.data import nifti

    def streaming(open_stream):
        def inflate(path: Path) -> int:
            buffer = bytearray(8 << 20)  # reused: the fastest way to inflate through each reader
            total = 0
            with open(path, "rb") as raw, open_stream(raw) as stream:
                while got := stream.readinto(buffer):
                    total += got
            return total

        return inflate

    found = {name: streaming(opener) for name, opener in nifti.INFLATERS.items()}
    try:
        import indexed_gzip

        found["indexed_gzip"] = streaming(
            lambda raw: indexed_gzip.IndexedGzipFile(fileobj=raw, drop_handles=False)
        )
    except ImportError:
        pass
    return found


def hlip_fast_prepare(root: Path, out: Path) -> dict:
    from hlip_fast.data import PrepareConfig
    from hlip_fast.data.ct_rate import read_ct_rate
    from hlip_fast.data.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    return prepare(read_ct_rate(root, "valid").entries, out, PrepareConfig(grid=(336, 336)), workers=1)


def run_speed(root: Path, rows: list[tuple[Path, dict]], repeats: int) -> list[dict]:
    scratch = root.parent / "out"
    scratch.mkdir(exist_ok=True)
    methods = {"hlip": None, **{f"floor-{n}": f for n, f in inflaters().items()}, "hlip_fast": None}
    seconds = {name: [] for name in methods}
    written = {"hlip": 0, "hlip_fast": 0}
    for repeat in range(repeats + 1):  # the first pass warms caches and imports: not counted
        for name in methods if repeat % 2 else reversed(list(methods)):
            start = time.perf_counter()
            if name == "hlip":
                written[name] = sum(hlip_method(path, row, scratch) for path, row in rows)
            elif name == "hlip_fast":
                hlip_fast_prepare(root, scratch / "shards")
                written[name] = sum(p.stat().st_size for p in (scratch / "shards").iterdir())
            else:
                for path, _ in rows:
                    methods[name](path)
            if repeat:
                seconds[name].append((time.perf_counter() - start) / len(rows))
    compressed = sum(path.stat().st_size for path, _ in rows) / len(rows)
    results = []
    for name, values in seconds.items():
        per_volume = median(values)
        results.append(
            {
                "method": name,
                "s_per_volume": per_volume,
                "volumes_per_s_per_core": 1 / per_volume,
                "input_mb_per_s": compressed / 1e6 / per_volume,
                "written_mb_per_volume": written[name] / 1e6 / len(rows) if name in written else None,
                "seconds": values,
            }
        )
    return results


def probe(method: str, path: Path) -> None:
    """In a fresh process: prepare one volume with ``method``, print the peak resident memory."""
    import resource

    torch.set_num_threads(1)
    from hlip_fast.data import PrepareConfig
    from hlip_fast.data.encoding import process_study
    from hlip_fast.data.manifest import ScanEntry, StudyEntry

    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "hlip":
        row = {"RescaleSlope": 1, "RescaleIntercept": -1024, "XYSpacing": "[0.5, 0.5]", "ZSpacing": 1.0}
        hlip_method(path, row, path.parent)
    else:
        entry = StudyEntry("probe", [ScanEntry(str(path), rescale=(1.0, -1024.0))], "report", modality="CT")
        result = process_study(entry, PrepareConfig(grid=(336, 336)))
        assert result.encoded is not None, result.skipped_files
    print(
        json.dumps(
            {"idle_mb": idle / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        )
    )


def run_memory(folder: Path) -> dict:
    path = folder / "probe.nii.gz"
    write_nifti(path, PROBE_SHAPE, (1.0, 0.5, 0.5), seed=9)
    raw_mb = int(np.prod(PROBE_SHAPE)) * 2 / 2**20
    found = {"shape": list(PROBE_SHAPE), "raw_mb": raw_mb, "compressed_mb": path.stat().st_size / 2**20}
    for method in ("hlip", "hlip_fast"):
        command = [sys.executable, __file__, "--probe", method, str(path)]
        line = (
            subprocess.run(command, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        memory = json.loads(line)
        memory["peak_over_raw"] = memory["peak_mb"] / raw_mb  # interpreter, torch and all included
        found[method] = memory
        print(
            f"memory {method}: peak {memory['peak_mb']:.0f} MB "
            f"({memory['peak_over_raw']:.2f}x the raw volume, the interpreter and torch included)"
        )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--volumes", type=int, default=6, help="full-size volumes in the release")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also the peak memory at 1024x1024x500")
    parser.add_argument("--probe", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe[0], Path(args.probe[1]))
        return 0
    torch.set_num_threads(1)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "CT-RATE"
        rows = write_release(root, args.volumes)
        results = run_speed(root, rows, args.repeats)
        by = {r["method"]: r for r in results}
        floor = min((r for r in results if r["method"].startswith("floor-")), key=lambda r: r["s_per_volume"])
        summary = {
            "floor": floor["method"],
            "speedup_over_hlip": by["hlip"]["s_per_volume"] / by["hlip_fast"]["s_per_volume"],
            "over_floor": by["hlip_fast"]["s_per_volume"] / floor["s_per_volume"],
        }
        for r in results:
            print(f"{r['method']:>20}: {r['s_per_volume']:.3f} s/volume, {r['input_mb_per_s']:.0f} MB/s in")
        print(
            f"hlip_fast: {summary['speedup_over_hlip']:.2f}x HLIP's method, "
            f"{summary['over_floor']:.2f}x the floor"
        )
        memory = run_memory(Path(scratch)) if args.memory else None
        compressed = [path.stat().st_size / 1e6 for path, _ in rows]
    config = {
        "volumes": args.volumes,
        "repeats": args.repeats,
        "compressed_mb": compressed,
        "shapes": [[FULL_SIZE[n % 3][0], 512, 512] for n in range(args.volumes)],
        "grid": [336, 336],
    }
    path = write_results(
        "prepare_cpu", {"config": config, "results": results, "summary": summary, "memory": memory}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
