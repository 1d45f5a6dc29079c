#!/usr/bin/env bash
# A multi-node Ray cluster on ONE machine: a head node plus N worker "nodes", each a separate
# raylet with its own --temp-dir, port block and CPU count. Use it to exercise multi-node paths
# (placement across nodes, streaming split, checkpoint sync) without a real cluster.
#
#   bash cluster/local_multinode.sh up [--workers N] [--head-cpus N] [--worker-cpus M] [--slots K]
#   RAYCMR_WORKER_RESOURCES='{raycmr_worker: 1}' bash jobs/submit_quickstart.sh /tmp/raycmr-shared
#   eval "$(bash cluster/local_multinode.sh env)"     # export RAY_ADDRESS for raycmr / drivers
#   bash cluster/local_multinode.sh status
#   bash cluster/local_multinode.sh kill-node NODE_ID   # kill one node's processes (failure tests)
#   bash cluster/local_multinode.sh down
#
# One training worker per node: every node (head included) offers K (default 1) units of the
# custom resource `raycmr_worker`; a run with train.worker_resources={raycmr_worker: 1} takes
# one unit per worker, so its workers land on different nodes (3 nodes: one spare for a restart
# after a node dies).
#
# Isolation from other Ray users on the same machine: every node's --temp-dir lies under
# $RAYCMR_LOCAL_DIR (so /tmp/ray/ray_current_cluster is never written and a bare `ray.init()`
# elsewhere does not join this cluster), ports come from a fixed block starting at
# $RAYCMR_PORT_BASE (outside Ray's default worker range 10002-19999), and `down` stops only the
# processes whose command line names this cluster's temp dir (never `ray stop`, which would stop
# every Ray instance on the machine).
#
# Environment knobs (defaults in brackets):
#   RAYCMR_LOCAL_DIR [/tmp/raycmr-<uid>]   temp/log root; keep it short (unix socket paths < 108)
#   RAYCMR_HEAD_PORT [6390]  GCS port     RAYCMR_DASHBOARD_PORT [8265]  RAYCMR_CLIENT_PORT [10101]
#   RAYCMR_PORT_BASE [20000] node i uses ports BASE+1000*i .. BASE+1000*i+999
#   RAYCMR_OBJECT_STORE_MB [512] per node  RAYCMR_DASHBOARD [true]  (needed for `ray job submit`)
#   RAY_AUTH_MODE [token]  Ray 2.5x token auth; the token is ~/.ray/auth_token (generated if
#                          missing). Every client needs RAY_AUTH_MODE=token too: `env` prints it.
set -euo pipefail

ROOT="${RAYCMR_LOCAL_DIR:-/tmp/raycmr-$(id -u)}"
HEAD_PORT="${RAYCMR_HEAD_PORT:-6390}"
DASHBOARD_PORT="${RAYCMR_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${RAYCMR_CLIENT_PORT:-10101}"
PORT_BASE="${RAYCMR_PORT_BASE:-20000}"
OBJECT_STORE_MB="${RAYCMR_OBJECT_STORE_MB:-512}"
DASHBOARD="${RAYCMR_DASHBOARD:-true}"
ADDRESS_FILE="$ROOT/n0/ray_current_cluster"   # written by `ray start --head --temp-dir $ROOT/n0`

RAY="${RAY:-ray}"
# Our own `ray` calls must not follow a RAY_ADDRESS exported for another cluster.
unset RAY_ADDRESS
export RAY_USAGE_STATS_ENABLED=0
# Decide token auth explicitly for every node: left unset, `ray start --head` turns it on when
# ~/.ray/auth_token exists but `ray start --address` does not, and the workers cannot join.
AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_AUTH_MODE="$AUTH_MODE"

