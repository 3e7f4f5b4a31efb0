#!/usr/bin/env bash
# Runs a training launcher (srun, torchrun, or plain python) so that a job script can rely on its exit status:
#
#   slurm/launch.sh [--requeue] srun python train.py --config C ...
#   slurm/launch.sh [--requeue] torchrun --nproc_per_node 8 train.py --config C ...
#
# - The command runs in the background, in a process group of its own; SIGUSR1, SIGTERM and SIGINT that reach
#   this script are forwarded to it (bash runs a trap only between commands, so a foreground command would never
#   see them: this is why the signal of `sbatch --signal=B:USR1@120` must be forwarded by hand).
# - It waits until the command has really ended, and then until every trainer process it started has ended (they
#   list their pids in $ESVIT_EXIT_STATUS_FILE.pids): workers whose launcher was killed outright (torchrun dies
#   of SIGUSR1) are still writing their checkpoint.
# - Exit status: 75 ("preempted, saved": run the job again) when the command exited 75, or when every rank of the
#   run recorded 75 in $ESVIT_EXIT_STATUS_FILE (torchrun reports 1, or dies of the signal, when its workers
#   exit 75); otherwise the command's own status.
# - --requeue (inside a SLURM batch job): on 75, `scontrol requeue` the job, which then resumes from its
#   checkpoint, and exit 0. The batch templates `exec` this script, so that it is the batch shell that SLURM's
#   `--signal=B:...` and `scancel --batch` reach.
set -u
set -m                                   # the command gets a process group of its own (not hit by Ctrl-C twice)

requeue=0
if [ "${1:-}" = "--requeue" ]; then
    requeue=1
    shift
fi

status_file=$(mktemp "${TMPDIR:-/tmp}/esvit_exit_status.XXXXXX")
export ESVIT_EXIT_STATUS_FILE=$status_file
trap 'rm -f "$status_file" "$status_file.pids"' EXIT

"$@" &
child=$!
echo "[launch] started pid $child: $*" >&2

forward() {
    echo "[launch] $1 received: forwarding it to pid $child" >&2
    kill -s "$1" "$child" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT

while kill -0 "$child" 2>/dev/null; do
    wait "$child"                        # returns > 128 when a trap interrupted it: then wait again
done
wait "$child"                            # the command's own status (bash keeps it after the end)
rc=$?

trainer_alive() {
    local pid
    [ -s "$status_file.pids" ] || return 1
    while read -r pid; do
        kill -0 "$pid" 2>/dev/null && return 0
    done < "$status_file.pids"
    return 1
}
while trainer_alive; do                  # orphaned workers finishing their save
    sleep 1
done

if [ "$rc" -ne 75 ] && [ -s "$status_file" ]; then
    world=$(sed -n 's/.*world_size=\([0-9]*\).*/\1/p' "$status_file" | head -1)
    ranks_75=$(awk '$1 == 75 {print $2}' "$status_file" | sort -u | wc -l)
    others=$(awk '$1 != 75' "$status_file" | wc -l)
    if [ -n "$world" ] && [ "$ranks_75" -eq "$world" ] && [ "$others" -eq 0 ]; then
        echo "[launch] the command exited $rc, but all $world ranks stopped with 75 (preempted, saved)" >&2
        rc=75
    fi
fi
echo "[launch] exit status $rc" >&2
if [ "$rc" -eq 75 ] && [ "$requeue" -eq 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "[launch] preempted and saved: requeueing job $SLURM_JOB_ID" >&2
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    echo "[launch] the requeue was refused (submitted with --no-requeue?): submit the job again to resume" >&2
fi
exit "$rc"
