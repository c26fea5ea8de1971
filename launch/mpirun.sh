#!/usr/bin/env bash
# mpirun: ranks learn their rank, world size and master address through mpi4py (DeepSpeed's MPI discovery).
#   launch/mpirun.sh NP CONFIG [--set KEY=VALUE ...]
# Environment: MASTER_PORT (default 29500), MPIRUN_ARGS (extra mpirun flags, e.g. "--hostfile hosts").
# As root in a container, add MPIRUN_ARGS="--allow-run-as-root --oversubscribe".
set -euo pipefail
NP=${1:?usage: launch/mpirun.sh NP CONFIG [--set KEY=VALUE ...]}
CONFIG=${2:?usage: launch/mpirun.sh NP CONFIG [--set KEY=VALUE ...]}
shift 2
read -r -a MPI_EXTRA <<< "${MPIRUN_ARGS:-}"
cmd=(mpirun -np "$NP" "${MPI_EXTRA[@]}" -x "MASTER_PORT=${MASTER_PORT:-29500}" -x PATH
     "${PYTHON:-python}" -m smoe_ds.train --config "$CONFIG" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
