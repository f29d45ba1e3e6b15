#!/usr/bin/env bash
# Body of the SLURM batch scripts: launch/pretrain_1node.sbatch and launch/pretrain_multinode.sbatch
# set a few variables and `exec` this file inside the allocation (same PID, so the batch shell that
# receives SLURM's B:USR1 pre-emption signal is this script). Not meant to be submitted by itself.
#
# Launch choice: srun starts ONE TASK PER GPU (one per CPU process on CPU-only nodes), not one
# torchrun per node. Why: SLURM then owns every rank (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID are read
# by parallel/env.py, no second rendezvous), srun forwards the pre-emption signal to every rank,
# `--kill-on-bad-exit` ends the step as soon as one rank dies, and per-rank logs come from srun's
# `--output=rank-%t.log`. torchrun's own restarts are not needed: a failed or pre-empted job is
# requeued and resumes from the newest complete checkpoint.
#
# Reads (set by the .sbatch file or the environment): RECIPE, RUN_NAME, RUNS_ROOT, VENV or PYTHON,
# CONTAINER_IMAGE, ELASTIC, REQUEUE_ON_PREEMPT, CPU_PROCS_PER_NODE, REPO. Extra arguments are
# `section.field=value` overrides for the recipe. See docs/LAUNCH.md.
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:?run this inside a SLURM job (sbatch launch/pretrain_multinode.sbatch)}}
cd "$REPO"
RECIPE=${RECIPE:-configs/tiny_moe.yaml}
RUN_NAME=${RUN_NAME:-$(basename "$RECIPE" .yaml)}
RUNS_ROOT=${RUNS_ROOT:-$REPO/runs}
VENV=${VENV:-$REPO/.venv}
PYTHON=${PYTHON:-$VENV/bin/python}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
ELASTIC=${ELASTIC:-0}
REQUEUE_ON_PREEMPT=${REQUEUE_ON_PREEMPT:-1}

# --- where things go: checkpoints per run (shared by its requeues and resubmissions), logs per job
RUN_DIR=$RUNS_ROOT/$RUN_NAME
CKPT_DIR=$RUN_DIR/checkpoints
LOG_DIR=$RUN_DIR/logs/job-${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}
mkdir -p "$CKPT_DIR" "$LOG_DIR"

# --- ranks: nodes from the allocation, processes per node = GPUs on the node (CPU processes without)
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
GPUS=${SLURM_GPUS_ON_NODE:-0}
if [[ $GPUS =~ ^[0-9]+$ ]] && ((GPUS > 0)); then
    NPROC_PER_NODE=$GPUS
else
    NPROC_PER_NODE=${CPU_PROCS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-1} / NNODES))}}
fi
WORLD=$((NNODES * NPROC_PER_NODE))

# --- rendezvous: the first node's address as an IP (NodeAddr as SLURM reaches it, resolved if a name)
MASTER_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$MASTER_HOST" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
MASTER_ADDR=${MASTER_ADDR:-$MASTER_HOST}
if ! [[ $MASTER_ADDR =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    MASTER_ADDR=$(getent ahostsv4 "$MASTER_ADDR" | awk 'NR == 1 { print $1 }')
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# --- elastic relaunch on fewer nodes: shrink data/expert parallelism to the ranks we got
OVERRIDES=("$@")
if [[ $ELASTIC == 1 ]]; then
    FIT=$("$PYTHON" -m launch.fit_layout --config "$RECIPE" --world "$WORLD" "${OVERRIDES[@]}")  # exits on error
    # shellcheck disable=SC2206 # one section.field=value per line, no spaces
    OVERRIDES+=($FIT)
fi

echo "timeexpert-slurm: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${NNODES} node(s) x" \
    "${NPROC_PER_NODE} process(es) = ${WORLD} ranks (GPUs per node: ${GPUS}); master ${MASTER_ADDR}:${MASTER_PORT};" \
    "recipe ${RECIPE}; overrides: ${OVERRIDES[*]:-none}; checkpoints ${CKPT_DIR}; logs ${LOG_DIR}"

LAUNCH=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$WORLD" --ntasks-per-node="$NPROC_PER_NODE"
    --output="$LOG_DIR/rank-%t.log")
if [[ -n $CONTAINER_IMAGE ]]; then  # pyxis/enroot; the image must contain the installed package
    LAUNCH+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$REPO:$REPO,$RUNS_ROOT:$RUNS_ROOT"
        --container-workdir="$REPO")
    PYTHON=python
fi

# --- pre-emption: SLURM signals this script (B:USR1); forward it to every rank through srun. The
# trainer finishes its step, writes a checkpoint and exits 0; then the job is requeued.
PREEMPTED=0
on_preempt() {
    PREEMPTED=1
    echo "timeexpert-slurm: pre-emption signal received at $(date -u +%H:%M:%S); checkpointing"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
trap on_preempt USR1

# Each rank's log starts with the SLURM node it runs on.
# shellcheck disable=SC2016 # expanded by the task's shell
RANK_HEADER='echo "timeexpert-slurm: rank ${SLURM_PROCID}/${SLURM_NTASKS} on node ${SLURMD_NODENAME} ($(hostname))"'
TRAIN=("$PYTHON" -m megatron_timeexpert.cli pretrain --config "$RECIPE" --resume
    training.save_dir="$CKPT_DIR" logging.run_dir="$LOG_DIR" logging.progress_bar=false "${OVERRIDES[@]}")
"${LAUNCH[@]}" bash -c "$RANK_HEADER; exec \"\$@\"" rank "${TRAIN[@]}" &
SRUN_PID=$!
RC=0
while true; do  # a trapped signal interrupts `wait`; wait again until srun has really ended
    wait "$SRUN_PID" && RC=0 || RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
echo "timeexpert-slurm: srun exited with ${RC}; newest checkpoint: $(cat "$CKPT_DIR/latest" 2>/dev/null || echo none)"
if ((PREEMPTED)) && ((RC == 0)) && [[ $REQUEUE_ON_PREEMPT == 1 ]]; then
    echo "timeexpert-slurm: requeueing job ${SLURM_JOB_ID}; it resumes from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$RC"
