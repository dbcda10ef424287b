#!/usr/bin/env bash
# Start a Ray head node on 127.0.0.1 in the background; its dashboard and Jobs API listen on
# 127.0.0.1 only (Ray still binds its GCS port on every interface of the machine).
set -euo pipefail
source "$(dirname "$0")/env.sh"

# --block keeps `ray start` alive as the leader of this node's processes, so stop.sh can end
# exactly this cluster (`ray stop` would end every Ray on the machine, other people's too).
nohup ray start --head --block --disable-usage-stats \
  --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
  --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$HEAD_AGENT_PORT" \
  --num-cpus "$NUM_CPUS" --temp-dir "$FLEXKD_CLUSTER_DIR/ray-head" \
  >"$FLEXKD_CLUSTER_DIR/head.log" 2>&1 &
echo $! >"$FLEXKD_CLUSTER_DIR/head.pid"

# /api/gcs_healthz answers without the token.
wait_until "the Ray head" curl -sf "http://127.0.0.1:$DASHBOARD_PORT/api/gcs_healthz"
echo "Ray head up: workers join 127.0.0.1:$RAY_PORT; submit to http://127.0.0.1:$DASHBOARD_PORT"
