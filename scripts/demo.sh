#!/usr/bin/env bash
# Install hlip_fast (see scripts/setup_env.sh) and run the training demo: synthetic chest CT
# corpus -> shards -> hlip-train (tiny model, CPU) -> zero-shot on a held-out split.
# Arguments go to the demo (python -m hlip_fast.train.demo --help); output in demo_run/.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh "" || exit 1  # "": no extras (not the demo's arguments)
python -m hlip_fast.train.demo "$@"
