"""The training demo's figures for the README: runs ``python -m hlip_fast.train.demo`` (the
whole pipeline: synthesise, prepare, train with --recipe scratch-tiny, evaluate) and records its
zero-shot and retrieval results, settings and wall time with the machine in
``bench/results/demo_<device>_<date>.json``; ``bench/readme.py`` puts them in the README.

    python bench/demo.py                 # the demo's defaults (about 5 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import write_results

from hlip_fast.train.demo import main as demo_main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="keep the demo folder here (default: a temporary one)")
    args, demo_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / "demo_run"
        if code := demo_main(["--out", str(out), "--no-progress", *demo_args]):
            raise SystemExit(f"the demo exited {code}")
        summary = json.loads((out / "run" / "demo.json").read_text())
    device = "gpu" if torch.cuda.is_available() else "cpu"
    print(f"wrote {write_results(f'demo_{device}', {'demo': summary})}")


if __name__ == "__main__":
    main()
