#!/usr/bin/env bash
# Runs a training launcher (srun, torchrun, or plain python) so that a job script can rely on its exit status:
#
#   slurm/launch.sh [--requeue] [--restarts N] srun python train.py --config C ...
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
# - --restarts N: a failed attempt (any status but 0, 2 = config error, and 75) is run again inside the allocation,
#   up to N times, as esvit_scale/cluster/restarts.py decides from the run's events log ($ESVIT_OUTPUT_DIR): after a
#   back-off, with a node named in two failures left out (srun --exclude, on fewer nodes) or the job requeued with
#   it excluded (slurm/requeue_excluding.sh). Each attempt gets ESVIT_ATTEMPT and its own MASTER_PORT. When the restarts are used up, one line
#   says why and the status is the last attempt's.
# - --requeue (inside a SLURM batch job): on 75, `scontrol requeue` the job, which then resumes from its
#   checkpoint, and exit 0. The batch templates `exec` this script, so that it is the batch shell that SLURM's
#   `--signal=B:...` and `scancel --batch` reach.
set -u
set -m                                   # the command gets a process group of its own (not hit by Ctrl-C twice)

requeue=0
restarts=0
while [ $# -gt 0 ]; do
    case "$1" in
        --requeue) requeue=1; shift ;;
        --restarts) restarts=$2; shift 2 ;;
        *) break ;;
    esac
done

status_file=$(mktemp "${TMPDIR:-/tmp}/esvit_exit_status.XXXXXX")
export ESVIT_EXIT_STATUS_FILE=$status_file
trap 'rm -f "$status_file" "$status_file.pids"' EXIT

child=""
stopping=0
forward() {
    stopping=1
    if [ -n "$child" ]; then
        echo "[launch] $1 received: forwarding it to pid $child" >&2
        kill -s "$1" "$child" 2>/dev/null || true
    else
        echo "[launch] $1 received between attempts: not starting another" >&2
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT

trainer_alive() {
    local pid
    [ -s "$status_file.pids" ] || return 1
    while read -r pid; do
        kill -0 "$pid" 2>/dev/null && return 0
    done < "$status_file.pids"
    return 1
}

# One attempt: the command to its real end, and every trainer it started; sets rc.
run_once() {
    : > "$status_file"
    : > "$status_file.pids"
    "$@" &
    child=$!
    echo "[launch] started pid $child: $*" >&2
    while kill -0 "$child" 2>/dev/null; do
        wait "$child"                    # returns > 128 when a trap interrupted it: then wait again
    done
    wait "$child"                        # the command's own status (bash keeps it after the end)
    rc=$?
    child=""
    while trainer_alive; do              # orphaned workers finishing their save
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
}

command=("$@")
base_port=${MASTER_PORT:-}
attempt=0
while true; do
    export ESVIT_ATTEMPT=$attempt
    [ -n "$base_port" ] && export MASTER_PORT=$((base_port + attempt))   # the last attempt's sockets may linger
    run_once "${command[@]}"
    if [ "$stopping" -eq 1 ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ]; then
        echo "[launch] stopped by a signal while the attempt exited $rc: reporting 75 (resume from the last" \
             "checkpoint)" >&2
        rc=75
    fi
    case "$rc" in 0 | 2 | 75) break ;; esac
    [ "$restarts" -gt 0 ] || break
    plan=$("${ESVIT_PYTHON:-python3}" -m esvit_scale.cluster.restarts --output-dir "${ESVIT_OUTPUT_DIR:-.}" \
           --exit-code "$rc" --attempt "$attempt" --max-restarts "$restarts") || \
        plan="action=give_up reason='the restart planner failed (see above); the last attempt exited $rc'"
    action="" reason="" wait_s=0 srun_args="" exclude=""
    eval "$plan"
    if [ "$action" = "requeue" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "[launch] $reason" >&2
        "$(dirname "$0")/requeue_excluding.sh" "$SLURM_JOB_ID" "$exclude" && exit 0
        echo "[launch] giving up: the requeue with $exclude excluded was refused" >&2
        break
    fi
    if [ "$action" != "restart" ]; then
        echo "[launch] giving up: $reason" >&2
        break
    fi
    attempt=$((attempt + 1))
    echo "[launch] $reason: restarting in ${wait_s} s (restart $attempt of $restarts)" >&2
    sleep "$wait_s" &
    wait $! || true
    if [ "$stopping" -eq 1 ]; then
        rc=75
        break
    fi
    if [ -n "$srun_args" ] && [ "$(basename "$1")" = "srun" ]; then
        read -r -a extra <<< "$srun_args"          # the planner's srun options hold every host left out so far
        command=("$1" "${extra[@]}" "${@:2}")
    fi
done

echo "[launch] exit status $rc" >&2
if [ "$rc" -eq 75 ] && [ "$requeue" -eq 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "[launch] preempted and saved: requeueing job $SLURM_JOB_ID" >&2
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    echo "[launch] the requeue was refused (submitted with --no-requeue?): submit the job again to resume" >&2
fi
exit "$rc"
