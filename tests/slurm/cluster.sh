#!/usr/bin/env bash
# A real single-node SLURM cluster from Debian's packages (slurmctld slurmd slurm-client munge), for
# the tests: no systemd, no accounting, everything (config, state, logs, munge key) under DIR.
#
#   tests/slurm/cluster.sh start DIR   start munged, slurmctld and slurmd; wait until the node is idle
#   tests/slurm/cluster.sh stop DIR    cancel the jobs, then stop the daemons by their pid files
#
# Under DIR: slurm.conf (export SLURM_CONF=DIR/slurm.conf to use sbatch/squeue/scontrol), logs in
# DIR/log. Needs root (slurmd runs jobs as their users) and ports 6817/6818 free. The settings keep
# a requeued job's hold short (cred_expire=5) and the scheduler quick (2 s intervals).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
conf=$dir/slurm.conf
export SLURM_CONF=$conf

pid_of() { [ -s "$1" ] && cat "$1"; }

stop_pidfile() {  # TERM the daemon named by a pid file, wait for it to go, KILL it if it lingers
    local pid
    pid=$(pid_of "$1") || return 0
    kill "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
}

stop() {
    if [ -f "$conf" ] && [ -s "$dir/run/slurmctld.pid" ]; then
        timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        # give the jobs' processes KillWait to end before the daemons that track them go
        for _ in $(seq 40); do
            [ -z "$(timeout 5 squeue --noheader --states=all 2>/dev/null | grep -v -e ' CD ' -e ' CA ' -e ' F ')" ] && break
            sleep 0.25
        done
    fi
    stop_pidfile "$dir/run/slurmd.pid"
    stop_pidfile "$dir/run/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
}

start() {
    for bin in slurmctld slurmd sbatch munged mungekey runuser; do
        command -v "$bin" >/dev/null || { echo "$0: $bin not found; install slurmctld slurmd slurm-client munge" >&2; exit 3; }
    done
    [ "$(id -u)" -eq 0 ] || { echo "$0: needs root (slurmd starts jobs as their users)" >&2; exit 3; }
    id munge >/dev/null 2>&1 || { echo "$0: no munge user; install munge" >&2; exit 3; }
    stop  # a cluster left running in this DIR by an earlier start
    host=$(hostname -s)
    getent hosts "$host" >/dev/null || echo "127.0.1.1 $host" >> /etc/hosts

    # munged checks every folder on the way to its socket and key: traversable, not writable by others
    chmod 755 "$dir"
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/run" "$dir/log"
    chown munge:munge "$dir/munge"
    chmod 755 "$dir/munge"
    [ -s "$dir/munge/munge.key" ] || runuser -u munge -- mungekey --create --force --keyfile="$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

    # the node as slurmd sees it; RealMemory a little under the free memory, so the node is not drained
    node=$(slurmd -C | head -n1 | sed -e 's/ RealMemory=[0-9]*//')
    mem=$(( $(free -m | awk '/^Mem:/ {print $2}') * 9 / 10 ))
    cat > "$conf" <<EOF
ClusterName=gptlab-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=10
MinJobAge=300
InactiveLimit=0
$node RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    # -i: ignore saved state (job ids start again at 1); both daemonize and write their pid files
    slurmctld -i -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 150); do
        state=$(sinfo --noheader --format=%t 2>/dev/null | head -n1 || true)
        case $state in idle*) echo "slurm up in $dir: export SLURM_CONF=$conf"; return 0 ;; esac
        sleep 0.2
    done
    echo "$0: the node did not come up (state: ${state:-none}); see $dir/log" >&2
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    stop
    exit 1
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
