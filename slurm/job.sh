#!/usr/bin/env bash
# The body shared by the batch templates (pretrain.sbatch, cpu_smoke.sbatch), which `exec` it so that the
# signals SLURM sends to the batch shell arrive here:
#
#   slurm/job.sh CONFIG [section.key=value ...]
#
# It derives the rendezvous and runs one training task per SLURM task through slurm/launch.sh, which requeues the
# job when the trainer stopped with 75 (preempted or near the time limit, state saved), and restarts training inside
# the allocation when it failed (a lost rank, a hang, a task or node gone: up to ESVIT_MAX_RESTARTS times, default 3).
# Variables: slurm/README.md.
set -euo pipefail

CONFIG=${1:?usage: slurm/job.sh CONFIG [section.key=value ...]}
shift
ROOT=${ESVIT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}                 # the checkout holding train.py
PYTHON=${ESVIT_PYTHON:-$ROOT/.venv/bin/python}
# One folder per job name: a requeued job, and a job submitted again under the same name, resume their own run. A new
# experiment gets a new --job-name (or ESVIT_OUTPUT_DIR); a folder holding another model's checkpoints is refused.
OUTPUT_DIR=${ESVIT_OUTPUT_DIR:-$ROOT/runs/${SLURM_JOB_NAME}}
RESTART=${SLURM_RESTART_COUNT:-0}
export ESVIT_PYTHON=$PYTHON ESVIT_OUTPUT_DIR=$OUTPUT_DIR

# Rendezvous: the first host of the job's node list, a port from the job id and the restart count (a requeued
# job must not collide with sockets of its previous run that the OS has not released yet; launch.sh adds the attempt
# number for restarts inside the allocation).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 7 + RESTART * 16) % 20000))}
export MASTER_ADDR MASTER_PORT
# JIT-built DeepSpeed ops are cached in the checkout (built once, by the first job)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}

echo "[job] $SLURM_JOB_ID restart $RESTART: ${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS:-1} task(s), rendezvous" \
     "$MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR" >&2

cd "$ROOT"
# launch.sh, in this process (exec: the batch shell that SLURM signals), runs srun in the background, forwards
# USR1/TERM to it (srun passes them on to every task), waits until every task has ended, requeues the job when the
# trainer stopped with 75, and restarts a failed attempt. srun --wait: when a task ends (killed, its node lost) the
# others have that long to notice it, name it in the events log (exit 69) and exit, before srun ends them.
exec "$ROOT/slurm/launch.sh" --requeue --restarts "${ESVIT_MAX_RESTARTS:-3}" srun --wait="${ESVIT_TASK_WAIT_S:-120}" \
    "$PYTHON" train.py --config "$CONFIG" run.output_dir="$OUTPUT_DIR" "$@"
