"""``make airflow``: the three DAGs in a local Airflow (``airflow standalone``), until Ctrl-C.

Embedded defaults (SQLite metadata under ``.airflow/``, the MLflow store and the artifacts
where the config puts them), the DAG folder of this checkout, the user's config and drift
policy (``SAE_CONFIG``, ``SAE_DRIFT_POLICY``), the execution API on the chosen port, and two
logins of Airflow's simple auth manager: ``admin``, and ``reviewer`` (role ``op``: triggers
runs and answers drift reviews). The DAGs are unpaused once the api-server lists them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from sae_pipeline.demo.airflow_run import REPO, airflow_env
from sae_pipeline.errors import SaePipelineError

DAG_IDS = ("sae_batch_encoding", "sae_drift_monitor", "sae_training")
USERS = {"admin": "admin", "reviewer": "op"}  # login -> simple auth manager role


def logins(home: Path) -> tuple[Path, dict[str, str]]:
    """The passwords file and each login's password: kept from an earlier start, else new."""
    path = home / "passwords.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    out = {user: known.get(user) or secrets.token_urlsafe(12) for user in USERS}
    if out != known:
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
        path.chmod(0o600)
    return path, out


def standalone_env(
    home: Path, port: int, config: str | None, policy: str | None, passwords: Path
) -> dict[str, str]:
    """The environment of ``airflow standalone``: everything a first-time user would miss."""
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CTX")}
    env.update(airflow_env(home, REPO / "dags"))
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": url,
            # Airflow 3's tasks talk to the api-server; its default URL assumes port 8080.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
                f"{u}:{r}" for u, r in USERS.items()
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "SAE_CONFIG": str(Path(config).resolve()) if config else "",
            "SAE_DRIFT_POLICY": str(Path(policy).resolve()) if policy else "",
            # Training when asked (UI, REST, a drift decision); an unpaused @weekly DAG would
            # otherwise start a run at once. Set SAE_TRAINING_SCHEDULE to keep a schedule.
            "SAE_TRAINING_SCHEDULE": os.environ.get("SAE_TRAINING_SCHEDULE", "none"),
        }
    )
    return env


def _call(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def token(url: str, user: str, password: str) -> str:
    """A REST API token for ``user`` (``POST /auth/token``)."""
    return _call("POST", f"{url}/auth/token", {"username": user, "password": password})[
        "access_token"
    ]


def wait_for_dags(proc: subprocess.Popen, url: str, password: str, log: Path, timeout: float):
    """Wait until the api-server lists every DAG of ours; then unpause them. Return the DAGs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise SaePipelineError(f"airflow standalone exited ({proc.returncode}); {log}:\n{tail}")
        try:  # not up yet, or busy: ask again
            tok = token(url, "admin", password)
            dags = _call("GET", f"{url}/api/v2/dags?dag_id_pattern=sae_&limit=100", token=tok)
            found = {d["dag_id"]: d for d in dags["dags"]}
            if set(DAG_IDS) <= set(found):
                for dag_id in DAG_IDS:
                    if found[dag_id]["is_paused"]:
                        _call("PATCH", f"{url}/api/v2/dags/{dag_id}", {"is_paused": False}, tok)
                return sorted(DAG_IDS)
        except (OSError, KeyError, ValueError):  # URLError and timeouts are OSErrors
            pass
        time.sleep(2)
    raise SaePipelineError(
        f"Airflow did not list the DAGs {DAG_IDS} within {timeout:g} s; see {log}"
    )


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop standalone and its components (they share its process group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # standalone stops its components itself
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever a component left behind
    proc.wait()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_local_airflow(
    workdir: Path,
    port: int = 8080,
    config: str | None = None,
    policy: str | None = None,
    timeout: float = 600,
) -> int:
    """Start Airflow in ``workdir`` (home: its ``.airflow/``), print the logins, wait for Ctrl-C."""
    from sae_pipeline.config import load_config
    from sae_pipeline.monitoring.drift import load_policy

    cfg = load_config(config)  # a bad config or policy: one line now, not a broken DAG later
    load_policy(policy)
    home = workdir / ".airflow"
    passwords, users = logins(home)
    env = standalone_env(home, port, config, policy, passwords)
    log = home / "standalone.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow", "standalone"],
            env=env,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops Airflow as Ctrl-C does
    try:
        print(f"starting Airflow (process group {proc.pid}, log: {log}) ...", flush=True)
        dags = wait_for_dags(proc, url, users["admin"], log, timeout)
        print(
            f"\nAirflow is up: {url}\n"
            f"  reviewer login: reviewer / {users['reviewer']}  (triggers runs, answers reviews)\n"
            f"  admin login:    admin / {users['admin']}\n"
            f"  DAGs (unpaused): {', '.join(dags)}\n"
            f"  config: {env['SAE_CONFIG'] or 'embedded defaults'} (model {cfg.name}); "
            f"drift policy: {env['SAE_DRIFT_POLICY'] or 'built-in'}\n"
            f"  passwords kept in {passwords}; Ctrl-C stops Airflow\n",
            flush=True,
        )
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping Airflow ...", flush=True)
        stop(proc)
    return 0
