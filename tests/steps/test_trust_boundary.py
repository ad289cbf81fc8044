"""Issue 22 items 1, 2, 3 and 8: what a trigger names reaches nothing the deployment did not allow.

Each test reproduces the reported attack through the steps a DAG task calls and asserts the
guarded effect: the victim file is untouched, nothing is fetched, no secret is stored.
"""

from __future__ import annotations

import http.server
import tempfile
import threading
from types import SimpleNamespace

import pytest

from sae_pipeline import storage
from sae_pipeline.config import build_config, mask_credentials
from sae_pipeline.errors import ConfigError, RegistryError

DEPLOYMENT_ENV = (
    "SAE_ALLOWED_TRACKING_URIS", "SAE_ALLOWED_ARTIFACT_ROOTS", "SAE_ALLOWED_CONFIG_DIRS",
    "SAE_ALLOWED_DATA_SOURCES", "SAE_LOCK_DIR", "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
)  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in DEPLOYMENT_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    """Allow-lists as compose sets them, over folders under ``tmp_path``."""
    allowed, data = tmp_path / "allowed", tmp_path / "data"
    allowed.mkdir()
    data.mkdir()
    monkeypatch.setenv("SAE_ALLOWED_ARTIFACT_ROOTS", str(allowed))
    monkeypatch.setenv("SAE_ALLOWED_DATA_SOURCES", f"sklearn://,{data}")
    monkeypatch.setenv("SAE_ALLOWED_CONFIG_DIRS", str(tmp_path / "configs"))
    return SimpleNamespace(
        tmp=tmp_path,
        allowed=allowed,
        data=data,
        params={"artifacts_root": str(allowed), "registry.tracking_uri": _sqlite(tmp_path)},
    )


