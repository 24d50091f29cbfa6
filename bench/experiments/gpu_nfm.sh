#!/usr/bin/env bash
# One-shot GPU run of the NFM comparison on MNIST-5k (about 9 minutes on one H200), in phases that share the GPU:
#   1. the NFM teacher (recipes/mnist/teacher_gpu.yaml) and its pairs   | the likelihood teacher
#   2. the students, independent, minibatch OT, semidiscrete OT, NFM     | (recipes/mnist/teacher_bpd_gpu.yaml),
#      and NFM-OT, one process per coupling (seeds: GPU_NFM_SEEDS)       | then its test bits/dim
#   3. evaluation (quality vs NFE, curvature, teacher vs student sampling time) and the report
#   4. bench/benchmarks/gpu_check.py (CUDA tests and throughputs) in the time left before the deadline
#   OUT=/path/to/out bash bench/experiments/gpu_nfm.sh
# Runs (with the teachers' weights) go to $RUNS (default runs/gpu); $OUT receives gpu_nfm.tar.gz (evaluation JSON,
# report, configs, metrics and logs of every run), gpu_check.json and the table on stdout. GPU_NFM_SECONDS (default 560) is the
# deadline of the whole script; each phase is cut at it. Packages missing on the GPU machine (diffusers,
# clean-fid, POT, normflows, mlxtend) are installed from the wheels in $WHEELS (default .whl) when it exists:
#   bash bench/gpu_wheels.sh                # fills .whl (ignored by git); carry it to the GPU machine
# GPU_NFM_SMOKE=1 runs every phase at toy sizes on the CPU (a check of this script, no meaningful numbers).
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
DEADLINE="${GPU_NFM_SECONDS:-560}"
OUT="${OUT:-runs/gpu-out}"
RUNS="${RUNS:-runs/gpu}"
SMOKE="${GPU_NFM_SMOKE:-0}"
SEEDS="${GPU_NFM_SEEDS:-0}"  # comma-separated student seeds
COUPLINGS=(independent minibatch_ot semidiscrete_ot nf_teacher nf_teacher_ot)
mkdir -p "$OUT" "$RUNS/logs"
left() { local s=$(( DEADLINE - ($(date +%s) - START) )); echo $(( s > 1 ? s : 1 )); }  # timeout needs >= 1
say() { echo "[gpu_nfm $(( $(date +%s) - START )) s] $*"; }

source bench/gpu_env.sh
export FLOWDISTILL_CACHE="${FLOWDISTILL_CACHE:-$RUNS/cache}"
FD="python3 -m flowdistill"

if [ "$SMOKE" = 1 ]; then
  TEACHER="recipes/mnist/teacher_gpu.yaml train.steps=4 train.eval_every=2 model.width=32 model.blocks=2 model.layers=1 model.head_dim=16"
  STUDENT="recipes/mnist/fm_independent.yaml train.steps=4 model.channels=[8,16,16] model.norm_groups=4 model.attention_head_dim=8"
  BPD="train.steps=4 train.eval_every=2 model.width=32 model.blocks=2 model.layers=1 model.head_dim=16"
  SCORE=(n_samples=64 curvature_samples=16 curvature_steps=8 nll_points=16 'steps=[1,2]')
  SDOT=('coupling_overrides.semidiscrete_ot=[method.coupling.iters=20]')
  CHECK=(--smoke)
else
  python3 -c "import torch; assert torch.cuda.is_available(), 'bench/experiments/gpu_nfm.sh needs a CUDA device'; print('GPU:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1
  TEACHER="recipes/mnist/teacher_gpu.yaml"
  STUDENT="recipes/mnist/fm_independent.yaml train.steps=2000 train.batch_size=256 train.ckpt_every=1000"
  BPD=""
  SCORE=(n_samples=2000 curvature_steps=128 curvature_samples=300 nll_points=300 'steps=[1,2,4,8]')
  SDOT=()
  CHECK=()
fi
QUIET="train.progress=false train.sample_grid=false"
PIPE=(recipes/mnist/pipeline_gpu.yaml name=mnist-gpu "out_dir=$RUNS" "teacher=$TEACHER $QUIET" "student=$STUDENT $QUIET"
      'solvers=[euler]' 'grids=[linear]' "${SCORE[@]}")

