#!/usr/bin/env bash
# Start (or stop) a private Slurm for tests: munged, slurmctld and one slurmd per node, all under STATE_DIR.
#
#   .ci/start_slurm.sh start STATE_DIR [CTLD_PORT] [SLURMD_PORT] [FIRST_JOB_ID] [NODES]  # prints SLURM_CONF=...
#   .ci/start_slurm.sh stop  STATE_DIR                              # stops the daemons by their PIDs
#
# Nothing here touches a system Slurm: own config file (use it with SLURM_CONF=...), own munge socket,
# own ports (default 46817/46818, outside Ray's worker range 10002-19999), own spool and state dirs.
# NODES > 1 (default 1, node kscale-node): nodes kscale-n1..kscale-nN on this one host, each its own
# `slurmd -N NAME` on its own port (SLURMD_PORT + i - 1) with its own pid file, spool dir and log (%n).
# Needs root (munged runs as user munge). tests/cluster/conftest.py calls it; it is also handy by hand.
set -euo pipefail

cmd=${1:?usage: start_slurm.sh start|stop STATE_DIR [CTLD_PORT] [SLURMD_PORT] [FIRST_JOB_ID] [NODES]}
state=$(realpath -m "${2:?STATE_DIR missing}")
ctld_port=${3:-46817}
slurmd_port=${4:-46818}
first_job_id=${5:-1}  # distinct per instance, so job-id-derived names and ports differ between instances
n_nodes=${6:-1}
if [ "$n_nodes" = 1 ]; then
    names=(kscale-node)
else
    names=()
    for ((i = 1; i <= n_nodes; i++)); do names+=("kscale-n$i"); done
fi

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
    for pidfile in "$state"/slurmd*.pid; do stop_pid slurmd "$pidfile"; done
    stop_pid slurmctld "$state/slurmctld.pid"
    stop_pid munged "$state/munge/munged.pid"
    exit 0
fi
[ "$cmd" = start ] || { echo "unknown command $cmd (start|stop)" >&2; exit 2; }

mkdir -p "$state"/{spool,ctld,log,munge}
for name in "${names[@]}"; do mkdir -p "$state/spool-$name"; done
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
SlurmdSpoolDir=$state/$(if [ "$n_nodes" = 1 ]; then echo spool; else echo spool-%n; fi)
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/$(if [ "$n_nodes" = 1 ]; then echo slurmd.pid; else echo slurmd-%n.pid; fi)
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/$(if [ "$n_nodes" = 1 ]; then echo slurmd.log; else echo slurmd-%n.log; fi)
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
CONF
for i in "${!names[@]}"; do
    port_opt=""
    [ "$n_nodes" = 1 ] || port_opt=" Port=$((slurmd_port + i))"
    echo "NodeName=${names[i]} NodeAddr=127.0.0.1 NodeHostname=$host$port_opt CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
done >> "$state/slurm.conf"
node_list=$(IFS=,; echo "${names[*]}")
echo "PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$state/slurm.conf"
export SLURM_CONF="$state/slurm.conf"

if ! { [ -s "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; }; then
    slurmctld -i -f "$SLURM_CONF"
fi
for name in "${names[@]}"; do
    pidfile="$state/slurmd-$name.pid"
    [ "$n_nodes" = 1 ] && pidfile="$state/slurmd.pid"
    if ! { [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }; then
        slurmd -N "$name" -f "$SLURM_CONF"
    fi
done
for _ in $(seq 150); do  # wait until every node takes jobs (idle), at most 30 s
    st=$(sinfo -h -N -n "$node_list" -o %T 2>/dev/null || true)
    ready=$(grep -cE '^(idle|mixed|allocated)' <<<"$st" || true)
    if [ "$ready" = "$n_nodes" ]; then echo "SLURM_CONF=$SLURM_CONF"; exit 0; fi
    sleep 0.2
done
echo "slurm did not come up (node states: ${st:-unknown}); logs in $state/log" >&2
exit 1
