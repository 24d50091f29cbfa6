#!/usr/bin/env bash
# One-shot GPU check (about 10 minutes on one H200): the CUDA tests, student training img/s of a U-Net and a
# DiT (fp32, bf16, bf16 + channels-last, bf16 + torch.compile), sampling NFE/s, TarFlow encode img/s, the
# MeanFlow-F2D2 jvp loss's step time and peak memory, and a 2-process `accelerate launch`. ONE JSON file:
#   OUT=/path/to/out bash bench/benchmarks/gpu_check.sh      # writes $OUT/gpu_check.json (bench/results/ without OUT)
# Extra arguments go to bench/benchmarks/gpu_check.py (e.g. --parts student_train,sampling --seconds 300).
# Packages missing on the GPU machine are installed from the wheels in $WHEELS (default .whl, made by
# bench/gpu_wheels.sh) when that folder holds any; the project itself runs from this checkout (PYTHONPATH), not
# installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu_env.sh
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), ("bench/benchmarks/gpu_check.sh needs a CUDA device "
                                   "(bench/benchmarks/gpu_check.py --smoke runs on a CPU)")
print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
python3 -m bench.benchmarks.gpu_check "$@"
