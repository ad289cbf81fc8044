"""The encoder service: ``sae-pipeline serve`` runs the champion encoder and follows the alias.

The scoring server resolves ``@champion`` once, at start, and has no reload endpoint, so
``supervise`` polls the alias and, when it points at a new version, starts that version (on
the same port, or on the other one of a blue/green pair), waits for ``/ping`` and only then
stops the old server. While nothing healthy serves, a version that does not start is retried
with a growing pause (``RETRY_FIRST`` seconds, doubling up to ``RETRY_MAX``); it is refused for
good only while an older version serves, and that one keeps serving.

Each server is a child process, started with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``
whatever the parent's environment says: a pickled model registered under the name is refused,
never executed. By default the child runs ``serving.create_app`` (MLflow's scoring protocol
with limits, batching, Arrow and metrics) in this environment; ``--plain`` (or another
``--env-manager``) runs ``mlflow models serve`` unchanged.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_URI_ENV = "SAE_SERVE_MODEL_URI"
NO_PICKLE = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
RETRY_FIRST, RETRY_MAX = 5.0, 300.0


def scoring_app(model_uri: str):
    """The service app (``serving.create_app``) on ``model_uri``, loaded without unpickling."""
    from mlflow.pyfunc import load_model

    from sae_pipeline.registry.serving import create_app

    os.environ.update(NO_PICKLE)  # in case this runs outside the supervisor
    name, _, version = model_uri.removeprefix("models:/").partition("/")
    app = create_app(load_model(model_uri), name=name, version=version)
    # Everything loaded so far (mlflow, torch, pandas, the model) lives as long as the process:
    # out of the collector's sight, a full collection no longer walks it (1.5 s, once every
    # few hundred requests, on this model; under 1 ms after freezing).
    gc.collect()
    gc.freeze()
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
    refused: set[str] = field(default_factory=set)  # failed while an older version served
    retry_at: dict[str, float] = field(default_factory=dict)  # version -> monotonic time
    pause: dict[str, float] = field(default_factory=dict)  # version -> the last pause, s

    def serving(self) -> bool:
        return self.live is not None and self.live.proc.poll() is None

    def wanted(self, client) -> str | None:
        try:
            return str(client.get_model_version_by_alias(self.name, self.alias).version)
        except Exception as err:  # registry unreachable: keep serving what runs
            log.warning("serve: alias lookup failed (%s); keeping the current server", err)
            return self.live.version if self.live else None

    def step(self, client) -> bool:
        """One poll: start the alias's version if it is not the live one; True on a switch."""
        want = self.wanted(client)
        if want is None:
            return False
        if self.serving() and (want == self.live.version or want in self.refused):
            return False
        if not self.serving() and time.monotonic() < self.retry_at.get(want, 0.0):
            return False  # nothing serves, and the last try of this version was too recent
        port = self.port
        if self.blue_green and self.live is not None and self.live.port == self.port:
            port = self.port + 1
        if self.live is not None and port == self.live.port:
            self.live.stop()  # one port: the gap starts here
        server = self._start(want, port)
        if not self._ready(server):
            server.stop()
            return self._failed(want)
        if self.live is not None and self.live.port != port:
            self.live.stop()
        self.live = server
        self.refused.discard(want)
        self.retry_at.pop(want, None)
        self.pause.pop(want, None)
        if self.live_file is not None:
            self.live_file.write_text(f"{port}\n")
        log.info("serve: %s v%s is live on port %d", self.name, want, port)
        return True

    def _failed(self, want: str) -> bool:
        """After ``want`` did not start: the older version keeps serving (restarted if the
        switch had stopped it) and ``want`` is refused while it does; with nothing serving,
        ``want`` is tried again after a pause that doubles each time."""
        old = self.live
        if old is not None and old.version != want and old.proc.poll() is not None:
            self.live = self._start(old.version, old.port)
            if not self._ready(self.live):
                self.live.stop()
        if self.serving() and self.live.version != want:
            self.refused.add(want)
            log.error(
                "serve: %s v%s did not start; v%s keeps serving, and v%s is not tried again "
                "while it does",
                self.name, want, self.live.version, want,
            )  # fmt: skip
            return False
        pause = min(2 * self.pause.get(want, RETRY_FIRST / 2), RETRY_MAX)
        self.pause[want], self.retry_at[want] = pause, time.monotonic() + pause
        log.error(
            "serve: %s v%s did not start and nothing is serving; trying again in %g s",
            self.name, want, pause,
        )  # fmt: skip
        return False

    def _start(self, version: str, port: int) -> Server:
        uri = f"models:/{self.name}/{version}"
        env = {
            **os.environ,
            MODEL_URI_ENV: uri,
            **NO_PICKLE,  # whatever this process's environment says
            # `--env-manager local` runs a bare `uvicorn`: it must be on PATH
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{self.name}-v{version}-{port}.log", "ab")  # noqa: SIM115
        log.info("serve: starting %s on %s:%d", uri, self.host, port)
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

    def _next_try(self) -> float:
        """Seconds until the earliest scheduled retry (0 when none is due later)."""
        return max(0.0, min(self.retry_at.values(), default=0.0) - time.monotonic())

    def run(
        self, client, interval: float = 30, max_switches: int = 0, start_attempts: int = 5
    ) -> None:
        """Poll every ``interval`` seconds until stopped (SIGTERM/Ctrl-C); stop the server.

        With ``interval`` <= 0 the alias is read once: its version is started (tried up to
        ``start_attempts`` times, with the pauses above) and served until its process ends."""
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        switches = tries = 0
        try:
            while True:
                switches += self.step(client)
                if max_switches and switches >= max_switches:
                    return
                if interval <= 0:
                    if self.serving():  # no polling: wait for the one server to end
                        self.live.proc.wait()
                        return
                    tries += 1
                    if tries >= start_attempts:
                        raise RuntimeError(
                            f"no version of {self.name} could be started ({tries} tries)"
                        )
                    time.sleep(self._next_try())
                    continue
                time.sleep(interval if self.serving() else min(interval, self._next_try() + 0.1))
        finally:
            if self.live is not None:
                self.live.stop()
