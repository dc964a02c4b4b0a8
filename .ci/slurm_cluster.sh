#!/usr/bin/env bash
# A single-node Slurm cluster on 127.0.0.1 for tests/test_slurm.py (Debian's slurm-wlm + munge).
#
#   .ci/slurm_cluster.sh start   # as root: munged, slurmctld, slurmd; waits until the node is idle
#   .ci/slurm_cluster.sh stop    # stops the three daemons this script started
#   .ci/slurm_cluster.sh status
#
# One node with this machine's CPUs and memory, select/cons_tres, no cgroups (proctrack/linuxproc,
# task/none), no accounting database (sacct does not work; bench's Slurm executor polls squeue).
# State, spool and logs live under $SLURM_TEST_DIR (default /tmp/bench-slurm). The config is
# written there and linked from /etc/slurm/slurm.conf so that sbatch/squeue/scancel find it; an
# /etc/slurm/slurm.conf that is not our link is left alone (the script then refuses to start).
set -euo pipefail

DIR="${SLURM_TEST_DIR:-/tmp/bench-slurm}"
CONF=/etc/slurm/slurm.conf
NODE="$(hostname -s)"

die() { echo "slurm_cluster: $*" >&2; exit 1; }

write_conf() {
    local cpus mem
    cpus="$(nproc --all)"
    # slurmd refuses a node that reports less memory than configured: leave 10 % slack
    mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge-run"
    cat > "$DIR/slurm.conf" <<EOF
ClusterName=bench
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# scancel: SIGTERM, then SIGKILL after KillWait seconds; finished jobs stay visible to squeue
KillWait=2
MinJobAge=600
SchedulerParameters=sched_interval=1
DefMemPerCPU=512
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [ "$(id -u)" = 0 ] || die "start needs root (it runs munged, slurmctld and slurmd)"
    command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || die "slurm-wlm and munge are not installed: apt-get install -y slurm-wlm munge"
    if [ -e "$CONF" ] && [ "$(readlink "$CONF" || true)" != "$DIR/slurm.conf" ]; then
        die "$CONF exists and is not this script's; refusing to replace a real cluster's config"
    fi
    write_conf
    mkdir -p /etc/slurm
    ln -sfn "$DIR/slurm.conf" "$CONF"
    # munge: its own user, socket dir and key (Debian's package makes the key)
    [ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey --create >/dev/null 2>&1 || \
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! munge -n >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    fi
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n >/dev/null 2>&1 || die "munged did not start"
    [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null \
        || /usr/sbin/slurmctld -c   # -c: a fresh state (no jobs of an earlier run)
    [ -f "$DIR/slurmd.pid" ] && kill -0 "$(cat "$DIR/slurmd.pid")" 2>/dev/null || /usr/sbin/slurmd
    for _ in $(seq 60); do
        state="$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)"
        case "$state" in idle|mix|alloc) echo "slurm_cluster: node $NODE $state ($DIR)"; return 0 ;; esac
        sleep 0.5
    done
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    sinfo -h -N -o %t 2>/dev/null | grep -qE 'idle|mix|alloc' && return 0
    die "the node did not come up; see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

stop() {
    for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    if [ "$(readlink "$CONF" || true)" = "$DIR/slurm.conf" ]; then rm -f "$CONF"; fi
    echo "slurm_cluster: stopped (munged left running; state in $DIR)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo && squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
