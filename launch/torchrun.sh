#!/usr/bin/env bash
# torchrun: one agent per node starts NPROC ranks; the agents meet at MASTER_ADDR:MASTER_PORT.
#   launch/torchrun.sh CONFIG [--set KEY=VALUE ...]                    (one node)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh CONFIG   (run on every node, NODE_RANK 0..NNODES-1)
# Environment: NPROC (ranks per node; default every GPU, or 2 on a CPU machine), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500).
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [--set KEY=VALUE ...]}
shift
PYTHON=${PYTHON:-python}
source "$(dirname "$0")/ranks.sh"
cmd=(torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC"
     --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
     -m smoe_ds.train --config "$CONFIG" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
