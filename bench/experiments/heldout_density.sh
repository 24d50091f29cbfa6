#!/bin/bash
# The density recipes, as shipped, on one mixture the recipes were not tuned on, scored against its exact density.
#
#   python -m bench.experiments.heldout_mixtures make --dim 16 --seed 216 --out mixtures/d16-s216
#   bash bench/experiments/heldout_density.sh mixtures/d16-s216 runs/heldout-d16-s216 [fm,f2d2,tarflow] [overrides...]
#
# Trains the F2D2 chain as documented (recipes/density/fm.yaml three times, seeds 3N, 3N + 1, 3N + 2, into fm,
# fm-1, fm-2; `flowdistill ensemble` of the three into fm-ensemble; f2d2_u.yaml and f2d2_joint.yaml distilling
# the ensemble, initialised from fm) and a TarFlow (tarflow_spline.yaml below 8 dimensions, tarflow_tabular.yaml
# from 8 on) on MIXTURE/train.npy with the recipes' defaults, lets `f2d2-eval` choose its grid on the
# validation split and score the whole test file, scores the ODE likelihood of the single field fm and of the
# ensemble and the TarFlow's exact one with `nll`, and writes each run's heldout-score.json (gap to the exact
# NLL ± s.e., mean |error|). Finished runs are resumed, not retrained.
# Arguments after the parts go to the FM fields' recipe, e.g. train.steps=16000 for 100,000 rows (its N / 6
# budget), except seed=N (default 0), which seeds the maps and the TarFlow with N and the three fields with 3N,
# 3N + 1 and 3N + 2 (model init, batches and noise; the train/validation split stays).
# Run from the repository root; OMP_NUM_THREADS / FLOWDISTILL_THREADS set the threads.
set -euo pipefail
mix=${1:?mixture folder (bench.experiments.heldout_mixtures make)}
out=${2:?output folder for the runs}
parts=${3:-fm,f2d2,tarflow}
fm_overrides=()
seed=0
for override in "${@:4}"; do
  case $override in seed=*) seed=${override#seed=} ;; *) fm_overrides+=("$override") ;; esac
done
all_overrides=("seed=$seed")
data="data.name=tabular data.path=$mix/train.npy data.test_path=$mix/test.npy"
dim=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['dim'])" "$mix/mixture.json")
train() {  # recipe name overrides...: train unless finished, resuming an interrupted run
  local recipe=$1 name=$2; shift 2
  local steps
  steps=$(python -c "from flowdistill.api import resolve_config as r; import sys; print(r(sys.argv[1], sys.argv[2:]).train.steps)" \
    "recipes/density/$recipe.yaml" "$@")
  if [ -d "$out/$name/checkpoints/step_$(printf %08d "$steps")" ]; then echo "$name: finished"; return; fi
  local resume=""
  [ -d "$out/$name/checkpoints" ] && resume="--resume"
  /usr/bin/time -f "$name: %e s" flowdistill train $resume "recipes/density/$recipe.yaml" "out_dir=$out" "name=$name" \
    $data train.progress=false "$@"
}
score() { python -m bench.experiments.heldout_mixtures score "$mix" "$1" --csv "$2"; }
if [[ $parts == *fm* || $parts == *f2d2* ]]; then
  train fm fm "seed=$((3 * seed))" "${fm_overrides[@]}"
  train fm fm-1 "seed=$((3 * seed + 1))" "${fm_overrides[@]}"
  train fm fm-2 "seed=$((3 * seed + 2))" "${fm_overrides[@]}"
  [ -d "$out/fm-ensemble" ] || flowdistill ensemble "$out/fm" "$out/fm-1" "$out/fm-2" --out "$out/fm-ensemble"
  for field in fm fm-ensemble; do
    flowdistill nll "$out/$field" --split test
    score "$out/$field" nll-test.csv
  done
fi
if [[ $parts == *f2d2* ]]; then
  chain="method.teacher=$out/fm-ensemble"
  train f2d2_u f2d2_u "${all_overrides[@]}" "$chain" "train.init_from=$out/fm"
  train f2d2_joint f2d2_joint "${all_overrides[@]}" "$chain" "train.init_from=$out/f2d2_u"
  flowdistill f2d2-eval "$out/f2d2_joint"
  score "$out/f2d2_joint" f2d2-eval.csv
fi
if [[ $parts == *tarflow* ]]; then
  recipe=$([ "$dim" -lt 8 ] && echo tarflow_spline || echo tarflow_tabular)
  train "$recipe" tarflow "${all_overrides[@]}"
  flowdistill nll "$out/tarflow" --split test
  score "$out/tarflow" nll-test.csv
fi
