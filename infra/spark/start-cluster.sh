#!/usr/bin/env bash
# Start a Spark standalone cluster on 127.0.0.1: one master and N worker
# instances (default 2 x 1 core x 1g), from the Spark that ships inside the
# venv's pyspark wheel. Waits until the master reports every worker ALIVE,
# then prints the master URL (spark://127.0.0.1:PORT) as the only line on
# stdout; progress and errors go to stderr. Idempotent: daemons already
# running (by their PID files) are left alone. See README.md for the knobs.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"

log() { echo "start-cluster: $*" >&2; }
die() { echo "start-cluster: ERROR: $*" >&2; exit 1; }

# ---- the venv, its Python and its Spark ------------------------------------
VENV="${VENV:-.venv}"
if [[ "$VENV" != /* ]]; then
  if [[ -x "$PWD/$VENV/bin/python" ]]; then VENV="$PWD/$VENV"; else VENV="$REPO/$VENV"; fi
fi
PY="$VENV/bin/python"   # not resolved: the symlink path is what makes it the venv
[[ -x "$PY" ]] || die "no Python at $PY (set VENV=/path/to/venv or run 'make venv')"
SPARK_HOME="$("$PY" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')" \
  || die "pyspark is not importable from $PY"
export SPARK_HOME
[[ -x "$SPARK_HOME/sbin/spark-daemon.sh" ]] || die "$SPARK_HOME/sbin/spark-daemon.sh not found"
command -v java >/dev/null 2>&1 || [[ -n "${JAVA_HOME:-}" ]] || die "java not found (install Java 17 or set JAVA_HOME)"

# ---- where state lives -----------------------------------------------------
RUN_DIR="${USERFORMER_SPARK_RUN_DIR:-${USERFORMER_HOME:-$HOME/.local/share/userformer}/run/spark}"
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
STATE="$RUN_DIR/cluster.env"
export SPARK_PID_DIR="$RUN_DIR/pids"
export SPARK_LOG_DIR="$RUN_DIR/logs"
export SPARK_LOCAL_DIRS="$RUN_DIR/local"       # executors' shuffle/spill scratch space
export SPARK_CONF_DIR="$RUN_DIR/conf"          # empty: no stray spark-env.sh is sourced
export SPARK_IDENT_STRING=userformer           # fixed PID file names, whoever runs it
mkdir -p "$SPARK_PID_DIR" "$SPARK_LOG_DIR" "$SPARK_LOCAL_DIRS" "$SPARK_CONF_DIR"

# ---- authentication: one generated secret for master, workers, executors and drivers --------
# Spark's shared-secret authentication (spark.authenticate): only a process that knows the secret can register
# with the master or talk to an executor. The daemons read it from $SPARK_CONF_DIR/spark-defaults.conf (mode
# 600), drivers too when their SPARK_CONF_DIR is this folder (jobs/core/spark.py sets it for the default run
# folder), so the secret never appears on a command line.
SECRET_FILE="$RUN_DIR/secret"
if [[ ! -s "$SECRET_FILE" ]]; then
  (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$SECRET_FILE")
fi
(umask 077 && printf 'spark.authenticate true\nspark.authenticate.secret %s\n' "$(cat "$SECRET_FILE")" \
  >"$SPARK_CONF_DIR/spark-defaults.conf")
chmod 600 "$SECRET_FILE" "$SPARK_CONF_DIR/spark-defaults.conf"

# ---- everything on loopback, same Python everywhere ------------------------
HOST=127.0.0.1
export SPARK_MASTER_HOST="$HOST" SPARK_LOCAL_IP="$HOST" SPARK_LOCAL_HOSTNAME="$HOST"
export SPARK_PUBLIC_DNS="$HOST"
export PYSPARK_PYTHON="$PY" PYSPARK_DRIVER_PYTHON="$PY"
export SPARK_DAEMON_MEMORY="${SPARK_DAEMON_MEMORY:-512m}"
# A port that is taken must fail loudly, not silently move to port+1 (the URL we
# print would then be wrong); the REST submission server stays off.
export SPARK_MASTER_OPTS="${SPARK_MASTER_OPTS:-} -Dspark.port.maxRetries=0 -Dspark.master.rest.enabled=false"
export SPARK_WORKER_OPTS="${SPARK_WORKER_OPTS:-} -Dspark.port.maxRetries=0"
# GPUs each worker offers to executors (spark.worker.resource.gpu.*): found by gpu-discovery.sh (nvidia-smi).
# Drivers then ask for them with spark.executor.resource.gpu.amount / spark.task.resource.gpu.amount
# (docs/operations.md); infer.engine = spark embeds on the GPU a task was given.
WORKER_GPUS="${SPARK_WORKER_GPUS:-0}"
[[ "$WORKER_GPUS" =~ ^[0-9]+$ ]] || die "SPARK_WORKER_GPUS must be a number of GPUs, got '$WORKER_GPUS'"
if (( WORKER_GPUS > 0 )); then
  SPARK_WORKER_OPTS+=" -Dspark.worker.resource.gpu.amount=$WORKER_GPUS"
  SPARK_WORKER_OPTS+=" -Dspark.worker.resource.gpu.discoveryScript=$SCRIPT_DIR/gpu-discovery.sh"
fi

MASTER_CLASS=org.apache.spark.deploy.master.Master
WORKER_CLASS=org.apache.spark.deploy.worker.Worker
pid_file() { echo "$SPARK_PID_DIR/spark-$SPARK_IDENT_STRING-$1-$2.pid"; }
running() {  # running CLASS INSTANCE -> prints the PID if that daemon is alive
  local f pid
  f="$(pid_file "$1" "$2")"
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  ps -p "$pid" -o args= 2>/dev/null | grep -q -- "$1" || return 1
  echo "$pid"
}
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
check_port_free() {  # check_port_free PORT WHAT
  "$PY" - "$1" <<'EOF' || die "port $1 on 127.0.0.1 ($2) is already in use; pick another (see README.md)"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}
tail_logs() {
  local f
  for f in "$SPARK_LOG_DIR"/spark-"$SPARK_IDENT_STRING"-*.out; do
    [[ -f "$f" ]] || continue
    echo "----- last 25 lines of $f" >&2
    grep -v '^Spark Command: ' "$f" | tail -n 25 >&2 || true
  done
}

# fail MESSAGE: say why, show the daemon logs, stop the cluster (half a cluster is of no use).
fail() {
  echo "start-cluster: ERROR: $*" >&2
  tail_logs
  echo "start-cluster: stopping the cluster; logs stay in $SPARK_LOG_DIR" >&2
  USERFORMER_SPARK_RUN_DIR="$RUN_DIR" bash "$SCRIPT_DIR/stop-cluster.sh" >&2 || true
  exit 1
}

# ---- settings (a running master keeps the ports it was started with) -------
WORKERS="${SPARK_WORKER_INSTANCES:-2}"
WORKER_CORES="${SPARK_WORKER_CORES:-1}"
WORKER_MEMORY="${SPARK_WORKER_MEMORY:-1g}"
WORKER_PORT="${SPARK_WORKER_PORT:-0}"              # base; 0 = any free port
WORKER_WEBUI_PORT="${SPARK_WORKER_WEBUI_PORT:-8081}" # base; instance i gets base+i-1; 0 = any
TIMEOUT="${USERFORMER_SPARK_START_TIMEOUT:-90}"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "SPARK_WORKER_INSTANCES must be >= 1, got '$WORKERS'"
# Every worker on this host would discover, and hand out, the same GPUs.
(( WORKER_GPUS == 0 || WORKERS == 1 )) \
  || die "SPARK_WORKER_GPUS needs SPARK_WORKER_INSTANCES=1 (one worker per host owns its GPUs)"

if MASTER_PID="$(running "$MASTER_CLASS" 1)"; then
  [[ -f "$STATE" ]] || die "a master runs (PID $MASTER_PID) but $STATE is missing; run stop-cluster.sh first"
  # shellcheck disable=SC1090
  source "$STATE"
  log "master already running (PID $MASTER_PID) on port $MASTER_PORT"
else
  MASTER_PORT="${SPARK_MASTER_PORT:-7077}"
  MASTER_WEBUI_PORT="${SPARK_MASTER_WEBUI_PORT:-8080}"
  [[ "$MASTER_PORT" == 0 ]] && MASTER_PORT="$(free_port)"
  [[ "$MASTER_WEBUI_PORT" == 0 ]] && MASTER_WEBUI_PORT="$(free_port)"
  check_port_free "$MASTER_PORT" "master"
  check_port_free "$MASTER_WEBUI_PORT" "master web UI"
  rm -f "$(pid_file "$MASTER_CLASS" 1)"
  log "starting master on $HOST:$MASTER_PORT (web UI $MASTER_WEBUI_PORT), state in $RUN_DIR"
  "$SPARK_HOME/sbin/spark-daemon.sh" start "$MASTER_CLASS" 1 \
    --host "$HOST" --port "$MASTER_PORT" --webui-port "$MASTER_WEBUI_PORT" >&2 \
    || fail "spark-daemon.sh failed to start the master"
  cat >"$STATE" <<EOF
MASTER_URL=spark://$HOST:$MASTER_PORT
MASTER_PORT=$MASTER_PORT
MASTER_WEBUI_PORT=$MASTER_WEBUI_PORT
EOF
fi
MASTER_URL="spark://$HOST:$MASTER_PORT"
JSON_URL="http://$HOST:$MASTER_WEBUI_PORT/json/"

# wait_alive WANT_WORKERS: poll the master's JSON until it is ALIVE with that
# many ALIVE workers; fail early if one of our daemons (master, workers 1..WANT) died.
wait_alive() {
  local pids=() files=() f i
  files+=("$(pid_file "$MASTER_CLASS" 1)")
  for ((i = 1; i <= $1; i++)); do files+=("$(pid_file "$WORKER_CLASS" "$i")"); done
  for f in "${files[@]}"; do
    if [[ -f "$f" ]]; then pids+=("$(cat "$f")"); fi
  done
  "$PY" - "$JSON_URL" "$1" "$TIMEOUT" "${pids[@]}" <<'EOF'
import json, os, sys, time, urllib.request
url, want, timeout, pids = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), [int(p) for p in sys.argv[4:]]
deadline, last = time.monotonic() + timeout, "no answer yet"
while time.monotonic() < deadline:
    for p in pids:
        try:
            os.kill(p, 0)
        except ProcessLookupError:
            print(f"start-cluster: ERROR: Spark daemon PID {p} exited during start-up", file=sys.stderr)
            sys.exit(1)
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            st = json.load(r)
        alive = sum(1 for w in st.get("workers", []) if w.get("state") == "ALIVE")
        last = f"master {st.get('status')}, {alive}/{want} workers ALIVE"
        if st.get("status") == "ALIVE" and alive >= want:
            sys.exit(0)
    except Exception as exc:  # not up yet
        last = f"{url}: {exc}"
    time.sleep(0.5)
print(f"start-cluster: ERROR: cluster not ready after {timeout:.0f}s ({last})", file=sys.stderr)
sys.exit(1)
EOF
}

wait_alive 0 || fail "master did not come up on $JSON_URL"

# ---- workers: started side by side (spark-daemon.sh sleeps ~3 s per daemon) --
launch=()
for ((i = 1; i <= WORKERS; i++)); do
  if pid="$(running "$WORKER_CLASS" "$i")"; then
    log "worker $i already running (PID $pid)"
    continue
  fi
  wp=0; [[ "$WORKER_PORT" != 0 ]] && wp=$((WORKER_PORT + i - 1))
  wu=0; [[ "$WORKER_WEBUI_PORT" != 0 ]] && wu=$((WORKER_WEBUI_PORT + i - 1))
  [[ "$wp" != 0 ]] && check_port_free "$wp" "worker $i"
  [[ "$wu" != 0 ]] && check_port_free "$wu" "worker $i web UI"
  mkdir -p "$RUN_DIR/work/$i"
  rm -f "$(pid_file "$WORKER_CLASS" "$i")"
  log "starting worker $i ($WORKER_CORES core(s), $WORKER_MEMORY, web UI port $([[ $wu == 0 ]] && echo any || echo "$wu"))"
  SPARK_WORKER_DIR="$RUN_DIR/work/$i" "$SPARK_HOME/sbin/spark-daemon.sh" start "$WORKER_CLASS" "$i" \
    --host "$HOST" --port "$wp" --webui-port "$wu" --cores "$WORKER_CORES" --memory "$WORKER_MEMORY" \
    --work-dir "$RUN_DIR/work/$i" "$MASTER_URL" >&2 &
  launch+=("$!")
done
for p in "${launch[@]}"; do wait "$p" || fail "spark-daemon.sh failed to start a worker"; done

wait_alive "$WORKERS" || fail "workers did not register with $MASTER_URL"
cat >"$STATE" <<EOF
MASTER_URL=$MASTER_URL
MASTER_PORT=$MASTER_PORT
MASTER_WEBUI_PORT=$MASTER_WEBUI_PORT
WORKERS=$WORKERS
EOF
log "cluster up: $WORKERS worker(s) ALIVE, web UI http://$HOST:$MASTER_WEBUI_PORT"
echo "$MASTER_URL"
