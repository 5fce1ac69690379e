"""pytest-benchmark suites (``pytest bench --benchmark-only``): not part of the test run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # import bench/common.py and friends
