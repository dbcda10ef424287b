#!/usr/bin/env bash
# Start a Ray worker node that joins the local head: start-worker.sh [NAME] (default worker1).
# Run it again with another NAME and WORKER_AGENT_PORT for more workers.
set -euo pipefail
source "$(dirname "$0")/env.sh"
name=${1:-worker1}

nohup ray start --block --disable-usage-stats \
  --address "127.0.0.1:$RAY_PORT" --node-ip-address 127.0.0.1 \
  --dashboard-agent-listen-port "$WORKER_AGENT_PORT" \
  --num-cpus "$NUM_CPUS" --temp-dir "$FLEXKD_CLUSTER_DIR/ray-$name" \
  >"$FLEXKD_CLUSTER_DIR/$name.log" 2>&1 &
echo $! >"$FLEXKD_CLUSTER_DIR/$name.pid"

# The node's own agent answers this (without the token) once its raylet has joined the head.
wait_until "worker $name" curl -sf "http://127.0.0.1:$WORKER_AGENT_PORT/api/local_raylet_healthz"
echo "Ray worker $name joined 127.0.0.1:$RAY_PORT"
