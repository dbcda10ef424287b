# Settings shared by the local cluster scripts. Every one can be overridden from the environment,
# e.g. `DASHBOARD_PORT=8300 clusters/local/start-head.sh`, to run beside another local Ray.
FLEXKD_CLUSTER_DIR=${FLEXKD_CLUSTER_DIR:-/tmp/flexkd-cluster}   # pid files, logs, each node's Ray temp dir
RAY_PORT=${RAY_PORT:-6390}                  # the head's GCS: workers join 127.0.0.1:$RAY_PORT
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}      # dashboard and Jobs API: flexkd submit --address http://127.0.0.1:$DASHBOARD_PORT
CLIENT_PORT=${CLIENT_PORT:-10001}           # Ray Client server (flexkd does not use it); Ray's default, below the worker ports
HEAD_AGENT_PORT=${HEAD_AGENT_PORT:-52366}   # on one machine each node's dashboard agent needs its own port
WORKER_AGENT_PORT=${WORKER_AGENT_PORT:-52367}
NUM_CPUS=${NUM_CPUS:-1}                     # per node; the debug pipeline needs 2 in total
MLFLOW_PORT=${MLFLOW_PORT:-5000}
MLFLOW_DIR=${MLFLOW_DIR:-$FLEXKD_CLUSTER_DIR/mlflow}
WAIT_S=${WAIT_S:-120}

# Ray protects the dashboard and the Jobs API with a token. The nodes and every client (flexkd
# submit/status/logs/stop) need RAY_AUTH_MODE=token and the same token: $RAY_AUTH_TOKEN, the file
# $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, which is created here on first use.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s ~/.ray/auth_token ]; then
  ray get-auth-token --generate >/dev/null
fi

mkdir -p "$FLEXKD_CLUSTER_DIR"

# wait_until WHAT COMMAND...: poll COMMAND each second; after WAIT_S seconds give up with one line.
wait_until() {
  local what=$1
  shift
  for _ in $(seq "$WAIT_S"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "flexkd cluster: $what did not come up within ${WAIT_S}s; see $FLEXKD_CLUSTER_DIR/*.log" >&2
  return 1
}
