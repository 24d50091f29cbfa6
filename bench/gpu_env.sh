# Sourced by bench/experiments/gpu_nfm.sh, bench/benchmarks/gpu_check.sh and bench/benchmarks/gpu_sampling_scaling.sh
# (from the repository root): install the packages a bare GPU machine lacks from the wheels in $WHEELS (default .whl,
# made by bench/gpu_wheels.sh) into /tmp/site, when that folder holds any, and run the project from this checkout
# (PYTHONPATH) under the machine's own Python and torch.
WHEELS="${WHEELS:-.whl}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
