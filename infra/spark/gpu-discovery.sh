#!/usr/bin/env bash
# Spark resource discovery script for GPUs: prints {"name": "gpu", "addresses": ["0", "1", ...]}, the indices
# nvidia-smi lists (none without a driver). A standalone worker runs it at start
# (spark.worker.resource.gpu.discoveryScript, see start-cluster.sh's SPARK_WORKER_GPUS) and hands each executor
# the addresses it assigns; a YARN or Kubernetes executor runs it itself
# (spark.executor.resource.gpu.discoveryScript).
set -euo pipefail
ids=""
if command -v nvidia-smi >/dev/null 2>&1; then
  ids="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | paste -sd, -)" || ids=""
fi
printf '{"name": "gpu", "addresses": [%s]}\n' "$(echo "$ids" | sed -E 's/([0-9]+)/"\1"/g')"