usage() {
  echo "usage: bash cluster/local_multinode.sh up|down|status|env|kill-node [options]"
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

die() { echo "local_multinode: $*" >&2; exit 1; }

# Ports of node i (0 = head): node manager, object manager, agents, metrics, worker range.
node_port_args() {
  local b=$((PORT_BASE + 1000 * $1))
  echo "--node-manager-port $b --object-manager-port $((b + 1))" \
       "--dashboard-agent-listen-port $((b + 2)) --dashboard-agent-grpc-port $((b + 3))" \
       "--runtime-env-agent-port $((b + 4)) --metrics-export-port $((b + 5))" \
       "--min-worker-port $((b + 100)) --max-worker-port $((b + 999))"
}

# PIDs of this cluster's processes, owned by us: those whose command line names a node temp dir
# (raylet, gcs_server, dashboard, ...) or that hold a file open under one (log files; this finds
# the agents and workers, which rename themselves `ray::...`, and the Ray client server).
cluster_pids() {
  node_pids "n[0-9]*"
}

# PIDs of the processes of the node(s) whose temp dir under $ROOT matches the name pattern $1
# (a shell glob such as n2 or n[0-9]*).
node_pids() {
  local pid cmd uid dir
  uid=$(id -u)
  { pgrep -u "$uid" -f -- "$ROOT/n" | while read -r pid; do
      cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
      for dir in $cmd; do
        dir=${dir#*=}
        # shellcheck disable=SC2053
        [[ "$dir" == $ROOT/$1 || "$dir" == $ROOT/$1/* ]] && { echo "$pid"; break; }
      done
    done
    find /proc/[0-9]*/fd -maxdepth 1 -lname "$ROOT/$1/*" 2>/dev/null | cut -d/ -f3
  } | sort -un | while read -r pid; do
    [[ "$pid" == "$$" ]] && continue
    [[ "$(stat -c %u "/proc/$pid" 2>/dev/null)" == "$uid" ]] || continue
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
    [[ -n "$cmd" && "$cmd" != *local_multinode.sh* ]] && echo "$pid"
  done
  return 0
}

head_address() {
  [[ -s "$ADDRESS_FILE" ]] && [[ -n "$(cluster_pids)" ]] && cat "$ADDRESS_FILE"
}

cmd_up() {
  local workers=2 head_cpus=2 worker_cpus=2 slots=1
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --slots) slots="${2:-}"; shift $(($# > 1 ? 2 : 1)) ;;
      --workers) workers="${2:-}"; shift $(($# > 1 ? 2 : 1)) ;;
      --head-cpus) head_cpus="${2:-}"; shift $(($# > 1 ? 2 : 1)) ;;
      --worker-cpus) worker_cpus="${2:-}"; shift $(($# > 1 ? 2 : 1)) ;;
      -h|--help) usage ;;
      *) die "unknown option '$1' for up (use --workers, --head-cpus, --worker-cpus, --slots)" ;;
    esac
  done
  local n
  for n in "workers=$workers" "head-cpus=$head_cpus" "worker-cpus=$worker_cpus" "slots=$slots"; do
    [[ "${n#*=}" =~ ^[0-9]+$ ]] || die "--${n%%=*} must be a whole number, got '${n#*=}'"
  done
  [[ -z "$(cluster_pids)" ]] || die "a cluster is already running under $ROOT: run 'down' first"
  command -v "$RAY" >/dev/null || die "'$RAY' not found: activate the venv (source .venv/bin/activate)"

  if [[ "$AUTH_MODE" == "token" ]] && ! "$RAY" get-auth-token >/dev/null 2>&1; then
    "$RAY" get-auth-token --generate >/dev/null || die "could not generate a Ray auth token"
  fi
  local store=$((OBJECT_STORE_MB * 1024 * 1024))
  rm -f "$ADDRESS_FILE"
  mkdir -p "$ROOT/logs"
  echo "starting head: $head_cpus CPU(s), $slots raycmr_worker, GCS port $HEAD_PORT, temp dir $ROOT/n0"
  # shellcheck disable=SC2046
  local resources="{\"raycmr_worker\": $slots}"
  "$RAY" start --head --port "$HEAD_PORT" --num-cpus "$head_cpus" --num-gpus 0 \
    --resources "$resources" \
    --include-dashboard "$DASHBOARD" --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port "$CLIENT_PORT" --object-store-memory "$store" \
    --temp-dir "$ROOT/n0" --disable-usage-stats $(node_port_args 0) >"$ROOT/logs/n0.start.log" 2>&1 \
    || { cat "$ROOT/logs/n0.start.log" >&2; cmd_down >/dev/null 2>&1 || true; die "head failed to start"; }
  [[ -s "$ADDRESS_FILE" ]] || die "head started but wrote no address file $ADDRESS_FILE"
  local address
  address=$(cat "$ADDRESS_FILE")

  local i
  for ((i = 1; i <= workers; i++)); do
    echo "starting worker node $i: $worker_cpus CPU(s), $slots raycmr_worker, temp dir $ROOT/n$i"
    # shellcheck disable=SC2046
    "$RAY" start --address "$address" --num-cpus "$worker_cpus" --num-gpus 0 \
      --resources "$resources" \
      --object-store-memory "$store" --temp-dir "$ROOT/n$i" --disable-usage-stats \
      $(node_port_args "$i") >"$ROOT/logs/n$i.start.log" 2>&1 \
      || { cat "$ROOT/logs/n$i.start.log" >&2; cmd_down >/dev/null 2>&1 || true
           die "worker node $i failed to start; cluster stopped"; }
  done

  # Wait until the GCS sees every node alive (ray start returns before registration completes).
  local want=$((workers + 1)) alive=0 tries
  for ((tries = 0; tries < 60; tries++)); do
    alive=$(count_alive "$address") || alive=0
    [[ "$alive" -ge "$want" ]] && break
    sleep 1
  done
  if [[ "$alive" -lt "$want" ]]; then
    cmd_down >/dev/null 2>&1 || true
    die "only $alive of $want nodes registered; cluster stopped; logs: $ROOT/n*/session_latest/logs"
  fi

  echo "cluster up: $want nodes ($alive alive)"
  echo
  echo "  export RAY_ADDRESS=$address RAY_AUTH_MODE=$AUTH_MODE   # raycmr train / eval, drivers"
  if [[ "$DASHBOARD" == "true" ]]; then
    echo "  # shards + training as Ray jobs, one worker per node, all files under a shared dir:"
    echo "  RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=$AUTH_MODE \\"
    echo "  RAYCMR_WORKER_RESOURCES='{raycmr_worker: 1}' bash jobs/submit_quickstart.sh $ROOT/shared"
  fi
  echo "  bash cluster/local_multinode.sh down      # when done"
}

# Number of ALIVE nodes in the cluster at $1, asked from the GCS directly (no driver started).
count_alive() {
  local py
  py="$(dirname "$(command -v "$RAY")")/python"   # the interpreter that has this ray installed
  [[ -x "$py" ]] || py=python
  "$py" - "$1" <<'EOF'
import sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=5).values()
print(sum(1 for n in nodes if n.state == GcsNodeInfo.GcsNodeState.ALIVE))
EOF
}

# Kill every process of the node whose Ray node id is $1 (SIGKILL, as a machine that dies):
# the node is found by its node-manager port, which fixes its index i and temp dir $ROOT/n$i.
cmd_kill_node() {
  local node_id="${1:-}" address port i py pids
  [[ -n "$node_id" ]] || die "usage: kill-node NODE_ID (see 'ray list nodes' or a run's worker_nodes)"
  address=$(head_address) || die "no cluster running under $ROOT: run 'up' first"
  py="$(dirname "$(command -v "$RAY")")/python"
  [[ -x "$py" ]] || py=python
  port=$("$py" -c '
import sys
from ray._raylet import GcsClient
for node_id, info in GcsClient(address=sys.argv[1]).get_all_node_info(timeout=5).items():
    if node_id.hex() == sys.argv[2]:
        print(info.node_manager_port)
' "$address" "$node_id")
  [[ -n "$port" ]] || die "no node with id $node_id in the cluster at $address"
  i=$(( (port - PORT_BASE) / 1000 ))
  [[ "$i" -ge 1 ]] || die "node $node_id is the head node: kill a worker node, or use 'down'"
  pids=$(node_pids "n$i")
  [[ -n "$pids" ]] || die "no processes found for node $i ($ROOT/n$i)"
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  echo "killed node $i ($node_id): $(echo "$pids" | wc -w) process(es)"
}

cmd_env() {
  local address
  address=$(head_address) || die "no cluster running under $ROOT: run 'up' first"
  echo "export RAY_ADDRESS=$address RAY_AUTH_MODE=$AUTH_MODE"
}

cmd_status() {
  local address
  address=$(head_address) || die "no cluster running under $ROOT: run 'up' first"
  echo "RAY_ADDRESS=$address   dashboard: http://127.0.0.1:$DASHBOARD_PORT"
  "$RAY" status --address "$address"
}

cmd_down() {
  local pids
  pids=$(cluster_pids)
  if [[ -z "$pids" ]]; then
    echo "no cluster processes under $ROOT"
    rm -f "$ADDRESS_FILE"
    return 0
  fi
  echo "stopping $(echo "$pids" | wc -l) process(es) of the cluster under $ROOT"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  local tries
  for ((tries = 0; tries < 20; tries++)); do
    pids=$(cluster_pids)
    [[ -z "$pids" ]] && break
    sleep 0.5
  done
  if [[ -n "$pids" ]]; then
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$ADDRESS_FILE"
  [[ -z "$(cluster_pids)" ]] || die "some processes survived: $(cluster_pids | tr '\n' ' ')"
  echo "stopped; logs kept under $ROOT (rm -rf it to clean up)"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  kill-node) shift; cmd_kill_node "$@" ;;
  -h|--help|help) usage ;;
  *) usage 1 ;;
esac
