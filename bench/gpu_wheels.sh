#!/usr/bin/env bash
# Download the wheels of the packages a bare GPU machine (Python 3.12, x86-64, torch preinstalled, no package
# index) lacks, into .whl/ (ignored by git), for bench/experiments/gpu_nfm.sh and bench/benchmarks/gpu_check.sh
# to install offline:
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12; about 40 MB
# normflows ships no wheel on the index, so it is built here from its source distribution (pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-3.12}"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl diffusers clean-fid pot mlxtend importlib_metadata
python3 -m pip wheel -q --no-deps -w .whl normflows
ls -la .whl
