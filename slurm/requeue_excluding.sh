#!/usr/bin/env bash
# Requeue a running job with some hosts excluded (a node named in two failures, cluster/restarts.py):
#
#   slurm/requeue_excluding.sh JOBID HOST[,HOST...]
#
# SLURM changes a job's excluded nodes only while the job is pending, and a requeue ends every process of the job,
# this script's caller included. So a one-task helper job is submitted first: it waits until the job is back in the
# queue (held), sets its ExcNodeList, and releases it; then the job requeues itself, held. The job keeps its id and
# its output folder, and resumes from its checkpoint on other nodes.
set -euo pipefail
job=${1:?usage: requeue_excluding.sh JOBID HOSTS}
hosts=${2:?usage: requeue_excluding.sh JOBID HOSTS}
field() { scontrol show job -o "$job" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -1; }
partition=$(field Partition)
account=$(field Account)
sbatch --job-name="esvit-exclude-$job" --ntasks=1 --cpus-per-task=1 --time=15 --output=/dev/null \
    ${partition:+--partition="$partition"} ${account:+--account="$account"} --wrap "
    for i in \$(seq 900); do
        scontrol show job -o $job | grep -q 'JobState=PENDING' && break
        sleep 1
    done
    scontrol update JobId=$job ExcNodeList=$hosts && scontrol release $job" >&2
echo "[requeue] job $job: requeued held; a helper job excludes $hosts and releases it" >&2
scontrol requeuehold "$job"
