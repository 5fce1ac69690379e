#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on the GPU machine (Python 3.12, x86_64; it
# has torch, triton, timm, transformers but not these) into .whl/ (ignored by git; carried
# with the call, 64 MiB in all). Run here, before: run(command="bash bench/gpu_check.sh", carry=[".whl"]).
#   data deps: lz4, nibabel, pydicom, xxhash; nvCOMP decoder: nvidia-nvcomp-cu13 + libnvcomp (5.3.0.16).
# Add flash-attn-4 / xformers wheels by hand if they fit in what is left of the 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  lz4 nibabel pydicom xxhash "nvidia-nvcomp-cu13==5.3.0.16" "nvidia-libnvcomp-cu13==5.3.0.16"
du -sh .whl
