#!/usr/bin/env bash
# Stop the Spark standalone cluster that start-cluster.sh started in the same
# run folder: workers first (with their executors and Python workers), then the
# master, by the PIDs in the PID files; waits until every process is gone
# (SIGTERM, then SIGKILL after USERFORMER_SPARK_STOP_TIMEOUT seconds).
# Idempotent: nothing running is not an error. See README.md.
set -euo pipefail

log() { echo "stop-cluster: $*" >&2; }

RUN_DIR="${USERFORMER_SPARK_RUN_DIR:-${USERFORMER_HOME:-$HOME/.local/share/userformer}/run/spark}"
PID_DIR="$RUN_DIR/pids"
TIMEOUT="${USERFORMER_SPARK_STOP_TIMEOUT:-30}"
MASTER_CLASS=org.apache.spark.deploy.master.Master
WORKER_CLASS=org.apache.spark.deploy.worker.Worker

if [[ ! -d "$PID_DIR" ]]; then
  log "no cluster in $RUN_DIR (nothing to stop)"
  exit 0
fi

# alive PID: the process exists and is not a zombie (an init that does not reap must not hang us)
alive() {
  local st
  st="$(ps -p "$1" -o stat= 2>/dev/null)" || return 1
  st="${st//[[:space:]]/}"
  [[ -n "$st" && "$st" != Z* ]]
}
# descendants PID: every process below PID (executor JVMs, their Python workers)
descendants() {
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
    echo "$c"
    descendants "$c"
  done
}

# stop_class CLASS: SIGTERM every daemon of CLASS (and its process tree), wait, SIGKILL leftovers.
stop_class() {
  local class="$1" f pid tree=() p deadline
  shopt -s nullglob
  for f in "$PID_DIR"/spark-*-"$class"-*.pid; do
    pid="$(cat "$f" 2>/dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && ps -p "$pid" -o args= 2>/dev/null | grep -q -- "$class"; then
      log "stopping ${class##*.} $(basename "$f" .pid | sed 's/.*-//') (PID $pid)"
      tree+=("$pid")
      while read -r p; do [[ -n "$p" ]] && tree+=("$p"); done < <(descendants "$pid")
      kill -TERM "$pid" 2>/dev/null || true
    else
      log "stale PID file $(basename "$f") (process gone)"
    fi
    rm -f "$f"
  done
  shopt -u nullglob
  ((${#tree[@]})) || return 0
  deadline=$((SECONDS + TIMEOUT))
  while ((SECONDS < deadline)); do
    local left=0
    for p in "${tree[@]}"; do alive "$p" && left=1; done
    ((left)) || return 0
    sleep 0.3
  done
  for p in "${tree[@]}"; do
    if alive "$p"; then
      log "PID $p still alive after ${TIMEOUT}s: SIGKILL"
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  for p in "${tree[@]}"; do
    while alive "$p"; do sleep 0.1; done
  done
}

stop_class "$WORKER_CLASS"
stop_class "$MASTER_CLASS"
rm -f "$RUN_DIR/cluster.env"
log "cluster in $RUN_DIR stopped"
