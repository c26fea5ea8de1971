#!/usr/bin/env bash
# Several nodes, the deepspeed launcher reading a hostfile (see hostfile.example).
#   launch/multinode.sh HOSTFILE CONFIG [--set KEY=VALUE ...]
# Environment: LAUNCHER = pdsh (default) | openmpi | mpich | slurm; MASTER_ADDR (default: first host);
# MASTER_PORT (default 29500). Every node needs the same checkout and environment at the same path.
set -euo pipefail
HOSTFILE=${1:?usage: launch/multinode.sh HOSTFILE CONFIG [--set KEY=VALUE ...]}
CONFIG=${2:?usage: launch/multinode.sh HOSTFILE CONFIG [--set KEY=VALUE ...]}
shift 2
FIRST_HOST=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")
cmd=(deepspeed --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}" --master_addr "${MASTER_ADDR:-$FIRST_HOST}"
     --master_port "${MASTER_PORT:-29500}" --module smoe_ds.train --config "$CONFIG" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
