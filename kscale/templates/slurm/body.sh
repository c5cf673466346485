# ---- kscale Slurm body: start Ray (or dask) across the allocation, run the driver, stop only our own ----
# Rendered by kscale.targets.slurm below the #SBATCH header and the KSCALE_* settings above; identical
# for every job, so it can be read (and shellchecked) once. Safe on shared nodes:
#   - a per-job, per-node Ray temp dir on node-local disk (random name ending in the node's index in the job,
#     created 0700 and owner-checked), removed at the end;
#   - the head's ports derived from the job id (20000 + 10 x (id mod 4000)), outside Ray's worker range
#     10002-19999; the other nodes' Ray services take free ports from the kernel (none is fixed: nodes that
#     share a host, and other jobs' blocks, are never in the way);
#   - CPU and GPU counts passed to Ray explicitly from Slurm's variables, never auto-detected;
#   - token authentication with a fresh per-job token (in the environment, and for the dashboard in a
#     0600 file beside the records, removed at the end);
#   - dask (analysis jobs) speaks TLS with a fresh per-job certificate (0600 files, removed at the end);
#   - it waits for every node to join before the driver starts;
#   - every service (Ray head/workers, dask scheduler/workers) runs in its srun step under a node-side
#     wrapper (python -m kscale.targets.slurm_node) that keeps the service's output and the node's Ray logs in
#     the record dir, stops the service, removes the node's temp dir and ends the step cleanly, when asked
#     through a stop file (newest service first) or by scancel/the time limit: never `ray stop`, never a
#     signalled srun, no new srun step after the allocation ends.

job_id=${SLURM_JOB_ID:?this script runs under sbatch}
# `kscale submit` made the record dir 0700; it holds the env file, the Ray token and TLS keys, so refuse one
# that is a link, another user's, or writable by others (a name in it could have been planted).
if [ -L "$KSCALE_RECORD_DIR" ] || [ ! -d "$KSCALE_RECORD_DIR" ] || [ ! -O "$KSCALE_RECORD_DIR" ] ||
   [ -n "$(find "$KSCALE_RECORD_DIR" -maxdepth 0 -perm /022)" ]; then
    echo "kscale: refusing record dir $KSCALE_RECORD_DIR: it must be a folder of yours that only you can write" >&2
    exit 1
