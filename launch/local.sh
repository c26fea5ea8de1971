#!/usr/bin/env bash
# One machine, the deepspeed launcher: every local GPU, or NPROC CPU ranks (default 2) when there is none.
#   launch/local.sh [CONFIG] [--set KEY=VALUE ...]
# Environment: NPROC (ranks), MASTER_PORT (default 29500), PYTHON (default: python on PATH).
set -euo pipefail
CONFIG=${1:-ds_configs/cpu_tiny.json}
shift || true
PYTHON=${PYTHON:-python}
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
  NPROC=${NPROC:-$NGPU}
else
  NPROC=${NPROC:-2}
  # CPU ranks: split the cores between them; oversubscribed threads made the default job ~40% slower here.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
EXTRA=()
# A single rank cannot hold half of the experts: fall back to ep_size 1 there.
if [ "$NPROC" -eq 1 ]; then EXTRA=(--set moe.ep_size=1); fi
cmd=(deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module smoe_ds.train --config "$CONFIG" "${EXTRA[@]}" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
