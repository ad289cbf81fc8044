"""Every CLI flag that names a location passes the same boundary as the matching DAG param.

Each test runs ``sae-pipeline`` with the deployment's allow-lists set and asserts the guarded
effect: a one-line error and exit 2, nothing written, nothing fetched, no MLflow call.
"""

from __future__ import annotations

import http.server
import threading
from types import SimpleNamespace

import pytest

from sae_pipeline.cli import main

DEPLOYMENT_ENV = (
    "SAE_ALLOWED_TRACKING_URIS", "SAE_ALLOWED_ARTIFACT_ROOTS", "SAE_ALLOWED_CONFIG_DIRS",
    "SAE_ALLOWED_DATA_SOURCES", "SAE_CONFIG", "SAE_DRIFT_POLICY", "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
)  # fmt: skip


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    """Allow-lists over folders under ``tmp_path``; ``outside`` is in none of them."""
    from sae_pipeline.registry import service

    for name in DEPLOYMENT_ENV:
        monkeypatch.delenv(name, raising=False)

    def serve_forever(*args, **kwargs):
        raise AssertionError("serve started a server")

    monkeypatch.setattr(service.Supervisor, "run", serve_forever)
    allowed, data, configs, outside = (tmp_path / n for n in ("allowed", "data", "cfg", "out"))
    for folder in (allowed, data, configs, outside):
        folder.mkdir()
    monkeypatch.setenv("SAE_ALLOWED_ARTIFACT_ROOTS", str(allowed))
    monkeypatch.setenv("SAE_ALLOWED_DATA_SOURCES", f"sklearn://,{data}")
    monkeypatch.setenv("SAE_ALLOWED_CONFIG_DIRS", str(configs))
    db = tmp_path / "mlflow.db"
    sets = ["--set", f"registry.tracking_uri=sqlite:///{db}", "--set", f"artifacts_root={allowed}"]
    return SimpleNamespace(
        tmp=tmp_path, allowed=allowed, data=data, configs=configs, outside=outside, db=db, sets=sets
    )


@pytest.fixture
def http_server():
    """A server on 127.0.0.1 that records every request it gets."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = b"a,b\n1,2\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", seen=seen)
    server.shutdown()


def _refused(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("sae-pipeline: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def _tree(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- ingest --source / --contract / --output / --config ---------------------------------------
def test_ingest_source_and_contract_outside_the_data_list_are_not_fetched(
    deployment, http_server, capsys
):
    out = deployment.allowed / "snap"
    outside_csv = deployment.outside / "victim.csv"
    outside_csv.write_text("a,b\n1,2\n")
    for source in (f"{http_server.url}/meta.csv", str(outside_csv), f"{outside_csv}::x.csv"):
        _refused(capsys, ["ingest", "--source", source, "--output", str(out)], "data.source")
    contract = f"{http_server.url}/contract.json"
    argv = ["ingest", "--source", "sklearn://digits", "--contract", contract]
    _refused(capsys, [*argv, "--output", str(out)], "data.contract", "SAE_ALLOWED_DATA_SOURCES")
    assert http_server.seen == []  # nothing fetched
    assert not out.exists()  # nothing written


def test_ingest_output_outside_the_artifact_roots_is_not_written(deployment, capsys):
    for output in (
        deployment.outside / "snap",
        f"{deployment.allowed}/../out/snap",
        f"{deployment.outside}/snap::memory://x",
    ):
        argv = ["ingest", "--source", "sklearn://digits", "--output", str(output)]
        _refused(capsys, argv, "--output")
    assert _tree(deployment.outside) == [] and _tree(deployment.allowed) == []


def test_ingest_inside_the_lists_still_writes_its_snapshot(deployment, capsys):
    out = deployment.allowed / "snap"
    code = main(["ingest", "--source", "sklearn://digits", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "manifest.json").is_file()


# ---- --config and drift --policy: SAE_ALLOWED_CONFIG_DIRS -------------------------------------
def test_config_files_outside_the_config_dirs_are_not_read(deployment, capsys):
    secret = deployment.outside / "secret.yaml"
    secret.write_text("secret-line: [\n")  # were it read, the YAML error would quote it
    for argv in (
        ["config", "--config", str(secret)],
        ["ingest", "--config", str(secret), "--output", str(deployment.allowed / "s")],
        ["serve", "--config", str(secret)],
        ["registry", "migrate", "--version", "1", "--config", str(secret)],
        ["encode", "--batch", str(deployment.data), "--config", str(secret)],
        ["drift", "--batch", str(deployment.data), "--policy", str(secret)],
        ["drift", "--batch", str(deployment.data), "--config", str(secret)],
    ):
        err = _refused(capsys, [*argv, *deployment.sets], "SAE_ALLOWED_CONFIG_DIRS")
        assert "secret-line" not in err
    assert not deployment.db.exists()  # no MLflow call
    assert _tree(deployment.allowed) == []


# ---- serve --live-file / --log-dir, and the tracking URI of serve and migrate -----------------
def test_serve_live_file_and_log_dir_must_lie_under_the_artifact_roots(deployment, capsys):
    victim = deployment.outside / "victim.txt"
    victim.write_text("keep me\n")
    for flag, value in (
        ("--live-file", str(victim)),
        ("--live-file", f"{deployment.allowed}/../out/victim.txt"),
        ("--log-dir", str(deployment.outside / "logs")),
        ("--log-dir", "s3://bucket/logs"),
    ):
        _refused(capsys, ["serve", "--blue-green", flag, value, *deployment.sets], flag)
    assert victim.read_text() == "keep me\n"
    assert _tree(deployment.outside) == ["victim.txt"]
    assert not deployment.db.exists()  # refused before the registry was opened


def test_serve_and_migrate_send_no_credentials_to_an_unlisted_server(
    deployment, http_server, capsys, monkeypatch
):
    monkeypatch.setenv("SAE_ALLOWED_TRACKING_URIS", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "worker-secret")
    evil = ["--set", f"registry.tracking_uri={http_server.url}"]
    _refused(capsys, ["serve", "--interval", "0", *evil], "not this deployment's MLflow server")
    _refused(capsys, ["registry", "migrate", "--version", "1", *evil], "tracking_uri")
    assert http_server.seen == []


# ---- demo --workdir ---------------------------------------------------------------------------
def test_demo_workdir_outside_the_artifact_roots_gets_nothing_written(deployment, capsys):
    workdir = deployment.outside / "demo"
    _refused(capsys, ["demo", "--workdir", str(workdir)], "--workdir", "SAE_ALLOWED_ARTIFACT_ROOTS")
    assert not workdir.exists()  # no .airflow home, no demo data
