#!/usr/bin/env bash
# One machine, the deepspeed launcher: every local GPU, or NPROC CPU ranks (default 2) when there is none.
#   launch/local.sh [CONFIG] [--set KEY=VALUE ...]
# Environment: NPROC (ranks), MASTER_PORT (default 29500), PYTHON (default: python on PATH).
set -euo pipefail
CONFIG=${1:-ds_configs/cpu_tiny.json}
shift || true
PYTHON=${PYTHON:-python}
source "$(dirname "$0")/ranks.sh"
if [ "$NGPU" -eq 0 ]; then
  # CPU ranks: split the cores between them; oversubscribed threads made the default job ~40% slower here.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
EXTRA=()
# The config's ep_size must divide the rank count (and N): on 1 rank, or an odd number of GPUs,
# use the largest ep_size that fits instead. A --set moe.ep_size=... given below still wins.
read -r CONFIG_EP EP < <("$PYTHON" - "$CONFIG" "$NPROC" <<'PY'
import json, sys
moe = json.load(open(sys.argv[1])).get("moe", {})
ep, n, ranks = moe.get("ep_size", 1), moe.get("num_experts", 1), int(sys.argv[2])
print(ep, max(d for d in range(1, ep + 1) if ranks % d == 0 and n % d == 0))
PY
)
if [ "$EP" != "$CONFIG_EP" ]; then
  echo "launch/local.sh: $NPROC rank(s): using moe.ep_size=$EP (the config's $CONFIG_EP does not divide them)"
  EXTRA=(--set moe.ep_size="$EP")
fi
cmd=(deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module smoe_ds.train --config "$CONFIG" "${EXTRA[@]}" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
