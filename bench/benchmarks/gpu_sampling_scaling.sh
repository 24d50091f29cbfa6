#!/usr/bin/env bash
# Student speed-up over the TarFlow teacher against tokens on one GPU (bench/benchmarks/sampling_scaling.py):
# every recipe family's teacher at its patch sizes (16 to 1,024 tokens), KV-cached decode, against its U-Net and
# DiT students at 1, 2, 4, 8 NFE, at batch 1 and batch $GPU_SAMPLING_BATCH (default 64), the 1,024-token teacher
# included at the batch and every teacher timed with all its blocks. ONE JSON file and its plot:
#   OUT=/path/to/out bash bench/benchmarks/gpu_sampling_scaling.sh    # $OUT/sampling_scaling-gpu.json and .png
# Extra arguments go to bench/benchmarks/sampling_scaling.py (e.g. --grid cifar10:2 --repeats 5). Packages
# missing on the GPU machine are installed from the wheels in $WHEELS (default .whl, made by bench/gpu_wheels.sh),
# as for bench/benchmarks/gpu_check.sh; the project runs from this checkout (PYTHONPATH), not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
source bench/gpu_env.sh
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), ("bench/benchmarks/gpu_sampling_scaling.sh needs a CUDA device "
                                   "(the bench itself runs on a CPU)")
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
python3 -m bench.benchmarks.sampling_scaling --device cuda --threads 0 --batch "${GPU_SAMPLING_BATCH:-64}" --repeats 5 \
  --full-teacher-tokens 100000 --max-batched-tokens 100000 --out "$OUT/sampling_scaling-gpu.json" "$@"
