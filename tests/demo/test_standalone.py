"""``make airflow``: a local Airflow with our DAGs, the user's config and policy, and logins."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from sae_pipeline.demo.standalone import DAG_IDS, _call, logins, standalone_env

REPO = Path(__file__).resolve().parents[2]


def test_the_environment_names_what_a_first_time_user_would_miss(tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_TRAINING_SCHEDULE", raising=False)
    passwords, users = logins(tmp_path / "home")
    env = standalone_env(tmp_path / "home", 18123, "my.yaml", "policy.yaml", passwords)
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18123/execution/"
    assert env["AIRFLOW__API__PORT"] == "18123"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(REPO / "dags")
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "False"
    assert env["SAE_CONFIG"] == str(Path("my.yaml").resolve())  # tasks run in another folder
    assert env["SAE_DRIFT_POLICY"] == str(Path("policy.yaml").resolve())
    assert env["SAE_TRAINING_SCHEDULE"] == "none"  # unpaused: no run at start
    assert "reviewer:op" in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    # The logins stay the same across starts, in a file only the user reads.
    assert logins(tmp_path / "home")[1] == users and set(users) == {"admin", "reviewer"}
    assert json.loads(passwords.read_text()) == users
    assert passwords.stat().st_mode & 0o077 == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.integration
def test_make_airflow_starts_logs_in_lists_the_dags_runs_a_task_and_stops(tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({"model": {"hidden_dims": [16, 4]}}))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sae_pipeline.cli", "airflow", "--port", str(port)]
    cmd += ["--config", str(config), "--policy", str(REPO / "configs" / "drift_policy.yaml")]
    proc = subprocess.Popen(
        [*cmd, "--workdir", str(tmp_path), "--timeout", "400"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("  config:"):
                break
        # Keep reading what it prints after: a full pipe would block its next print (the
        # "stopping" line after Ctrl-C) and so its exit.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        printed = "".join(lines)
        group = int(printed.split("process group ", 1)[1].split(",")[0])
        assert f"Airflow is up: {url}" in printed, printed
        reviewer = next(ln for ln in lines if "reviewer login:" in ln).split()[4]
        assert str(config) in printed

        # Log in as the printed reviewer; a wrong password is refused.
        with pytest.raises(urllib.error.HTTPError) as refused:
            _call("POST", f"{url}/auth/token", {"username": "reviewer", "password": "x"})
        assert refused.value.code == 401
        login = {"username": "reviewer", "password": reviewer}
        token = _call("POST", f"{url}/auth/token", login)["access_token"]

        # The DAGs over REST: loaded, unpaused, built from the user's config (two layers).
        dags = _call("GET", f"{url}/api/v2/dags?limit=100", token=token)["dags"]
        assert {d["dag_id"]: d["is_paused"] for d in dags} == dict.fromkeys(DAG_IDS, False)
        tasks = _call("GET", f"{url}/api/v2/dags/sae_training/tasks", token=token)["tasks"]
        assert sorted(t["task_id"] for t in tasks if "pretrain" in t["task_id"]) == [
            "pretrain_layer_1",
            "pretrain_layer_2",
        ]
        # A task runs (the execution API is on this port): a drift check with no batch skips.
        run = {"logical_date": None, "dag_run_id": "no_batch", "conf": {}}
        _call("POST", f"{url}/api/v2/dags/sae_drift_monitor/dagRuns", run, token)
        state, deadline = None, time.monotonic() + 240
        while state not in ("success", "failed") and time.monotonic() < deadline:
            time.sleep(3)
            with contextlib.suppress(TimeoutError):  # a busy machine answers late
                got = _call(
                    "GET", f"{url}/api/v2/dags/sae_drift_monitor/dagRuns/no_batch", token=token
                )
                state = got["state"]
        assert state == "success"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:  # stop() gives standalone 30 s, then kills its group; a loaded machine is slow
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
    with pytest.raises(urllib.error.URLError):  # stopped: nothing answers on the port
        _call("GET", f"{url}/api/v2/monitor/health")
    with pytest.raises(ProcessLookupError):  # and nothing of Airflow is left running
        os.killpg(group, 0)
