#!/usr/bin/env bash
# Install hlip_fast (see scripts/setup_env.sh) and run the training demo: synthetic chest CT
# corpus -> shards -> hlip-train --recipe scratch-tiny (tiny model, CPU) -> zero-shot on a
# held-out split. Arguments go to the demo (python -m hlip_fast.train.demo --help); its output
# goes to demo_run/ in the current folder.
set -uo pipefail
here="$(cd -P "$(dirname "$0")" && pwd)"
source "$here/setup_env.sh" "" || exit 1  # "": no extras (not the demo's arguments)
python -m hlip_fast.train.demo "$@"
