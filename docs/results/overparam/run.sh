#!/usr/bin/env bash
# The over-parameterised CPU experiment of docs/results/overparam, in the order its runs were made.
# Rerunning it continues: finished runs are skipped, an interrupted one resumes from its checkpoint.
#   bash docs/results/overparam/run.sh [PATH_TO_TINYSHAKESPEARE]
set -euo pipefail
data=${1:-../shared/data/tinyshakespeare/input.txt}
out=$(cd "$(dirname "$0")" && pwd)
# dense and SMoE-Dropout (linear N/2 -> N), with the paper's router std and with 1/sqrt(d_model), 3 seeds
python -m smoe_ds.experiments.paper --scale overparam --data "$data" --out "$out" --seeds 0,1,2 \
  --methods dense,smoe_dropout_linear,smoe_dropout_linear_rsqrt_router
# every other method once
python -m smoe_ds.experiments.paper --scale overparam --data "$data" --out "$out" --seeds 0
