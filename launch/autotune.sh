#!/usr/bin/env bash
# DeepSpeed's autotuner on smoe-train, on one machine: every local GPU, or NPROC CPU ranks (default 2).
#   launch/autotune.sh CONFIG [tune|run]
# CONFIG is a smoe-train config with an "autotuning" section (DeepSpeed's keys: enabled, fast,
# start_profile_step, end_profile_step, results_dir, exps_dir, ...). The tuner writes
# results_dir/ds_config_optimal.json, a config smoe-train runs as it is (docs/launching.md).
# Environment: NPROC (ranks on a machine without GPUs), PYTHON (default: python on PATH).
set -euo pipefail
CONFIG=${1:?usage: launch/autotune.sh CONFIG [tune|run]}
MODE=${2:-tune}
PYTHON=${PYTHON:-python}
source "$(dirname "$0")/ranks.sh"
if [ "$NGPU" -eq 0 ]; then
  # DeepSpeed's CPU accelerator counts devices as LOCAL_SIZE (else NUMA nodes, 1 here), and the tuner
  # refuses --num_gpus above that count (autotuning/autotuner.py).
  export LOCAL_SIZE=${LOCAL_SIZE:-$NPROC}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# The tuner finds the config by --deepspeed_config and rewrites it per experiment; it drops --module,
# so the trainer is given as the installed smoe-train script.
TRAINER=$(command -v smoe-train)
set -x
deepspeed --autotuning "$MODE" --num_gpus "$NPROC" "$TRAINER" --deepspeed_config "$CONFIG"
