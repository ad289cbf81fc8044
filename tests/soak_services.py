"""The soak's own PostgreSQL cluster and Redis server (tests/dags/soak.py).

The soak restarts the metadata database and the broker, so it cannot use the machine's: it
starts a PostgreSQL cluster (``initdb`` in a temporary folder, its own port, trust auth on
loopback only) and a ``redis-server`` on its own port with an append-only file (as
docker/compose.yaml's redis service), and stops them by PID. ``initdb`` refuses to run as root:
under root both the cluster's commands run as the ``postgres`` OS user, in a folder it owns.
Standard library only at top level, like tests/distributed_topology.py.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.distributed_topology import Topology, _kill_tree


def _port_answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait_port(port: int, up: bool, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while _port_answers(port) != up:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} on 127.0.0.1:{port} did not go {'up' if up else 'down'}")
        time.sleep(0.2)


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def missing_programs() -> str | None:
    """What the soak's own services need and this machine lacks, or None."""
    missing = [p for p in ("initdb", "pg_ctl") if pg_bin(p) is None]
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("a `postgres` OS user (initdb refuses root)")
    return ", ".join(missing) or None


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<port>, superuser ``postgres``, no password."""

    def __init__(self, port: int):
        self.port = port
        # Not under pytest's tmp_path: its parents are root's, closed to the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="sae-soak-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self._as = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*self._as, *cmd], capture_output=True, text=True, timeout=timeout, cwd=self.folder
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {done.stderr[-2000:]}\n{self.log_tail()}")

    def init(self) -> None:
        self._run(
            pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-instructions",
        )  # fmt: skip
        (self.data / "postgresql.auto.conf").write_text(
            f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{self.folder}'\nmax_connections = 200\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )

    def start(self) -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start")
        _wait_port(self.port, True, 60, "PostgreSQL")

    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pidfile.read_text().split()[0])
        return None

    def stop(self, timeout: float = 60) -> None:
        """Fast shutdown (SIGINT to this cluster's postmaster): sessions are cut, as in a crash
        of the database host's service, then the data is consistent on disk."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while self.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
            time.sleep(1)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return "(no PostgreSQL log)"


class RedisServer:
    """A redis-server on 127.0.0.1:<port> with an append-only file: a restart keeps the queue."""

    def __init__(self, port: int, folder: Path):
        self.port = port
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115  (closed with the process)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _wait_port(self.port, True, 30, "Redis")

    def stop(self) -> None:
        """SIGTERM to this server's PID: it writes its append-only file and exits."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


# ---- the topology on these services, supervised --------------------------------------------------
class SoakTopology(Topology):
    """The distributed topology on the soak's own PostgreSQL and Redis, with a supervisor.

    ``check_alive`` restarts any Airflow or MLflow process that exited, as compose's
    ``restart: unless-stopped`` does, and keeps the list of restarts; a process the soak
    stops on purpose is taken out of ``procs`` first, so it stays down until restarted.
    """

    def __init__(self, workdir, config_path, pg, redis, extra_env=None, concurrency=None):
        self.pg, self.redis = pg, redis
        self.specs: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        self.restarts: list[dict] = []
        env = {**(extra_env or {}), "AIRFLOW__CELERY__BROKER_URL": redis.url}
        super().__init__(workdir, config_path, extra_env=env, concurrency=concurrency)

    def pg_url(self, role: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.pg.port}/{self.databases[role]}"

    def _admin(self, *statements: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.pg.admin_url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
        finally:
            conn.close()

    def _clear_redis(self) -> None:
        """Nothing to clear: the whole Redis server is the soak's and goes away."""

    def _spawn(self, name, cmd, extra_env=None) -> None:
        self.specs[name] = (cmd, extra_env)
        super()._spawn(name, cmd, extra_env)

    def respawn(self, name: str) -> None:
        cmd, env = self.specs[name]
        super()._spawn(name, cmd, env)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal ``name``'s process tree (by PID) and leave it down."""
        proc = self.procs.pop(name)
        _kill_tree(proc, sig)
        proc.wait(timeout=30)

    def check_alive(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            self.restarts.append({"name": name, "code": proc.returncode, "at": time.perf_counter()})
            if len(self.restarts) > 20:
                raise RuntimeError(f"more than 20 restarts: {self.restarts}")
            self.respawn(name)


def immutable_flag_works(folder: Path) -> str | None:
    """None when ``chattr +i`` stops writes under ``folder``'s file system, else why not (the
    artifact-store fault needs it: the soak runs as root, whom file modes do not stop)."""
    probe = Path(tempfile.mkdtemp(prefix=".immutable-probe-", dir=folder))
    try:
        done = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
        if done.returncode != 0:
            return f"chattr +i failed: {done.stderr.strip()[:200]}"
        try:
            (probe / "x").write_text("x")
        except OSError:
            return None
        return "chattr +i did not stop a write"
    except FileNotFoundError:
        return "no chattr program"
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True, check=False)
        shutil.rmtree(probe, ignore_errors=True)