fi
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
n_nodes=${#nodes[@]}
head_ip=$(hostname -I 2>/dev/null | awk '{print $1}')
head_ip=${head_ip:-$(hostname --ip-address | awk '{print $1}')}
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
gpus=${SLURM_GPUS_ON_NODE:-0}
port_base=${KSCALE_PORT_BASE:-$((20000 + 10 * (job_id % 4000)))}
gcs_port=$port_base
dashboard_port=$((port_base + 1))
dask_port=$((port_base + 9))
# Node-local and unpredictable; each node's wrapper replaces {node} by the node's index in "${nodes[@]}" (so
# Slurm nodes sharing a host get their own), creates it 0700 and refuses one that exists and is not ours.
node_tmp="$KSCALE_TMP_BASE/kscale-${SLURM_CLUSTER_NAME:-slurm}-$job_id-$(od -An -tx1 -N4 /dev/urandom | tr -d ' \n')-n{node}"

RAY_AUTH_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN RAY_USAGE_STATS_ENABLED=0
token_file="$KSCALE_RECORD_DIR/$KSCALE_ID.ray-token"  # for the dashboard's prompt; owner-only
(umask 077 && printf '%s\n' "$RAY_AUTH_TOKEN" > "$token_file")
tls_dir=""
# Ray drains a node for 30 s on SIGTERM (for Serve traffic); at cleanup the driver is done, nothing to drain.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

pids=()          # our service steps (srun PIDs) and, at the same index, their names
services=()
driver_pid=""
stop_dir="$KSCALE_RECORD_DIR/$KSCALE_ID.stop"       # stop_dir/NAME asks service NAME to end
logs_dir="$KSCALE_RECORD_DIR/$KSCALE_RUNTIME-logs/$KSCALE_ID"  # NODE/NAME.out and each node's Ray logs
rm -rf "$stop_dir"
mkdir -p "$stop_dir"
cleaned=0

# Run a command on the nodes of an srun step, inside the container when one is configured.
step() {  # step SRUN_ARGS... -- COMMAND...
    local args=()
    while [ "$1" != "--" ]; do args+=("$1"); shift; done
    shift
    if [ -n "$KSCALE_CONTAINER_IMAGE" ]; then
        args+=(--container-image="$KSCALE_CONTAINER_IMAGE")
        [ -n "$KSCALE_CONTAINER_MOUNTS" ] && args+=(--container-mounts="$KSCALE_CONTAINER_MOUNTS")
    fi
    args=(--overlap --quiet --kill-on-bad-exit=0 "${args[@]}")
    # In the background (`step ... &`) the subshell becomes srun, so that $! is srun's PID.
    if [ "$BASHPID" != "$$" ]; then exec srun "${args[@]}" "$@"; fi
    srun "${args[@]}" "$@"
}

# Start a long-lived service in the background in its own step, under the node-side wrapper.
service() {  # service NAME TEMP_DIR_OR_EMPTY SRUN_ARGS... -- COMMAND...
    local name=$1 temp=$2 args=()
    shift 2
    while [ "$1" != "--" ]; do args+=("$1"); shift; done
    shift
    step "${args[@]}" -- "$KSCALE_PYTHON" -m kscale.targets.slurm_node --name "$name" \
        --stop-file "$stop_dir/$name" --logs-to "$logs_dir" --temp-dir "$temp" --job-nodes "${nodes[*]}" -- "$@" &
    pids+=($!)
    services+=("$name")
}

# shellcheck disable=SC2317  # used by cleanup, through the EXIT trap
gone_within() {  # gone_within PID SECONDS: true once PID has exited
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.2
    done
    return 1
}

# The head's node services on the job's block; every other node's on free ports the kernel picks (0). The same
# block on each node is fine on separate hosts but collides where Slurm nodes share one, and a block per node
# (port_base + 10 x node) would be the next job's: on a shared node that job's head could not start.
ray_ports=(--node-manager-port=$((port_base + 3)) --object-manager-port=$((port_base + 4))
           --dashboard-agent-grpc-port=$((port_base + 5)) --dashboard-agent-listen-port=$((port_base + 6))
           --metrics-export-port=$((port_base + 7)) --runtime-env-agent-port=$((port_base + 8)))
worker_ports=(--node-manager-port=0 --object-manager-port=0 --dashboard-agent-grpc-port=0
              --dashboard-agent-listen-port=0 --metrics-export-port=0 --runtime-env-agent-port=0)
ray_node=(--block --num-cpus="$cpus" --num-gpus="$gpus" --temp-dir="$node_tmp" --disable-usage-stats)
[ -n "$KSCALE_OBJECT_STORE_BYTES" ] && ray_node+=(--object-store-memory="$KSCALE_OBJECT_STORE_BYTES")

# shellcheck disable=SC2317  # runs through the EXIT trap
cleanup() {
    [ "$cleaned" = 1 ] && return
    cleaned=1
    trap '' TERM INT
    echo "kscale: stopping our services: ${services[*]:-none}"
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do  # newest first: Ray workers before the head
        touch "$stop_dir/${services[i]}" || true
        gone_within "${pids[i]}" 60 && continue
        echo "kscale: ${services[i]} did not stop within 60 s; signalling its step" >&2
        kill -TERM "${pids[i]}" 2>/dev/null || true
        gone_within "${pids[i]}" 30 || kill -KILL "${pids[i]}" 2>/dev/null || true
    done
    rm -rf "$stop_dir" "$token_file"
    if [ -n "$tls_dir" ]; then rm -rf "$tls_dir"; fi
    echo "kscale: logs in $KSCALE_RECORD_DIR (services' output and each node's Ray logs in $logs_dir)"
}
# shellcheck disable=SC2317  # runs through the TERM/INT trap
on_signal() {
    echo "kscale: signal received (time limit near, or scancel); stopping the driver"
    [ -n "$driver_pid" ] && { kill -TERM "$driver_pid" 2>/dev/null || true; }
}
trap cleanup EXIT
trap on_signal TERM INT

wait_for_port() {  # wait_for_port HOST PORT SECONDS PID: until the port answers, while PID (the step) lives
    for _ in $(seq "$3"); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        kill -0 "$4" 2>/dev/null || { echo "kscale: the step that should listen on $1:$2 ended" >&2; return 1; }
        sleep 1
    done
    echo "kscale: nothing listens on $1:$2 after $3 s" >&2
    return 1
}

cat > "$KSCALE_RECORD_DIR/$KSCALE_ID.slurm.json" <<JSON
{"slurm_job_id": "$job_id", "head_node": "$head_node", "head_ip": "$head_ip", "nodes": $n_nodes,
 "runtime": "$KSCALE_RUNTIME", "gcs_port": $gcs_port, "dashboard_port": $dashboard_port, "dask_port": $dask_port}
JSON

if [ "$KSCALE_RUNTIME" = ray ]; then
    echo "kscale: starting Ray head on $head_node ($head_ip:$gcs_port), $cpus CPU(s) and $gpus GPU(s) per node"
    service ray-head "$node_tmp" --nodes=1 --ntasks=1 --cpus-per-task="$cpus" -w "$head_node" -- \
        "$KSCALE_PYTHON" -m ray.scripts.scripts start --head --node-ip-address="$head_ip" --port="$gcs_port" \
        --dashboard-host="$KSCALE_DASHBOARD_HOST" --dashboard-port="$dashboard_port" \
        --ray-client-server-port=$((port_base + 2)) "${ray_ports[@]}" "${ray_node[@]}"
    wait_for_port "$head_ip" "$gcs_port" "$KSCALE_NODE_WAIT_S" "${pids[0]}"
    if [ "$n_nodes" -gt 1 ]; then
        service ray-worker "$node_tmp" --nodes=$((n_nodes - 1)) --ntasks=$((n_nodes - 1)) --ntasks-per-node=1 \
            --cpus-per-task="$cpus" --exclude="$head_node" -- \
            "$KSCALE_PYTHON" -m ray.scripts.scripts start --address="$head_ip:$gcs_port" "${worker_ports[@]}" \
            "${ray_node[@]}"
    fi
    export RAY_ADDRESS="$head_ip:$gcs_port"
    if [ "$n_nodes" -gt 1 ]; then  # one node: the driver's ray.init waits for the head by itself
        step --nodes=1 --ntasks=1 -w "$head_node" -- \
            "$KSCALE_PYTHON" -m kscale.targets.slurm wait-ray --address "$RAY_ADDRESS" --nodes "$n_nodes" \
            --timeout "$KSCALE_NODE_WAIT_S"
    fi
    if [ "$KSCALE_DASHBOARD_HOST" = 127.0.0.1 ]; then
        tunnel="ssh -N -L 8265:127.0.0.1:$dashboard_port -J ${SLURM_SUBMIT_HOST:-LOGIN} $head_node"
    else
        tunnel="ssh -N -L 8265:$head_ip:$dashboard_port ${SLURM_SUBMIT_HOST:-LOGIN}"
    fi
    echo "kscale: Ray dashboard: $tunnel   then open http://127.0.0.1:8265 (token: cat $token_file)"
elif [ "$KSCALE_RUNTIME" = dask ]; then
    export KSCALE_DASK_SCHEDULER_FILE="$KSCALE_RECORD_DIR/$KSCALE_ID.dask-scheduler.json"
    rm -f "$KSCALE_DASK_SCHEDULER_FILE"
    # TLS with a per-job self-signed certificate (dask's Security.temporary): only holders of these 0600
    # files (this user, on the shared filesystem) can talk to the scheduler or the workers.
    tls_dir="$KSCALE_RECORD_DIR/$KSCALE_ID.dask-tls"
    "$KSCALE_PYTHON" -m kscale.targets.slurm dask-tls --dir "$tls_dir"
    export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True DASK_DISTRIBUTED__COMM__TLS__CA_FILE="$tls_dir/cert.pem"
    for role in SCHEDULER WORKER CLIENT; do
        export "DASK_DISTRIBUTED__COMM__TLS__${role}__CERT=$tls_dir/cert.pem"
        export "DASK_DISTRIBUTED__COMM__TLS__${role}__KEY=$tls_dir/key.pem"
    done
    tls=(--tls-ca-file "$tls_dir/cert.pem" --tls-cert "$tls_dir/cert.pem" --tls-key "$tls_dir/key.pem")
    echo "kscale: starting dask scheduler (TLS) on $head_node:$dask_port, one worker per node ($cpus threads)"
    # Dashboards are plain HTTP without a login: the scheduler's and every worker's on the node's loopback only
    # (dask's worker default, ":0", is every interface), reached through the ssh tunnel printed below.
    # The scheduler's scratch space in a temp dir of its own on the head's node (the head's dask worker has
    # the node's dir): by default it would be the node's shared /tmp/dask-scratch-space, left behind.
    service dask-scheduler "$node_tmp-s" --nodes=1 --ntasks=1 -w "$head_node" -- \
        env DASK_TEMPORARY_DIRECTORY="$node_tmp-s" \
        "$KSCALE_PYTHON" -m distributed.cli.dask_scheduler --protocol tls "${tls[@]}" --host "$head_ip" \
        --port "$dask_port" --dashboard-address "127.0.0.1:$dashboard_port" \
        --scheduler-file "$KSCALE_DASK_SCHEDULER_FILE"
    service dask-worker "$node_tmp" --nodes="$n_nodes" --ntasks="$n_nodes" --ntasks-per-node=1 \
        --cpus-per-task="$cpus" -- \
        "$KSCALE_PYTHON" -m distributed.cli.dask_worker "${tls[@]}" --scheduler-file "$KSCALE_DASK_SCHEDULER_FILE" \
        --nworkers 1 --nthreads "$cpus" --memory-limit 0 --local-directory "$node_tmp" \
        --dashboard-address 127.0.0.1:0
    step --nodes=1 --ntasks=1 -w "$head_node" -- \
        "$KSCALE_PYTHON" -m kscale.targets.slurm wait-dask --scheduler-file "$KSCALE_DASK_SCHEDULER_FILE" \
        --workers "$n_nodes" --timeout "$KSCALE_NODE_WAIT_S"
    echo "kscale: dask dashboard: ssh -N -L 8787:127.0.0.1:$dashboard_port -J ${SLURM_SUBMIT_HOST:-LOGIN} $head_node"
fi

echo "kscale: driver for $KSCALE_ID on $head_node (records in $KSCALE_RECORD_DIR)"
step --nodes=1 --ntasks=1 -w "$head_node" -- \
    "$KSCALE_PYTHON" -m kscale.targets.records driver --id "$KSCALE_ID" --target slurm \
    --record-dir "$KSCALE_RECORD_DIR" "$KSCALE_SPEC" &
driver_pid=$!
while :; do
    status=0
    wait "$driver_pid" || status=$?
    kill -0 "$driver_pid" 2>/dev/null || break  # a signal interrupted wait: keep waiting for the driver
done
echo "kscale: driver exited with status $status"
exit "$status"
