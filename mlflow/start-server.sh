#!/usr/bin/env bash
# Starts the MLflow tracking server of the distributed deployment: a PostgreSQL backend store
# (runs and model registry), an artifact store the server proxies (a folder on a shared volume
# or an s3:// bucket), and basic authentication. docker/compose.yaml runs it in the `mlflow`
# service; tests/test_distributed.py runs it on this machine.
#
# Required
#   MLFLOW_BACKEND_STORE_URI        postgresql://user:password@host:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION    /srv/mlflow-artifacts, or s3://bucket/prefix (needs boto3 and
#                                   AWS_* / MLFLOW_S3_ENDPOINT_URL for MinIO)
# Optional
#   MLFLOW_HOST (0.0.0.0)  MLFLOW_PORT (5000)  MLFLOW_WORKERS (2)
#   MLFLOW_ALLOWED_HOSTS            Host headers accepted, e.g. "mlflow:5000,localhost:*"
#                                   (MLflow's default: localhost and private IPs only)
#   MLFLOW_AUTH                     basic (default) or none
#   MLFLOW, PYTHON                  the mlflow and python3 to run (default: those on PATH)
# With MLFLOW_AUTH=basic (see basic_auth.ini)
#   MLFLOW_AUTH_DATABASE_URI        the user store, e.g. postgresql://.../mlflow_auth (required)
#   MLFLOW_AUTH_ADMIN_USERNAME      admin created on the first start (default: admin)
#   MLFLOW_AUTH_ADMIN_PASSWORD      its password (required on the first start)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key, the same on every replica (required)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  READ (default), EDIT, MANAGE or NO_PERMISSIONS
#   MLFLOW_AUTH_CACHE_TTL_SECONDS   how long a checked password stays cached (default: 60)
#   MLFLOW_WORKER_USERNAME, MLFLOW_WORKER_PASSWORD   the Airflow workers' user, created (not an
#                                   admin; EDIT on the pipeline's experiments and models) by
#                                   create-worker-user.py once the server answers
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (a folder or s3://...)}"
MLFLOW=${MLFLOW:-mlflow}
PYTHON=${PYTHON:-python3}
# The job runner serves MLflow's GenAI jobs (LLM judges, trace archival), which this pipeline
# does not use; off, it saves eight processes per server.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

args=(
    server
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
    --serve-artifacts
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
    --host "${MLFLOW_HOST:-0.0.0.0}"
    --port "${MLFLOW_PORT:-5000}"
    --workers "${MLFLOW_WORKERS:-2}"
)
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

case "${MLFLOW_AUTH:-basic}" in
basic)
    : "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (the user store)}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
    export MLFLOW_AUTH_DEFAULT_PERMISSION=${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
    export MLFLOW_AUTH_ADMIN_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
    export MLFLOW_AUTH_CACHE_TTL_SECONDS=${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}
    # The rendered file holds database credentials: private to this user, removed on exit.
    MLFLOW_AUTH_CONFIG_PATH=$(mktemp "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX.ini")
    export MLFLOW_AUTH_CONFIG_PATH
    trap 'rm -f "$MLFLOW_AUTH_CONFIG_PATH"' EXIT
    # MLflow reads the file with configparser, for which a literal % (as in a URL-encoded
    # password) must be written %%.
    "$PYTHON" -c 'import os, string, sys
values = {k: v.replace("%", "%%") for k, v in os.environ.items()}
sys.stdout.write(string.Template(open(sys.argv[1]).read()).substitute(values))' \
        "$here/basic_auth.ini" >"$MLFLOW_AUTH_CONFIG_PATH"
    args+=(--app-name basic-auth)
    ;;
none) ;;
*)
    echo "MLFLOW_AUTH must be basic or none, got '${MLFLOW_AUTH}'" >&2
    exit 2
    ;;
esac

# Not exec: the trap above removes the rendered auth config when the server stops. Forward
# SIGTERM/SIGINT so that `docker stop` and the tests stop the server cleanly.
"$MLFLOW" "${args[@]}" &
server=$!
if [ "${MLFLOW_AUTH:-basic}" = basic ] && [ -n "${MLFLOW_WORKER_USERNAME:-}" ]; then
    : "${MLFLOW_WORKER_PASSWORD:?set MLFLOW_WORKER_PASSWORD (the MLflow user of the workers)}"
    "$PYTHON" "$here/create-worker-user.py" &
fi
trap 'kill -TERM "$server" 2>/dev/null' TERM INT
wait "$server" || status=$?
wait "$server" 2>/dev/null || true
exit "${status:-0}"
