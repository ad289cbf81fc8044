#!/usr/bin/env python3
"""Create the workers' MLflow user (basic auth) once the server answers; start-server.sh runs it.

MLFLOW_WORKER_USERNAME / MLFLOW_WORKER_PASSWORD: the user, created if missing; if it exists
and that password does not log it in (it was rotated in docker/.env), the password is updated.
It is no admin: with default_permission READ it reads everything, creates experiments and
models (MLflow makes their creator MANAGE them) and gets EDIT on the pipeline's experiments
and models that exist already (SAE_WORKER_EXPERIMENTS and SAE_WORKER_MODELS, comma-separated).
It cannot manage users or delete others' work.
Acts as the admin (MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD).
"""

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

BASE = f"http://localhost:{os.environ.get('MLFLOW_PORT', '5000')}"
ADMIN = (
    os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
    os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"],
)
DEFAULT_EXPERIMENTS = "sae-training,sae-monitoring"
DEFAULT_MODELS = "sae-digits-encoder,sae-digits-scaler"


def call(
    method: str, path: str, body: dict | None = None, auth: tuple[str, str] = ADMIN
) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + path, data=data, method=method)
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


def logs_in(user: str, password: str) -> bool:
    """Whether ``user`` authenticates with ``password`` (MLflow answers 401 otherwise)."""
    q = urllib.parse.urlencode({"username": user})
    return call("GET", f"/api/2.0/mlflow/users/get?{q}", auth=(user, password))[0] != 401


def grant(resource_type: str, resource_id: str, user: str) -> None:
    """EDIT on one experiment (by id) or registered model (by name); kept if already granted."""
    body = {
        "username": user,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "permission": "EDIT",
    }
    call("POST", "/api/3.0/mlflow/users/permissions/grant", body)


def main() -> int:
    user, password = os.environ["MLFLOW_WORKER_USERNAME"], os.environ["MLFLOW_WORKER_PASSWORD"]
    for _ in range(120):  # the server takes a while to start
        try:
            urllib.request.urlopen(BASE + "/health", timeout=5).close()
            break
        except OSError:
            time.sleep(2)
    status, _ = call(
        "POST", "/api/2.0/mlflow/users/create", {"username": user, "password": password}
    )
    if status not in (200, 400, 409):  # 400/409: the user exists
        print(f"cannot create MLflow user {user}: HTTP {status}", file=sys.stderr)
        return 1
    if status != 200 and not logs_in(user, password):
        # The user exists with another password: MLFLOW_WORKER_PASSWORD was rotated, and the
        # workers already use the new one. Apply it (as the admin), or they are locked out.
        status, _ = call(
            "PATCH",
            "/api/2.0/mlflow/users/update-password",
            {"username": user, "password": password},
        )
        if status != 200:
            print(
                f"cannot update the password of MLflow user {user}: HTTP {status}", file=sys.stderr
            )
            return 1
        print(f"MLflow user {user}: password updated from MLFLOW_WORKER_PASSWORD")
    for name in os.environ.get("SAE_WORKER_EXPERIMENTS", DEFAULT_EXPERIMENTS).split(","):
        q = urllib.parse.urlencode({"experiment_name": name.strip()})
        status, found = call("GET", f"/api/2.0/mlflow/experiments/get-by-name?{q}")
        if status == 200:
            grant("experiment", found["experiment"]["experiment_id"], user)
    for name in os.environ.get("SAE_WORKER_MODELS", DEFAULT_MODELS).split(","):
        q = urllib.parse.urlencode({"name": name.strip()})
        if call("GET", f"/api/2.0/mlflow/registered-models/get?{q}")[0] == 200:
            grant("registered_model", name.strip(), user)
    print(f"MLflow user {user} ready (EDIT on the pipeline's experiments and models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
