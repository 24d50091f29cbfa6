#!/usr/bin/env bash
# One-shot GPU run of the NFM comparison on MNIST-5k (about 10 minutes on one H200):
# the TarFlow teacher, its pairs, and the students with the independent, minibatch-OT, semidiscrete-OT,
# NFM and NFM-OT couplings, then evaluation and the report. Everything lands in one folder:
#   OUT=/path/to/out bash bench/gpu_nfm.sh
# Writes $OUT/mnist-gpu/{evaluation-*.json, report/, runs/teacher-*/checkpoints/...} and prints the table.
# Packages missing on the GPU machine (diffusers, clean-fid, POT) are installed from wheels in
# shared/wheels/ when that folder exists (pip download --no-deps --only-binary=:all: ...).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs}"
if [ -d shared/wheels ]; then pip install -q --no-deps shared/wheels/*.whl; fi
pip install -q --no-deps --no-build-isolation -e . >/dev/null
python - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu_nfm.sh needs a CUDA device"
print("GPU:", torch.cuda.get_device_name(0))
PY
flowdistill run recipes/mnist/pipeline.yaml name=mnist-gpu "out_dir=$OUT" \
  "teacher=recipes/mnist/teacher.yaml train.steps=3000 train.batch_size=256 train.mixed_precision=bf16 train.progress=false" \
  "student=recipes/mnist/fm_independent.yaml train.steps=3000 train.batch_size=256 train.mixed_precision=bf16 train.progress=false" \
  'seeds=[0]' 'solvers=[euler]' 'grids=[linear]' n_samples=2000
python - "$OUT/mnist-gpu" <<'PY'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
result = json.loads(max(root.glob("evaluation-*.json"), key=lambda p: p.stat().st_mtime).read_text())
t = result["teacher"]
print(f"teacher: {t['metric']} {t['value']:.4g} at {t['nfe']} NFE, {1000 * t['seconds_per_sample']:.3f} ms/sample")
print("| coupling | NFE | quality | ms/sample |")
print("|---|---|---|---|")
for r in result["students"]:
    print(f"| {r['student']} | {r['nfe']} | {r['mean']:.4g} | {1000 * r['seconds_per_sample']:.3f} |")
PY
