"""The distributed deployment of docker/compose.yaml, started as plain processes on this machine.

An MLflow server (``mlflow/start-server.sh``: PostgreSQL stores, proxied artifacts, basic
auth) and Airflow with the CeleryExecutor on PostgreSQL and Redis: api-server, scheduler,
dag-processor, one worker on the ``default`` queue and one on ``gpu``. Every database name
and Redis key prefix is unique to one ``Topology``, and ``stop()`` drops them, so runs on the
same services never meet. tests/test_distributed.py drives it.

This module is also the workers' ``[core] hostname_callable``: two workers on one host need
different names for the task-instance records to tell which one ran a task. Keep its top-level
imports to the standard library; a task supervisor imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
DAG_ID = "sae_training"
WORKER_NAMES = {"default": "sae-worker-default", "gpu": "sae-worker-gpu"}


def worker_hostname() -> str:
    """The name a worker records on the task instances it runs (``$SAE_WORKER_NAME``)."""
    return os.environ.get("SAE_WORKER_NAME") or socket.getfqdn()


def compose_worker_preload() -> str:
    """The Celery settings of docker/compose.yaml's workers: the modules each imports at start,
    so that every task it forks inherits torch, MLflow and pandas instead of importing them."""
    import yaml

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    return compose["x-worker-env"]["AIRFLOW__CELERY__EXTRA_CELERY_CONFIG"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_services() -> None:
    """Skip (fail under CI) when PostgreSQL or Redis does not answer: the topology needs both."""
    from tests.ci import unavailable

    missing = services_reachable()
    if missing:
        unavailable(f"the distributed tests need {missing}")


def services_reachable() -> str | None:
    """None when PostgreSQL (5432) and Redis (6379) answer on 127.0.0.1, else what is missing."""
    missing = []
    for name, port in (("PostgreSQL", 5432), ("Redis", 6379)):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            missing.append(f"{name} on 127.0.0.1:{port}")
    return ", ".join(missing) or None


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class HttpError(RuntimeError):
    def __init__(self, status: int, body: str, url: str):
        super().__init__(f"HTTP {status} from {url}: {body[:500]}")
        self.status = status


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """One JSON request; the decoded answer, or HttpError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        raise HttpError(err.code, err.read().decode(errors="replace"), url) from None
    return json.loads(raw) if raw else None


