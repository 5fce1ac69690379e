#!/usr/bin/env bash
# Install hlip_fast (see scripts/setup_env.sh) and run the demo.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh || exit 1
python -m hlip_fast.demo "$@"
