#!/usr/bin/env bash
# Pretraining under MPI: mpirun starts the ranks, parallel/env.py reads their rank and world size from
# Open MPI's OMPI_COMM_WORLD_* (or PMI_RANK/PMI_SIZE of MPICH / Intel MPI); the collectives are gloo
# (CPU) or NCCL (GPU), not MPI. Run from anywhere:
#     NP=4 bash launch/mpirun.sh --config configs/tiny_moe.yaml [--resume] [section.field=value ...]
#     NP=16 HOSTFILE=hosts.txt bash launch/mpirun.sh --config configs/tiny_timeexpert.yaml --resume
#     MPIRUN_ARGS="--oversubscribe --allow-run-as-root" NP=4 bash launch/mpirun.sh ...   # CI, containers
# It sets MASTER_ADDR (the first host of HOSTFILE as an IP, 127.0.0.1 without one) and MASTER_PORT and
# exports them to every rank. mpirun forwards SIGUSR1 to the ranks, which checkpoint and stop (as
# under SLURM). See docs/LAUNCH.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NP=${NP:-4}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
HOSTFILE=${HOSTFILE:-}
MPIRUN=${MPIRUN:-mpirun}
read -ra EXTRA <<<"${MPIRUN_ARGS:-}"

if [[ -n $HOSTFILE ]]; then
    FIRST=$(awk '!/^[[:space:]]*#/ && NF { print $1; exit }' "$HOSTFILE")
    EXTRA+=(--hostfile "$HOSTFILE")
else
    FIRST=127.0.0.1
fi
if [[ $FIRST =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    MASTER_ADDR=$FIRST
else
    MASTER_ADDR=$(getent ahostsv4 "$FIRST" | awk 'NR == 1 { print $1 }')
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + $$ % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

cd "$REPO"
echo "timeexpert-mpi: ${NP} ranks, master ${MASTER_ADDR}:${MASTER_PORT}, ${MPIRUN} ${EXTRA[*]:-}"
exec "$MPIRUN" -np "$NP" "${EXTRA[@]}" -x MASTER_ADDR -x MASTER_PORT -x OMP_NUM_THREADS -x PYTHONWARNINGS \
    "$PYTHON" -m megatron_timeexpert.cli pretrain "$@"
