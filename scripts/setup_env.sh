#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install hlip_fast into it.
# Usage: source scripts/setup_env.sh [EXTRAS]   e.g. `source scripts/setup_env.sh test`
# The venv lives in $HLIP_FAST_VENV (default: .venv in the repository).
# torch and torchvision are pinned first: this machine's pip takes that pair from local disk,
# and it is the only pair whose torchvision (which timm imports) works here. An unpinned torch
# would download several GB instead.
set -euo pipefail
repo="$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"  # -P: through symlinks to the real checkout
venv="${HLIP_FAST_VENV:-$repo/.venv}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1 (takes a few minutes)"
  "$py" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || { echo "[setup] torch install failed" >&2; return 1; }
fi
echo "[setup] installing hlip-fast${extras:+[$extras]}"
"$py" -m pip install -q -e "$repo${extras:+[$extras]}" || { echo "[setup] install failed" >&2; return 1; }
export PATH="$venv/bin:$PATH"
set +euo pipefail
