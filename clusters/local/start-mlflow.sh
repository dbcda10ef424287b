#!/usr/bin/env bash
# Start an MLflow tracking server on 127.0.0.1 that every node of the local cluster can log to.
# Pipelines point at it with `tracking: {tracking_uri: http://127.0.0.1:5000}`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
mkdir -p "$MLFLOW_DIR"

nohup mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$MLFLOW_DIR/mlflow.db" --artifacts-destination "$MLFLOW_DIR/artifacts" \
  >"$FLEXKD_CLUSTER_DIR/mlflow.log" 2>&1 &
echo $! >"$FLEXKD_CLUSTER_DIR/mlflow.pid"

wait_until "the MLflow server" curl -sf "http://127.0.0.1:$MLFLOW_PORT/health"
echo "MLflow up: http://127.0.0.1:$MLFLOW_PORT (store: $MLFLOW_DIR)"
