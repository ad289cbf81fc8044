"""``sae-pipeline serve``'s supervisor with stand-in servers: retries, refusals, the child's env.

The stand-in is a tiny HTTP server process that answers ``/ping``; a file per version says how
many of its next starts fail (a registry that is briefly unreachable, say), so the tests run in
seconds and need no model.
"""

from __future__ import annotations

import socket
import sys
import time
from types import SimpleNamespace

import pytest

from sae_pipeline.registry import service

STANDIN = r"""
import http.server, os, pathlib, sys
folder, port = pathlib.Path(sys.argv[1]), int(sys.argv[2])
version = os.environ["SAE_SERVE_MODEL_URI"].rsplit("/", 1)[1]
with open(folder / f"starts-v{version}", "a") as f:
    f.write(os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "unset") + "\n")
fails = folder / f"fail-v{version}"
if fails.exists() and int(fails.read_text()) != 0:
    fails.write_text(str(int(fails.read_text()) - 1))
    sys.exit(1)

class Ping(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(version.encode())

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Ping).serve_forever()
"""


class Registry:
    """A client whose alias points where the test says."""

    def __init__(self, version: str):
        self.version = version

    def get_model_version_by_alias(self, name, alias):
        return SimpleNamespace(version=self.version)


@pytest.fixture
def standin(tmp_path, monkeypatch):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    monkeypatch.setattr(
        service,
        "serve_command",
        lambda uri, host, port, *a: [sys.executable, str(script), str(tmp_path), str(port)],
    )
    monkeypatch.setattr(service, "RETRY_FIRST", 1.0)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # the parent's setting

    def fail(version: str, times: int) -> None:
        (tmp_path / f"fail-v{version}").write_text(str(times))

    def starts(version: str) -> list[str]:
        path = tmp_path / f"starts-v{version}"
        return path.read_text().split() if path.exists() else []

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sup = service.Supervisor("enc", port=port, start_timeout=20)
    yield SimpleNamespace(sup=sup, fail=fail, starts=starts)
    if sup.live is not None:
        sup.live.stop()


def test_a_load_failure_that_goes_away_is_retried_while_nothing_serves(standin):
    """Today's supervisor put v1 in ``failed`` after one bad start and never tried again:
    an outage until someone acts. Now it tries again after a pause that doubles."""
    sup, registry = standin.sup, Registry("1")
    standin.fail("1", 2)
    assert not sup.step(registry) and not sup.serving()
    assert sup.pause["1"] == pytest.approx(1.0)
    assert not sup.step(registry)  # within the pause: no new start
    assert len(standin.starts("1")) == 1
    time.sleep(1.1)
    assert not sup.step(registry) and sup.pause["1"] == pytest.approx(2.0)
    time.sleep(2.1)
    assert sup.step(registry) and sup.serving() and sup.live.version == "1"
    assert len(standin.starts("1")) == 3
    assert "1" not in sup.retry_at and "1" not in sup.refused


def test_a_version_is_refused_for_good_only_while_an_older_one_serves(standin):
    sup, registry = standin.sup, Registry("1")
    assert sup.step(registry) and sup.live.version == "1"
    standin.fail("2", 1)
    registry.version = "2"
    assert not sup.step(registry)
    assert sup.serving() and sup.live.version == "1"  # restarted after the one-port switch
    assert sup.refused == {"2"} and len(standin.starts("2")) == 1
    time.sleep(0.5)
    assert not sup.step(registry) and len(standin.starts("2")) == 1  # not tried again
    sup.live.stop()  # the old server dies: nothing healthy serves, so v2 is tried again
    assert sup.step(registry) and sup.live.version == "2" and sup.refused == set()


def test_the_servers_run_with_pickle_deserialization_off(standin):
    sup = standin.sup
    assert sup.step(Registry("1"))
    assert standin.starts("1") == ["false"]  # the parent had "true"


def test_the_app_refuses_a_pickled_model_even_when_the_environment_allows_it(tmp_path, monkeypatch):
    """A cloudpickled pyfunc whose unpickling would run code: the service never runs it."""
    import mlflow.pyfunc

    marker = tmp_path / "executed"

    class Payload(mlflow.pyfunc.PythonModel):
        def __init__(self, path):
            self.path = str(path)

        def load_context(self, context):
            open(self.path, "w").close()

        def predict(self, context, model_input, params=None):
            return model_input

    mlflow.pyfunc.save_model(str(tmp_path / "m"), python_model=Payload(marker), pip_requirements=[])
    marker.unlink(missing_ok=True)  # saving ran it here, in the test's own process
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    with pytest.raises(Exception, match=r"(?i)pickle"):
        service.scoring_app(str(tmp_path / "m"))
    assert not marker.exists()


def test_normal_events_are_logged_below_warning(standin, caplog):
    """Starting and switching are INFO; only failures reach WARNING and above."""
    import logging

    caplog.set_level(logging.DEBUG, logger=service.__name__)
    assert standin.sup.step(Registry("1"))
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == service.__name__]
    assert [m for _, m in records if "is live" in m] and [m for _, m in records if "starting" in m]
    assert all(level == logging.INFO for level, _ in records), records
    standin.fail("2", 1)
    assert not standin.sup.step(Registry("2"))
    assert any(r.levelno == logging.ERROR and "did not start" in r.getMessage()
               for r in caplog.records)  # fmt: skip
