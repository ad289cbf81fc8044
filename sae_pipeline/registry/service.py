"""The encoder service: MLflow's scoring server on the champion, restarted when the alias moves.

``mlflow models serve -m models:/<encoder>@champion`` *is* the service; this module only runs
it. The scoring server resolves the alias once, at start, and has no reload endpoint, so
``supervise`` polls the alias and, when it points at a new version, starts that version (on
the same port, or on the other one of a blue/green pair), waits for ``/ping`` and only then
stops the old server. A version that fails to start is not retried; the old one keeps serving.

``scoring_app`` is MLflow's own scoring app (``mlflow.pyfunc.scoring_server.init``) with three
error-hygiene fixes no model can make from ``predict``: a request without Content-Type gets 415
instead of 500, 4xx bodies lose ``stack_trace``, and parse errors stop echoing the request
body. ``sae-pipeline serve`` uses it with the local environment; with ``--plain`` it runs
``mlflow models serve`` unchanged (and any ``--env-manager``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_URI_ENV = "SAE_SERVE_MODEL_URI"


# ---- the scoring app with error hygiene --------------------------------------------------------
def scoring_app(model_uri: str):
    """MLflow's scoring app for ``model_uri``, with the three server-side leaks closed."""
    from fastapi import Request
    from fastapi.responses import Response
    from mlflow.pyfunc import load_model
    from mlflow.pyfunc.scoring_server import init

    app = init(load_model(model_uri))

    def answer(status: int, payload: dict) -> Response:
        return Response(json.dumps(payload), status_code=status, media_type="application/json")

    @app.middleware("http")
    async def error_hygiene(request: Request, call_next):
        if request.url.path != "/invocations":
            return await call_next(request)
        if not request.headers.get("content-type"):  # MLflow: None.split -> HTTP 500
            return answer(
                415,
                {
                    "error_code": "BAD_REQUEST",
                    "message": "Content-Type header missing: use application/json or text/csv",
                },
            )
        response = await call_next(request)
        if response.status_code < 400:
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])
        try:
            payload = json.loads(body)
        except ValueError:
            return Response(body, status_code=response.status_code, media_type=response.media_type)
        payload.pop("stack_trace", None)
        if isinstance(payload.get("message"), str):  # "...\nInput: <the whole body>"
            payload["message"] = re.sub(r"\s*Input: .*", "", payload["message"], flags=re.S)
        return answer(response.status_code, payload)

    return app


def app_from_env():
    """uvicorn factory: ``uvicorn --factory sae_pipeline.registry.service:app_from_env``."""
    return scoring_app(os.environ[MODEL_URI_ENV])


def serve_command(
    model_uri: str, host: str, port: int, env_manager: str = "local", plain: bool = False
) -> list[str]:
    """The argv of one server process for ``model_uri``."""
    if plain or env_manager != "local":
        return [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", env_manager, "-h", host, "-p", str(port),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "uvicorn", "--factory", f"{__name__}:app_from_env",
        "--host", host, "--port", str(port), "--no-access-log",
    ]  # fmt: skip


# ---- following the alias -------------------------------------------------------------------------
def healthy(host: str, port: int) -> bool:
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/ping", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Server:
    version: str
    port: int
    proc: subprocess.Popen

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the CLI and the server it spawned
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Supervisor:
    """Keeps one server on the version behind ``alias`` of registered model ``name``."""

    name: str
    alias: str = "champion"
    host: str = "127.0.0.1"
    port: int = 5001
    env_manager: str = "local"
    plain: bool = False
    blue_green: bool = False  # alternate port and port + 1; live port written to live_file
    live_file: Path | None = None
    start_timeout: float = 900
    log_dir: Path | None = None
    live: Server | None = None
    failed: set[str] = field(default_factory=set)

    def wanted(self, client) -> str | None:
        try:
            return str(client.get_model_version_by_alias(self.name, self.alias).version)
        except Exception as err:  # registry unreachable: keep serving what runs
            log.warning("serve: alias lookup failed (%s); keeping the current server", err)
            return self.live.version if self.live else None

    def step(self, client) -> bool:
        """One poll: start the alias's version if it is not the live one; True on a switch."""
        want = self.wanted(client)
        running = self.live is not None and self.live.proc.poll() is None
        if want is None or want in self.failed or (running and want == self.live.version):
            return False
        port = self.port
        if self.blue_green and self.live is not None and self.live.port == self.port:
            port = self.port + 1
        if self.live is not None and port == self.live.port:
            self.live.stop()  # one port: the gap starts here
        server = self._start(want, port)
        if not self._ready(server):
            server.stop()
            self.failed.add(want)
            log.error("serve: %s v%s did not start; keeping the previous version", self.name, want)
            if self.live is not None and self.live.proc.poll() is not None:
                self.live = self._start(self.live.version, self.live.port)
                self._ready(self.live)
            return False
        if self.live is not None and self.live.port != port:
            self.live.stop()
        self.live = server
        if self.live_file is not None:
            self.live_file.write_text(f"{port}\n")
        log.warning("serve: %s v%s is live on port %d", self.name, want, port)
        return True

    def _start(self, version: str, port: int) -> Server:
        uri = f"models:/{self.name}/{version}"
        env = {
            **os.environ,
            MODEL_URI_ENV: uri,
            # `--env-manager local` runs a bare `uvicorn`: it must be on PATH
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{self.name}-v{version}-{port}.log", "ab")  # noqa: SIM115
        log.warning("serve: starting %s on %s:%d", uri, self.host, port)
        cmd = serve_command(uri, self.host, port, self.env_manager, self.plain)
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        return Server(version, port, proc)

    def _ready(self, server: Server) -> bool:
        end = time.monotonic() + self.start_timeout
        while time.monotonic() < end and server.proc.poll() is None:
            if healthy(self.host, server.port):
                return True
            time.sleep(0.5)
        return False

    def run(self, client, interval: float = 30, max_switches: int = 0) -> None:
        """Poll every ``interval`` seconds until stopped (SIGTERM/Ctrl-C); stop the server."""
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        switches = 0
        try:
            while True:
                switches += self.step(client)
                if max_switches and switches >= max_switches:
                    return
                if self.live is None and not interval:
                    raise RuntimeError(f"no version of {self.name} could be started")
                if interval <= 0:  # no polling: wait for the one server to end
                    self.live.proc.wait()
                    return
                time.sleep(interval)
        finally:
            if self.live is not None:
                self.live.stop()
