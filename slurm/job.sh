#!/usr/bin/env bash
# The body shared by the batch templates (pretrain.sbatch, cpu_smoke.sbatch), which `exec` it so that the
# signals SLURM sends to the batch shell arrive here:
#
#   slurm/job.sh CONFIG [section.key=value ...]
#
# It derives the rendezvous and runs one training task per SLURM task through slurm/launch.sh, which requeues the
# job when the trainer stopped with 75 (preempted or near the time limit, state saved). Variables: slurm/README.md.
set -euo pipefail

CONFIG=${1:?usage: slurm/job.sh CONFIG [section.key=value ...]}
shift
ROOT=${ESVIT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}                 # the checkout holding train.py
PYTHON=${ESVIT_PYTHON:-$ROOT/.venv/bin/python}
# The same folder for every restart of this job, so that a requeued job resumes from its own checkpoints.
OUTPUT_DIR=${ESVIT_OUTPUT_DIR:-$ROOT/runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
RESTART=${SLURM_RESTART_COUNT:-0}

# Rendezvous: the first host of the job's node list, a port from the job id and the restart count (a requeued
# job must not collide with sockets of its previous run that the OS has not released yet).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 7 + RESTART) % 20000))}
export MASTER_ADDR MASTER_PORT
# JIT-built DeepSpeed ops are cached in the checkout (built once, by the first job)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}

echo "[job] $SLURM_JOB_ID restart $RESTART: ${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS:-1} task(s), rendezvous" \
     "$MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR" >&2

cd "$ROOT"
# launch.sh, in this process (exec: the batch shell that SLURM signals), runs srun in the background, forwards
# USR1/TERM to it (srun passes them on to every task), waits until every task has ended, and requeues the job when
# the trainer stopped with 75. On success or a real failure the job ends with the trainer's status.
exec "$ROOT/slurm/launch.sh" --requeue srun --kill-on-bad-exit=1 "$PYTHON" train.py --config "$CONFIG" \
    run.output_dir="$OUTPUT_DIR" "$@"
