#!/usr/bin/env bash
# Start (or stop) a private single-node Slurm for tests: munged, slurmctld and slurmd, all under STATE_DIR.
#
#   .ci/start_slurm.sh start STATE_DIR [CTLD_PORT] [SLURMD_PORT] [FIRST_JOB_ID]  # prints SLURM_CONF=...
#   .ci/start_slurm.sh stop  STATE_DIR                              # stops the three daemons by their PIDs
#
# Nothing here touches a system Slurm: own config file (use it with SLURM_CONF=...), own munge socket,
# own ports (default 46817/46818, outside Ray's worker range 10002-19999), own spool and state dirs.
# Needs root (munged runs as user munge). tests/cluster/conftest.py calls it; it is also handy by hand.
set -euo pipefail

cmd=${1:?usage: start_slurm.sh start|stop STATE_DIR [CTLD_PORT] [SLURMD_PORT]}
state=$(realpath -m "${2:?STATE_DIR missing}")
ctld_port=${3:-46817}
slurmd_port=${4:-46818}
first_job_id=${5:-1}  # distinct per instance, so job-id-derived names and ports differ between instances
node=kscale-node

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, wait up to 5 s, then SIGKILL
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        echo "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

if [ "$cmd" = stop ]; then
    stop_pid slurmd "$state/slurmd.pid"
    stop_pid slurmctld "$state/slurmctld.pid"
    stop_pid munged "$state/munge/munged.pid"
    exit 0
fi
[ "$cmd" = start ] || { echo "unknown command $cmd (start|stop)" >&2; exit 2; }

mkdir -p "$state"/{spool,ctld,log,munge}
chmod 755 "$state" "$state/munge"
chown munge:munge "$state/munge"
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi

sock="$state/munge/munge.socket"
if ! { [ -s "$state/munge/munged.pid" ] && kill -0 "$(cat "$state/munge/munged.pid")" 2>/dev/null; }; then
    runuser -u munge -- munged --force --socket="$sock" --pid-file="$state/munge/munged.pid" \
        --log-file="$state/munge/munged.log" --seed-file="$state/munge/munged.seed" \
        --key-file=/etc/munge/munge.key
fi

cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
host=$(hostname -s)
cat > "$state/slurm.conf" <<CONF
ClusterName=kscaleci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$sock
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
FirstJobId=$first_job_id
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$state/slurm.conf"

if ! { [ -s "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; }; then
    slurmctld -i -f "$SLURM_CONF"
fi
if ! { [ -s "$state/slurmd.pid" ] && kill -0 "$(cat "$state/slurmd.pid")" 2>/dev/null; }; then
    slurmd -N "$node" -f "$SLURM_CONF"
fi
for _ in $(seq 100); do  # wait until the node takes jobs (idle), at most 20 s
    st=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
    case "$st" in idle*|mixed*|allocated*) echo "SLURM_CONF=$SLURM_CONF"; exit 0 ;; esac
    sleep 0.2
done
echo "slurm did not come up (node state: ${st:-unknown}); logs in $state/log" >&2
exit 1