def _kill_tree(proc: subprocess.Popen, sig: int) -> None:
    """Signal a process and every descendant: the task supervisor puts each task process in
    a process group of its own, so killing the worker's group alone would leave it running."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def _stop_all(procs: list[subprocess.Popen], timeout: float = 5) -> None:
    """SIGTERM every process tree at once, then SIGKILL what is still there after ``timeout``."""
    import psutil

    family = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(proc.pid)
            family += [parent, *parent.children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _gone, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    for proc in procs:
        proc.wait(timeout=10)


class Topology:
    """Start, drive and tear down the services of one distributed test session."""

    def __init__(
        self,
        workdir: Path,
        config_path: Path,
        extra_env: dict[str, str] | None = None,
        concurrency: dict[str, int] | None = None,
    ):
        self.workdir = workdir
        self.config_path = config_path
        self.concurrency = {queue: 1 for queue in WORKER_NAMES} | (concurrency or {})
        self.tag = secrets.token_hex(4)
        self.databases = {role: f"sae_{role}_{self.tag}" for role in ("airflow", "mlflow", "auth")}
        self.ports = {
            "api": free_port(),
            "mlflow": free_port(),
            "log_default": free_port(),
            "log_gpu": free_port(),
        }
        self.redis_prefix = f"sae-test-{self.tag}:"
        self.airflow_password = secrets.token_urlsafe(16)
        # A second, named user: the person who answers drift reviews.
        self.passwords = {"admin": self.airflow_password, "reviewer": secrets.token_urlsafe(16)}
        self.mlflow_user, self.mlflow_password = "admin", secrets.token_urlsafe(16)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._tokens: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.env = {**self._env(), **(extra_env or {})}

    # ---- configuration ------------------------------------------------------------------------
    def pg_url(self, role: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://postgres@127.0.0.1:5432/{self.databases[role]}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.workdir / "mlflow-artifacts"

    def _env(self) -> dict[str, str]:
        from cryptography.fernet import Fernet

        home = self.workdir / "airflow"
        home.mkdir(parents=True, exist_ok=True)
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps(self.passwords))
        bin_dir = str(Path(sys.executable).parent)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW__", "AIRFLOW_CTX", "MLFLOW_", "SAE_"))
        }
        env.update(
            {
                "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONPATH": str(REPO),  # the hostname callable lives in tests/
                "TMPDIR": str(self.workdir),
                # Airflow, as in docker/compose.yaml (x-airflow-common)
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,reviewer:op",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.pg_url("airflow"),
                "AIRFLOW__CELERY__BROKER_URL": REDIS_URL,
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.pg_url('airflow')}",
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.redis_prefix,
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
                # Only manual runs: an unpaused @weekly DAG would get a scheduled run at once.
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                # A task whose worker died is failed (and retried) after 10 s without a
                # heartbeat, not the default 300 s; a live task heartbeats every second. The
                # supervisor also polls at that interval: a task exit it misses would otherwise
                # hold the worker's slot until the next poll (default 5 s).
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "10",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
                # The DAG files do not change during a test: parse them once, not every 30 s.
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
                # The pipeline, as in docker/compose.yaml
                "SAE_CONFIG": str(self.config_path),
                "MLFLOW_TRACKING_URI": self.mlflow_url,
                "MLFLOW_TRACKING_USERNAME": self.mlflow_user,
                "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            }
        )
        return env

    # ---- processes ----------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
        self.procs[name] = subprocess.Popen(
            cmd,
            env={**self.env, **(extra_env or {})},
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def _airflow(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "airflow", *args]

    def start(self) -> None:
        t0 = time.perf_counter()
        self._create_databases()
        self._spawn(
            "mlflow",
            [str(REPO / "mlflow" / "start-server.sh")],
            {
                "MLFLOW": str(Path(sys.executable).parent / "mlflow"),
                "PYTHON": sys.executable,
                "MLFLOW_BACKEND_STORE_URI": self.pg_url("mlflow"),
                "MLFLOW_ARTIFACTS_DESTINATION": str(self.mlflow_artifacts),
                "MLFLOW_HOST": "127.0.0.1",
                "MLFLOW_PORT": str(self.ports["mlflow"]),
                "MLFLOW_WORKERS": "1",
                "MLFLOW_AUTH": "basic",
                "MLFLOW_AUTH_DATABASE_URI": self.pg_url("auth"),
                "MLFLOW_AUTH_ADMIN_USERNAME": self.mlflow_user,
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
            },
        )
        # The same one-shot migration as the compose file's airflow-init service.
        migrate = subprocess.run(
            self._airflow("db", "migrate"),
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{migrate.stderr[-3000:]}")
        self.timings["migrated"] = time.perf_counter() - t0
        api = ["api-server", "--host", "127.0.0.1", "--port", str(self.ports["api"])]
        self._spawn("api-server", self._airflow(*api, "--workers", "1"))
        self._spawn("scheduler", self._airflow("scheduler"))
        self._spawn("dag-processor", self._airflow("dag-processor"))
        for queue in WORKER_NAMES:
            self.start_worker(queue)
        self.wait_ready()
        self.startup_seconds = time.perf_counter() - t0
        self.timings["started"] = self.startup_seconds

    def start_worker(self, queue: str) -> None:
        """A Celery worker consuming ``queue`` only, as the compose file's worker services."""
        name = WORKER_NAMES[queue]
        self._spawn(
            f"worker-{queue}",
            self._airflow(
                *(
                    "celery",
                    "worker",
                    "--queues",
                    queue,
                    "--concurrency",
                    str(self.concurrency[queue]),
                ),
                *("--celery-hostname", f"{queue}-{self.tag}@%h"),
            ),
            {
                "SAE_WORKER_NAME": name,
                "AIRFLOW__CELERY__EXTRA_CELERY_CONFIG": compose_worker_preload(),
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.distributed_topology.worker_hostname",
                # Two workers on one host each serve their task logs on a port of their own.
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.ports[f"log_{queue}"]),
            },
        )

    def kill_worker(self, queue: str) -> None:
        """SIGKILL a worker with its pool, supervisors and task processes: a machine lost."""
        proc = self.procs.pop(f"worker-{queue}")
        _kill_tree(proc, signal.SIGKILL)
        proc.wait(timeout=10)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def wait_ready(self, timeout: float = 240) -> None:
        def mlflow_up():
            self.check_alive()
            try:
                return urllib.request.urlopen(f"{self.mlflow_url}/health", timeout=5).status == 200
            except OSError:
                return False

        def dag_parsed():
            self.check_alive()
            try:
                return self.api("GET", f"/dags/{DAG_ID}")
            except (OSError, HttpError):
                return None

        wait_for("the Airflow api-server to serve the parsed training DAG", dag_parsed, timeout)
        wait_for("the MLflow server", mlflow_up, timeout)

    def stop(self) -> None:
        _stop_all(list(self.procs.values()))
        self.procs.clear()
        self._drop_databases()
        self._clear_redis()

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def diagnostics(self) -> str:
        return "\n".join(
            f"----- {p.stem} -----\n{self.log_tail(p.stem, 2500)}"
            for p in sorted(self.logs.glob("*.log"))
        )

    # ---- databases ----------------------------------------------------------------------------
    def _admin(self, *statements: str) -> None:
        import psycopg2

        conn = psycopg2.connect(PG_ADMIN)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
        finally:
            conn.close()

    def _create_databases(self) -> None:
        self._admin(*(f'CREATE DATABASE "{db}"' for db in self.databases.values()))

    def _drop_databases(self) -> None:
        self._admin(
            *(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)' for db in self.databases.values())
        )

    def _clear_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{self.redis_prefix}*", count=500))
            if keys:
                client.delete(*keys)
        finally:
            client.close()

    # ---- Airflow REST API ---------------------------------------------------------------------
    def token(self, user: str = "admin") -> str:
        if user not in self._tokens:
            answer = http(
                "POST",
                f"{self.api_url}/auth/token",
                {"username": user, "password": self.passwords[user]},
            )
            self._tokens[user] = answer["access_token"]
        return self._tokens[user]

    def api(self, method: str, path: str, body: Any = None, user: str = "admin") -> Any:
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        return http(method, f"{self.api_url}/api/v2{path}", body, headers)

    def trigger(self, run_id: str, conf: dict[str, Any], dag_id: str = DAG_ID) -> dict[str, Any]:
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        return self.api("POST", f"/dags/{dag_id}/dagRuns", body)

    def dag_run(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, Any]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id)}")

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns?order_by=run_after&limit=100")["dag_runs"]

    def task_instances(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, dict[str, Any]]:
        path = f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances"
        return {ti["task_id"]: ti for ti in self.api("GET", path)["task_instances"]}

    def task_log(self, run_id: str, task_id: str, try_number: int) -> str:
        path = (
            f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/{task_id}"
            f"/logs/{try_number}?full_content=true"
        )
        return json.dumps(self.api("GET", path))

    def wait_for_run(self, run_id: str, timeout: float, dag_id: str = DAG_ID) -> dict[str, Any]:
        def finished():
            self.check_alive()
            run = self.dag_run(run_id, dag_id)
            return run if run["state"] in ("success", "failed") else None

        try:
            return wait_for(f"DAG run {run_id} to finish", finished, timeout, interval=1)
        except TimeoutError as err:
            states = {t: ti["state"] for t, ti in self.task_instances(run_id, dag_id).items()}
            raise TimeoutError(f"{err}; task states {states}\n{self.diagnostics()}") from None

    # ---- MLflow REST API ----------------------------------------------------------------------
    def mlflow(self, path: str, auth: bool = True, **params: Any) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        headers = {}
        if auth:
            basic = b64encode(f"{self.mlflow_user}:{self.mlflow_password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        return http("GET", f"{self.mlflow_url}/api/2.0/mlflow{path}{query}", headers=headers)

    def model_versions(self, name: str) -> list[dict[str, Any]]:
        try:
            found = self.mlflow("/model-versions/search", filter=f"name = '{name}'")
        except HttpError as err:
            if err.status == 404:
                return []
            raise
        return found.get("model_versions", [])
