#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine, for trying the SLURM preset and for the tests.
#
#   eval "$(scripts/local_slurm.sh start)"        # prints: export SLURM_CONF=<dir>/slurm.conf
#   python run.py -m rank=4,8 hydra/launcher=slurm hydra.launcher.partition=debug \
#       hydra.launcher.gpus_per_node=null hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=2
#   scripts/local_slurm.sh stop                   # the cluster of $SLURM_CONF (or: stop <dir>)
#
# start [DIR]: munged with its own key and socket, slurmctld and slurmd (partition "debug", this node's
# real CPUs and memory, no cgroups, no accounting), every state, spool, log, socket and pid file under
# DIR (default: a new temp dir). Needs root and Debian's slurmctld, slurmd, slurm-client and munge.
# stop [DIR]: cancels the cluster's jobs, then stops the daemons that start wrote pid files for, and
# only those. The directory stays, with the daemons' logs in DIR/log.
set -euo pipefail

die() { echo "local_slurm: $*" >&2; exit 1; }

# The pid in FILE, if that process is alive.
live_pid() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# A TCP port nothing listens on.
free_port() {
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free TCP port found"
}

write_conf() {
    local dir=$1 node cpus mem
    node=$(hostname -s)
    cpus=$(nproc)
    # The node's real memory (MB) as slurmd sees it; jobs ask for mem_gb out of it.
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [ -n "$mem" ] || die "slurmd -C did not report RealMemory"
    cat >"$dir/slurm.conf" <<EOF
# Written by scripts/local_slurm.sh: a single-node cluster for local tries and tests.
ClusterName=nnsvd-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it starts again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups in containers: track job processes by their parent pids, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct has nothing to read.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# Look at pending jobs every second: a requeued job starts soon after its begin time.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or preempted.
KillWait=30
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    local dir=${1:-}
    [ "$(id -u)" -eq 0 ] || die "needs root (slurmd runs jobs as their user)"
    for cmd in munged slurmctld slurmd sbatch scontrol sinfo; do
        command -v "$cmd" >/dev/null || die "$cmd not found: apt-get install slurmctld slurmd slurm-client munge"
    done
    if [ -z "$dir" ]; then
        dir=$(mktemp -d -t nnsvd-slurm.XXXXXX)
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ -z "$(live_pid "$dir/run/slurmctld.pid" || true)" ] || die "a cluster is already running in $dir"
    mkdir -p "$dir"/{munge,state,spool,run,log}
    # Readable by all: users other than root submit jobs too (the key itself is root-only).
    chmod 755 "$dir" "$dir/munge"

    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    write_conf "$dir"
    export SLURM_CONF="$dir/slurm.conf"

    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket.2" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
        || die "munged did not start; see $dir/log/munged.log"
    slurmctld -f "$SLURM_CONF" -i || die "slurmctld did not start; see $dir/log/slurmctld.log"
    slurmd -f "$SLURM_CONF" -N "$(hostname -s)" || die "slurmd did not start; see $dir/log/slurmd.log"

    # Ready when the node is idle in partition debug.
    local state=""
    for _ in $(seq 150); do
        state=$(sinfo -h -p debug -o %T 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.2
    done
    if [ "$state" != idle ]; then
        stop "$dir" >/dev/null 2>&1 || true
        die "the node did not become idle (state '${state:-none}'); see the logs in $dir/log"
    fi
    echo "local_slurm: cluster up in $dir (partition debug, $(nproc) CPUs)" >&2
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    local dir=${1:-}
    if [ -z "$dir" ]; then
        [ -n "${SLURM_CONF:-}" ] || die "stop needs the cluster's directory, or SLURM_CONF set"
        dir=$(dirname "$SLURM_CONF")
    fi
    [ -f "$dir/slurm.conf" ] || die "$dir/slurm.conf not found: not a directory made by local_slurm.sh start"
    export SLURM_CONF="$dir/slurm.conf"
    if live_pid "$dir/run/slurmctld.pid" >/dev/null; then
        # The jobs of this cluster only; they get SIGTERM, then SIGKILL after KillWait.
        scancel --quiet --partition=debug 2>/dev/null || true
        for _ in $(seq 200); do
            [ -z "$(squeue -h -t running,completing,suspended -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    local name pid pids=()
    for name in slurmd slurmctld munged; do
        pid=$(live_pid "$dir/run/$name.pid") || continue
        kill -TERM "$pid" 2>/dev/null && pids+=("$name:$pid")
    done
    for entry in "${pids[@]}"; do
        name=${entry%%:*} pid=${entry#*:}
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "local_slurm: $name ($pid) ignored SIGTERM for 10 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    echo "local_slurm: cluster in $dir stopped" >&2
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 start [DIR] | stop [DIR]" ;;
esac
