#!/bin/bash
# The density recipes, as shipped, on one mixture the recipes were not tuned on, scored against its exact density.
#
#   python -m bench.experiments.heldout_mixtures make --dim 16 --seed 216 --out mixtures/d16-s216
#   bash bench/experiments/heldout_density.sh mixtures/d16-s216 runs/heldout-d16-s216 [fm,f2d2,tarflow] [overrides...]
#
# Trains recipes/density/fm.yaml, f2d2_u.yaml, f2d2_joint.yaml (the F2D2 chain) and a TarFlow
# (tarflow_spline.yaml below 8 dimensions, tarflow_tabular.yaml from 8 on) on MIXTURE/train.npy with the
# recipes' defaults, lets `f2d2-eval` choose its grid on the validation split and score the whole test file,
# scores the FM field's ODE likelihood and the TarFlow's exact one with `nll`, and writes each run's
# heldout-score.json (gap to the exact NLL ± s.e., mean |error|). Finished runs are resumed, not retrained.
# Arguments after the parts go to the FM field's recipe, e.g. train.steps=16000 for 100,000 rows (its N / 6 budget),
# except seed=N, which goes to every recipe (model init, batches and noise; the train/validation split stays).
# Run from the repository root; OMP_NUM_THREADS / FLOWDISTILL_THREADS set the threads.
set -euo pipefail
mix=${1:?mixture folder (bench.experiments.heldout_mixtures make)}
out=${2:?output folder for the runs}
parts=${3:-fm,f2d2,tarflow}
fm_overrides=()
all_overrides=()
for override in "${@:4}"; do
  case $override in seed=*) all_overrides+=("$override") ;; *) fm_overrides+=("$override") ;; esac
done
data="data.name=tabular data.path=$mix/train.npy data.test_path=$mix/test.npy"
dim=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['dim'])" "$mix/mixture.json")
train() {  # recipe name overrides...: train unless finished, resuming an interrupted run
  local recipe=$1 name=$2; shift 2
  local steps
  steps=$(python -c "from flowdistill.api import resolve_config as r; import sys; print(r(sys.argv[1], sys.argv[2:]).train.steps)" \
    "recipes/density/$recipe.yaml" "${all_overrides[@]}" "$@")
  if [ -d "$out/$name/checkpoints/step_$(printf %08d "$steps")" ]; then echo "$name: finished"; return; fi
  local resume=""
  [ -d "$out/$name/checkpoints" ] && resume="--resume"
  /usr/bin/time -f "$name: %e s" flowdistill train $resume "recipes/density/$recipe.yaml" "out_dir=$out" "name=$name" \
    $data train.progress=false "${all_overrides[@]}" "$@"
}
score() { python -m bench.experiments.heldout_mixtures score "$mix" "$1" --csv "$2"; }
if [[ $parts == *fm* || $parts == *f2d2* ]]; then
  train fm fm "${fm_overrides[@]}"
  flowdistill nll "$out/fm" --split test
  score "$out/fm" nll-test.csv
fi
if [[ $parts == *f2d2* ]]; then
  chain="method.teacher=$out/fm"
  train f2d2_u f2d2_u "$chain" "train.init_from=$out/fm"
  train f2d2_joint f2d2_joint "$chain" "train.init_from=$out/f2d2_u"
  flowdistill f2d2-eval "$out/f2d2_joint"
  score "$out/f2d2_joint" f2d2-eval.csv
fi
if [[ $parts == *tarflow* ]]; then
  recipe=$([ "$dim" -lt 8 ] && echo tarflow_spline || echo tarflow_tabular)
  train "$recipe" tarflow
  flowdistill nll "$out/tarflow" --split test
  score "$out/tarflow" nll-test.csv
fi