def _sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def http_server():
    """A server on 127.0.0.1 that records every request it gets (the worker's network)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = b"internal,metadata\n1,2\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", seen=seen)
    server.shutdown()


def _files_holding(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


# ---- item 1: artifacts_root -------------------------------------------------------------------
def test_item1_a_chained_artifacts_root_cannot_overwrite_a_file_outside_the_root(deployment):
    from sae_pipeline.steps import training as steps

    victim = deployment.tmp / "outside" / "victim.csv"
    victim.parent.mkdir()
    victim.write_text("a,b\n1,2\n")
    for root in (
        f"{deployment.allowed}/../outside/victim.csv::memory://y",
        f"{deployment.allowed}/x://",  # once normalised to a local "x:" under the root
        f"{deployment.allowed}/../outside",
        f"file://{deployment.allowed}/../outside",
    ):
        with pytest.raises(ConfigError, match="artifacts_root") as err:
            steps.prepare("manual__evil", None, {**deployment.params, "artifacts_root": root})
        assert "\n" not in str(err.value)
    assert victim.read_text() == "a,b\n1,2\n"
    assert list(deployment.allowed.iterdir()) == []  # no "x:" folder, no run
    assert not (deployment.tmp / "mlflow.db").exists()  # refused before any MLflow call


def test_item1_the_normalised_root_is_what_the_run_uses(deployment):
    from sae_pipeline.steps import training as steps

    (deployment.allowed / "team").mkdir()
    (deployment.allowed / "link").symlink_to(deployment.allowed / "team")
    root = f"file://{deployment.allowed}/./link/../link"
    ctx = steps.prepare("manual__ok", None, {**deployment.params, "artifacts_root": root})
    assert steps.config_of(ctx).artifacts_root == str((deployment.allowed / "team").resolve())
    assert ctx["run_dir"].startswith(str((deployment.allowed / "team").resolve()))


# ---- item 2: data_source and the monitor's batch files ----------------------------------------
def test_item2_a_data_source_outside_the_list_is_not_fetched(deployment, http_server):
    from sae_pipeline.steps import training as steps

    secret = deployment.tmp / "secret.txt"
    secret.write_text("root:x:0:0:secret-line\n")
    for source in (f"{http_server.url}/metadata.csv", f"{secret}::x.csv", str(secret)):
        with pytest.raises(ConfigError, match=r"data\.source") as err:
            ctx = steps.prepare("manual__src", None, {**deployment.params, "data.source": source})
            steps.ingest(ctx)  # today's code got this far, and read the source
        assert "secret-line" not in str(err.value) and "internal" not in str(err.value)
    assert http_server.seen == []  # nothing was fetched
    assert list(deployment.allowed.iterdir()) == []  # nothing stored


def _batch_params(deployment, **extra):
    return {
        "artifacts_root": str(deployment.allowed),
        "tracking_uri": _sqlite(deployment.tmp),
        **extra,
    }


def test_item2_the_monitors_batch_files_are_checked_before_they_are_opened(deployment, http_server):
    from sae_pipeline.steps.batch_context import batch_context

    folder = deployment.data / "batch"
    folder.mkdir()
    (folder / "rows.parquet").symlink_to(deployment.tmp / "secret.parquet")  # a link out
    (deployment.tmp / "secret.parquet").write_bytes(b"PAR1 secret PAR1")
    refused = {
        "batch": f"{http_server.url}/b.parquet",
        "batch file": str(folder),
    }
    for what, batch in refused.items():
        with pytest.raises(ConfigError, match=what):
            batch_context("manual__b", _batch_params(deployment, batch=batch))
        with pytest.raises(ConfigError, match=what):  # an Asset event's path likewise
            event = SimpleNamespace(extra={"path": batch})
            batch_context("manual__b", _batch_params(deployment), {"asset": [event]})
    with pytest.raises(ConfigError, match="chained"):
        batch_context("manual__b", _batch_params(deployment, batch=f"{folder}::x.parquet"))
    assert http_server.seen == []
    assert not (deployment.tmp / "mlflow.db").exists()  # refused before the registry lookup


def test_item2_the_encoding_output_and_the_policy_file_are_checked(deployment):
    from sae_pipeline.steps import encoding, monitoring

    outside = deployment.tmp / "outside"
    ctx = {
        "model": {"name": "m", "version": "1"},
        "batch": {"key": "k", "files": []},
        "artifacts_root": str(deployment.allowed),
        "run_key": "r",
    }
    with pytest.raises(ConfigError, match="output"):
        encoding.prepare(ctx, str(outside / "codes"))
    assert not outside.exists()
    policy = deployment.tmp / "policy.yaml"
    policy.write_text("review: {retrain: auto}\n")
    with pytest.raises(ConfigError, match="policy_path"):
        monitoring.context("manual__p", _batch_params(deployment, policy_path=str(policy)))


# ---- item 3: secrets in URLs ------------------------------------------------------------------
def test_item3_a_password_in_the_query_is_refused_and_stored_nowhere(deployment, monkeypatch):
    from sae_pipeline.steps import training as steps

    monkeypatch.setenv("SAE_ALLOWED_DATA_SOURCES", "postgresql://host:5432")
    for source in (
        "postgresql://etl@host:5432/sales?password=hunter2",
        "postgresql://etl@host:5432/sales?sslmode=require&PASSWORD=hunter2",
        "postgresql://u:hunter2@ss@host:5432/sales",
    ):
        with pytest.raises(ConfigError, match="source_password_env") as err:
            steps.prepare(
                "manual__pw", None, {**deployment.params, "data.source": source, "data.query": "q"}
            )
        assert "hunter2" not in str(err.value)
    assert _files_holding(deployment.tmp, b"hunter2") == []  # not in config.json, not in MLflow
    with pytest.raises(ConfigError, match="tracking_uri") as err:
        steps.prepare(
            "manual__pw", None, {**deployment.params, "registry.tracking_uri": "http://u:hunter2@m"}
        )
    assert "hunter2" not in str(err.value)


def test_item3_masking_hides_the_whole_password_wherever_a_url_is_recorded():
    from sae_pipeline.data.sources import describe_source

    for url in ("postgresql://u:p@ss@db/x", "postgresql://u:p/ss@db/x"):
        for shown in (mask_credentials(url), describe_source(url)):
            assert shown == "postgresql://u:***@db/x"
    cfg = build_config({}, {"data.source": "https://h/x.csv?X-Amz-Signature=abc123&v=1"})
    assert cfg.flat_params()["data.source"] == "https://h/x.csv?X-Amz-Signature=***&v=1"


# ---- item 8: the promotion lock ---------------------------------------------------------------
@pytest.mark.parametrize("lock_dir", [True, False])
def test_item8_runs_naming_different_roots_take_the_same_promotion_lock(
    tmp_path, monkeypatch, lock_dir
):
    from sae_pipeline.registry import promotion

    if lock_dir:
        monkeypatch.setenv("SAE_LOCK_DIR", str(tmp_path / "locks"))
    else:  # the embedded default: a private folder in the temporary folder
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
    allowed = tmp_path / "allowed"
    cfgs = [
        build_config(
            {},
            {
                "artifacts_root": str(root),
                "registry.tracking_uri": _sqlite(tmp_path),
                "registry.promotion_lock_timeout_s": 0.3,
            },
        )
        for root in (allowed, allowed / "other")
    ]
    held, release = threading.Event(), threading.Event()

    def holder():
        with promotion.promotion_lock(cfgs[0], "m"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    try:
        with (
            pytest.raises(RegistryError, match="cannot promote m"),
            promotion.promotion_lock(cfgs[1], "m"),
        ):
            pass
        with promotion.promotion_lock(cfgs[1], "m2"):  # another model is not blocked
            pass
    finally:
        release.set()
        t.join()
    assert not allowed.exists()  # nothing under either run's root
    lock = promotion.lock_uri(cfgs[0], "../../m")  # a name cannot climb out of the folder
    assert storage.local_path(lock).is_relative_to(tmp_path / ("locks" if lock_dir else "tmp"))


# ---- a sibling: what the registry says about a version ----------------------------------------
def test_a_versions_recorded_root_and_run_key_pass_the_boundary_before_any_read(deployment):
    """Anyone with write access to MLflow can register a version whose run names another root
    or whose run key climbs: the consumers (encoding, drift) would read the training snapshot
    from there."""
    from mlflow import MlflowClient

    from sae_pipeline.registry import champion, tracking

    uri = deployment.params["registry.tracking_uri"]
    c = MlflowClient(uri, uri)
    exp = c.create_experiment("x", artifact_location=str(deployment.allowed / "mlruns"))
    cfg = build_config({}, deployment.params)
    name = cfg.registry.encoder_model_name
    c.create_registered_model(name)
    cases = {
        str(deployment.tmp / "outside"): ("manual__1", "outside the allowed locations"),
        str(deployment.allowed): ("../../outside", "is no run key"),
    }
    for root, (key, error) in cases.items():
        run = c.create_run(exp).info.run_id
        c.log_param(run, "artifacts_root", root)
        tags = {tracking.RUN_KEY_TAG: key, champion.MLFLOW_RUN_TAG: run}
        v = c.create_model_version(name, f"runs:/{run}/model", run_id=run, tags=tags)
        with pytest.raises(RegistryError, match=error) as err:
            champion.resolve(cfg, version=v.version)
        assert "\n" not in str(err.value)
    assert not (deployment.tmp / "outside").exists()