say "phase 1: NFM teacher and pairs | likelihood teacher (deadline ${DEADLINE} s)"
( timeout "$(left)" $FD train recipes/mnist/teacher_bpd_gpu.yaml name=mnist-bpd-gpu "out_dir=$RUNS" $QUIET $BPD &&
  timeout "$(left)" $FD nll "$RUNS/mnist-bpd-gpu" --split test ) >"$RUNS/logs/bpd.log" 2>&1 &
BPD_PID=$!
timeout "$(left)" $FD run "${PIPE[@]}" "${SDOT[@]}" "seeds=[$SEEDS]" --until couplings >"$RUNS/logs/teacher.log" 2>&1
say "teacher: exit $? ($(tail -1 "$RUNS/logs/teacher.log"))"

# One process per coupling: a step of these small students is bound by kernel launches and, for the OT couplings,
# by the CPU's assignment solver, so five processes keep the GPU busier than one (measured: docs/benchmarks.md).
say "phase 2: students, one process per coupling, seeds $SEEDS"
STUDENT_PIDS=()
for c in "${COUPLINGS[@]}"; do
  extra=(); [ "$c" = semidiscrete_ot ] && extra=("${SDOT[@]}")
  timeout "$(left)" $FD run "${PIPE[@]}" "${extra[@]}" "couplings=[$c]" "seeds=[$SEEDS]" --only students \
    >"$RUNS/logs/students-$c.log" 2>&1 &
  STUDENT_PIDS+=($!)
done
wait "${STUDENT_PIDS[@]}"
say "students: $(cat "$RUNS"/logs/students-*.log | grep -c "^finished at step") runs finished"

say "phase 3: evaluation and report"
timeout "$(left)" $FD run "${PIPE[@]}" "${SDOT[@]}" "seeds=[$SEEDS]" --from evaluate >"$RUNS/logs/evaluate.log" 2>&1
say "evaluate: exit $? ($(tail -1 "$RUNS/logs/evaluate.log"))"
wait "$BPD_PID"
say "likelihood teacher: exit $? ($(tail -1 "$RUNS/logs/bpd.log"))"

if [ "$(left)" -gt 45 ]; then
  say "phase 4: bench/benchmarks/gpu_check.py in the $(left) s left"
  timeout "$(left)" python3 -m bench.benchmarks.gpu_check "${CHECK[@]}" --seconds "$(( $(left) - 15 ))" \
    --out "$OUT/gpu_check.json" \
    >"$RUNS/logs/gpu_check.log" 2>&1
  say "gpu_check: exit $?"
fi

python3 - "$RUNS" <<'PY' | tee "$OUT/gpu_nfm_table.md"
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
evaluations = sorted((root / "mnist-gpu").glob("evaluation-*.json"), key=lambda p: p.stat().st_mtime)
if evaluations:
    result = json.loads(evaluations[-1].read_text())
    t = result["teacher"]
    print(f"teacher: {t['metric']} {t['value']:.4g} at {t['nfe']} NFE, {1000 * t['seconds_per_sample']:.3f} ms/sample")
    print("| coupling | NFE | quality | ± | ms/sample |\n|---|---|---|---|---|")
    for r in result["students"]:
        print(f"| {r['student']} | {r['nfe']} | {r['mean']:.4g} | {r.get('std', 0):.2g} | {1000 * r['seconds_per_sample']:.3f} |")
nll = root / "mnist-bpd-gpu" / "nll-test.json"
if nll.is_file():
    print("likelihood teacher, test:", {k: v for k, v in json.loads(nll.read_text()).items() if "bits" in k or "nll" in k})
PY

# What comes back: one archive of every run's config, metrics, logs, evaluation and report, without weights
# (the teachers' weights stay in $RUNS: 22 MB each, over what a result file may hold).
tar -czf "$OUT/gpu_nfm.tar.gz" --exclude='checkpoints' --exclude='cache' --exclude='*/couplings/nf_*' "$RUNS"
ls -la "$OUT"
say "done"
