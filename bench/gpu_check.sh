#!/usr/bin/env bash
# The one prepared GPU check (run through the device tool on an H200; builds nothing):
#   GPU tests, then bench/attention.py (which also writes the auto-dispatch ranking) with the tile
#   work model beside it, the data
#   benchmark and the training-step benchmark (ViT-B on CT-RATE-shaped volumes, bf16),
#   results to $OUT (default bench/results/gpu_check). Budget: under 8 minutes.
#
# Optional backends travel as wheels in .whl/ (ignored by git; see the device README), e.g.
#   flash-attn-4 and its dependencies for Python 3.12, xformers for torch 2.11 + CUDA 13,
#   nvidia-nvcomp-cu13 + nvidia-libnvcomp-cu13 5.3.0.16 (~34 MB) for the nvCOMP decoder.
# Prepare: bash bench/fetch_wheels.sh (data deps + nvCOMP into .whl/), then
# Call:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

site=/tmp/hlip_site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$site" . || exit 1
export PYTHONPATH="$site:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# 1. GPU tests: every backend against the reference on CUDA, then the kernel's own tests.
#    (-P: import hlip_fast from the install above, not from the checkout.)
pytest=(timeout 100 python3 -P -m pytest -q -p no:cacheprovider)
{ "${pytest[@]}" -m gpu tests; "${pytest[@]}" tests/test_triton_kernel.py; } 2>&1 | tee "$OUT/gpu_tests.log"

# 2. The attention benchmark; --install-table writes hlip_fast/attention/auto_table.json.
cd bench
timeout 180 python3 attention.py --install-table 2>&1 | tee "$OUT/attention.log"
#    The tile work model (host-only, seconds): its prediction per level beside the measured times.
timeout 30 python3 tile_model.py 2>&1 | tee "$OUT/tile_model.log"
#    The host cost of a step's layout and schedules, built for the GPU.
timeout 60 python3 layout_host.py --device cuda 2>&1 | tee "$OUT/layout_host.log"
# 3. The data benchmark: nvCOMP GPU decode beside the CPU reader (nvCOMP wheels in .whl/).
timeout 60 python3 data.py --studies 64 --repeats 3 --checksum-repeats 5 2>&1 | tee "$OUT/data.log"
#    HLIP's chest-CT volumes as the trainer reads them, uint8 batches landed on the GPU beside the CPU.
timeout 60 python3 data.py --preset ct-rate --repeats 3 --workers 8 2>&1 | tee "$OUT/data_ct_rate.log"
# 4. Training steps: hlip_fast vs the padded HLIP pipeline, ViT-B, 112x336x336 volumes, bf16.
timeout 120 python3 train.py --preset ct-rate --repeats 3 2>&1 | tee "$OUT/train.log"
#    The same compiled (inductor; the warm-up pass compiles): whole encoder and text tower.
timeout 150 python3 train.py --preset ct-rate --repeats 3 --torchcompile 2>&1 | tee "$OUT/train_compiled.log"
cd ..
cp bench/results/attention_gpu_* bench/results/data_gpu_* bench/results/data_ct_rate_gpu_* bench/results/train_cuda_* bench/results/train_compiled_cuda_* bench/results/tile_model_* bench/results/layout_gpu_* "$OUT"/ 2>/dev/null
cp hlip_fast/attention/auto_table.json "$OUT"/ 2>/dev/null
ls -l "$OUT"
