#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests and for trying the templates without a cluster.
#
#   slurm/local_cluster.sh start    install Debian's SLURM + munge if missing, start munged, slurmctld, slurmd
#   slurm/local_cluster.sh stop     cancel every job, stop the daemons
#   slurm/local_cluster.sh status   sinfo
#
# Needs root (apt-get, munged as the munge user, slurmd). Everything the daemons write lives under
# $ESVIT_SLURM_DIR (default /tmp/esvit_slurm): config, state, spool, logs, pid files. The node is this machine
# (`slurmd -C`), reached at 127.0.0.1, in one partition `debug` that is the default.
set -euo pipefail

DIR=${ESVIT_SLURM_DIR:-/tmp/esvit_slurm}
CONF=$DIR/slurm.conf

log() { echo "[local_cluster] $*" >&2; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null && return
    log "installing slurmctld slurmd slurm-client munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    pgrep -x munged >/dev/null && return
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key >/dev/null 2>&1 ||
        mungekey -c -k /etc/munge/munge.key
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    runuser -u munge -- munged
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log}
    # this machine's node line (CPUs, sockets, memory), addressed by loopback
    local node
    node=$(slurmd -C | head -1)
    cat > "$CONF" <<EOF
ClusterName=esvit-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=20
MinJobAge=300
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$(hostname -s) Default=YES MaxTime=INFINITE State=UP
EOF
    # the commands (sbatch, scontrol, ...) read /etc/slurm/slurm.conf unless SLURM_CONF says otherwise
    mkdir -p /etc/slurm
    ln -sf "$CONF" /etc/slurm/slurm.conf
}

wait_idle() {
    local i state
    for i in $(seq 1 60); do
        state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mix|alloc) log "node $(hostname -s) is $state"; return 0 ;;
            down*|drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    log "the node did not become idle within 60 s; logs in $DIR/log"
    sinfo >&2 || true
    tail -n 20 "$DIR"/log/*.log >&2 || true
    return 1
}

start() {
    install_packages
    start_munge
    if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null; then
        wait_idle
        return
    fi
    write_config
    pgrep -x slurmctld >/dev/null || slurmctld -f "$CONF"
    pgrep -x slurmd >/dev/null || slurmd -f "$CONF"
    wait_idle
}

stop() {
    command -v scancel >/dev/null || return 0
    scancel --full --user=root 2>/dev/null || true
    # steps keep running when slurmd stops: wait for the cancelled jobs to be gone first
    local i
    for i in $(seq 1 30); do
        [ -z "$(squeue -h 2>/dev/null)" ] && break
        sleep 1
    done
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for i in $(seq 1 30); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
        sleep 1
    done
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
