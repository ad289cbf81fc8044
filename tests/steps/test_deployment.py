"""What a run may point at (allow-lists), and credentials kept out of what is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_pipeline.config import build_config, mask_credentials
from sae_pipeline.errors import ConfigError, DataError
from sae_pipeline.steps.deployment import (
    check_config_path,
    check_no_inline_password,
    check_run_locations,
)

DEPLOYMENT_ENV = (
    "SAE_ALLOWED_TRACKING_URIS", "SAE_ALLOWED_ARTIFACT_ROOTS", "SAE_ALLOWED_CONFIG_DIRS",
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in DEPLOYMENT_ENV:
        monkeypatch.delenv(name, raising=False)


def _cfg(**overrides):
    return build_config({}, overrides)


# ---- item 6: allow-lists ----------------------------------------------------------------------
def test_without_allow_lists_or_credentials_any_location_is_accepted(tmp_path):
    check_run_locations(_cfg(**{"registry.tracking_uri": "http://anywhere:5000"}))
    check_config_path(str(tmp_path / "any.yaml"))


@pytest.mark.parametrize(
    "credentials",
    [
        {"MLFLOW_TRACKING_USERNAME": "sae-worker", "MLFLOW_TRACKING_PASSWORD": "admin-secret"},
        {"MLFLOW_TRACKING_PASSWORD": "admin-secret"},
        {"MLFLOW_TRACKING_TOKEN": "admin-secret"},
        {"MLFLOW_TRACKING_USERNAME": "admin-secret"},  # a username alone still identifies
    ],
    ids=["username+password", "password", "token", "username"],
)
def test_with_credentials_in_env_only_the_configured_server_is_accepted(monkeypatch, credentials):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    check_run_locations(_cfg(**{"registry.tracking_uri": "http://mlflow:5000/"}))
    check_run_locations(_cfg())  # unset: the configured one
    with pytest.raises(ConfigError, match="not this deployment's MLflow server") as err:
        check_run_locations(_cfg(**{"registry.tracking_uri": "http://attacker.example:80"}))
    assert "admin-secret" not in str(err.value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # credentials but no server named: none allowed
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        check_run_locations(_cfg(**{"registry.tracking_uri": "http://attacker.example:80"}))


def test_the_allow_lists_bound_tracking_uri_artifacts_root_and_config_path(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_ALLOWED_TRACKING_URIS", "http://mlflow:5000,http://mlflow-2:5000")
    monkeypatch.setenv("SAE_ALLOWED_ARTIFACT_ROOTS", f"{tmp_path / 'store'},s3://bucket/sae")
    monkeypatch.setenv("SAE_ALLOWED_CONFIG_DIRS", str(tmp_path / "configs"))
    check_run_locations(
        _cfg(**{"registry.tracking_uri": "http://mlflow-2:5000",
                "artifacts_root": str(tmp_path / "store" / "team-a")})
    )  # fmt: skip
    check_run_locations(_cfg(**{"artifacts_root": "s3://bucket/sae/x"}))
    with pytest.raises(ConfigError, match="tracking_uri"):
        check_run_locations(_cfg(**{"registry.tracking_uri": "sqlite:///elsewhere.db"}))
    for root in (str(tmp_path / "store-evil"), str(tmp_path / "store/../x"), "s3://bucket/saex"):
        with pytest.raises(ConfigError, match="artifacts_root"):
            check_run_locations(_cfg(**{"artifacts_root": root}))
    check_config_path(str(tmp_path / "configs" / "a.yaml"))
    check_config_path(None)
    with pytest.raises(ConfigError, match="config_path"):
        check_config_path(str(tmp_path / "configs" / ".." / "a.yaml"))


# ---- item 7: credentials ----------------------------------------------------------------------
def test_passwords_in_urls_are_masked_in_mlflow_params():
    cfg = _cfg(**{"data.source": "postgresql://etl:S3cret@db:5432/x", "data.query": "select 1"})
    params = cfg.flat_params()
    assert params["data.source"] == "postgresql://etl:***@db:5432/x"
    assert not any("S3cret" in v for v in params.values())
    assert mask_credentials("see https://u:p@h/a.csv and s3://b/k") == (
        "see https://u:***@h/a.csv and s3://b/k"
    )


def _stored_files(root) -> list:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def _mlflow_runs(db: Path) -> list:
    """The runs in a SQLite MLflow store; none when no MLflow call ever created the file."""
    if not db.exists():
        return []
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def test_a_source_with_an_inline_password_is_refused_before_it_is_stored(store, tmp_path):
    from sae_pipeline.steps import training as steps

    with pytest.raises(ConfigError, match="source_password_env") as err:
        steps.prepare(
            "manual__pw", None,
            {**store, "data.source": "postgresql://etl:S3cret@db/x", "data.query": "select 1"},
        )  # fmt: skip
    assert "S3cret" not in str(err.value)
    # The guarded effect: no config.json (or anything) under the artifact root, no MLflow run,
    # and the password in no file at all.
    assert _stored_files(store["artifacts_root"]) == []
    assert _mlflow_runs(tmp_path / "mlflow.db") == []
    assert not [p for p in _stored_files(tmp_path) if b"S3cret" in p.read_bytes()]
    check_no_inline_password(_cfg(**{"data.source": "postgresql://etl@db/x", "data.query": "q"}))


@pytest.mark.parametrize("refused", ["tracking_uri", "artifacts_root"])
def test_a_location_outside_the_allow_lists_is_refused_before_anything_is_written(
    refused, store, tmp_path, monkeypatch
):
    """The run named a store it may not use: that store is never opened, ours not written."""
    from sae_pipeline.steps import training as steps

    allowed_db, evil_db = tmp_path / "mlflow.db", tmp_path / "evil" / "mlflow.db"
    monkeypatch.setenv("SAE_ALLOWED_TRACKING_URIS", f"sqlite:///{allowed_db}")
    monkeypatch.setenv("SAE_ALLOWED_ARTIFACT_ROOTS", store["artifacts_root"])
    evil_db.parent.mkdir()
    overrides = {
        "tracking_uri": {**store, "registry.tracking_uri": f"sqlite:///{evil_db}"},
        "artifacts_root": {**store, "artifacts_root": str(tmp_path / "evil" / "store")},
    }[refused]
    with pytest.raises(ConfigError, match=refused):
        steps.prepare("manual__where", None, overrides)
    assert _stored_files(tmp_path) == []  # neither MLflow store created, no config.json


def test_the_database_password_comes_from_the_named_environment_variable(monkeypatch):
    import sqlalchemy

    from sae_pipeline.data import sources

    seen = {}

    def create_engine(url, *args, **kwargs):
        seen["url"] = url
        raise sqlalchemy.exc.ArgumentError("stop here")

    monkeypatch.setattr(sqlalchemy, "create_engine", create_engine)
    monkeypatch.setenv("SAE_DB_PASSWORD", "from-env")
    with pytest.raises(DataError, match="stop here") as err:
        sources.read_sql("postgresql://etl@db/x", "select 1", "SAE_DB_PASSWORD")
    assert seen["url"].password == "from-env" and "from-env" not in str(err.value)
    monkeypatch.delenv("SAE_DB_PASSWORD")
    with pytest.raises(DataError, match="SAE_DB_PASSWORD"):
        sources.read_sql("postgresql://etl@db/x", "select 1", "SAE_DB_PASSWORD")
    assert sources.describe_source("https://u:pw@h/a.csv") == "https://u:***@h/a.csv"


def test_task_timeouts_default_read_the_environment_and_refuse_nonsense(monkeypatch):
    from datetime import timedelta

    from sae_pipeline.steps.deployment import task_timeout

    for name in ("SAE_TASK_TIMEOUT_MINUTES", "SAE_HEAVY_TASK_TIMEOUT_MINUTES"):
        monkeypatch.delenv(name, raising=False)
    assert (task_timeout(), task_timeout(heavy=True)) == (timedelta(hours=1), timedelta(hours=12))
    monkeypatch.setenv("SAE_TASK_TIMEOUT_MINUTES", " 2.5 ")
    monkeypatch.setenv("SAE_HEAVY_TASK_TIMEOUT_MINUTES", "90")
    assert task_timeout() == timedelta(minutes=2.5)
    assert task_timeout(heavy=True) == timedelta(minutes=90)
    monkeypatch.setenv("SAE_TASK_TIMEOUT_MINUTES", "")  # empty: the default
    assert task_timeout() == timedelta(hours=1)
    refusals = {
        "soon": "must be a number of minutes, got 'soon'",
        "0": "must be positive, got '0'",
        "-3": "must be positive, got '-3'",
    }
    for raw, why in refusals.items():
        monkeypatch.setenv("SAE_HEAVY_TASK_TIMEOUT_MINUTES", raw)
        with pytest.raises(ConfigError, match=f"^SAE_HEAVY_TASK_TIMEOUT_MINUTES {why}$"):
            task_timeout(heavy=True)
        assert task_timeout() == timedelta(hours=1)  # the other setting is not read


def test_check_run_locations_hands_on_every_location_normalised(monkeypatch, tmp_path):
    """What travels inward is the checked, normalised value: artifacts root, data source and
    contract; and with ``data`` (the default) the data locations are checked too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAE_ALLOWED_DATA_SOURCES", raising=False)
    (tmp_path / "in").mkdir()
    cfg = _cfg(**{"artifacts_root": "store/", "data.source": "in/a.parquet",
                  "data.contract": "in/contract.json"})  # fmt: skip
    out = check_run_locations(cfg)
    assert out.artifacts_root == str(tmp_path / "store")
    assert (out.data.source, out.data.contract) == (
        str(tmp_path / "in" / "a.parquet"),
        str(tmp_path / "in" / "contract.json"),
    )
    assert cfg.artifacts_root == "store/"  # a copy: the caller's config is left as it was
    monkeypatch.setenv("SAE_ALLOWED_DATA_SOURCES", str(tmp_path / "in"))
    outside = _cfg(**{"data.source": str(tmp_path / "elsewhere.parquet")})
    with pytest.raises(ConfigError, match=r"^data\.source '.*elsewhere\.parquet' is outside"):
        check_run_locations(outside)
    bad_contract = _cfg(**{"data.source": "in/a.parquet", "data.contract": "/etc/c.json"})
    with pytest.raises(ConfigError, match=r"^data\.contract '/etc/c\.json' is outside"):
        check_run_locations(bad_contract)
    assert check_run_locations(outside, data=False).data.source == outside.data.source


def test_refusals_name_the_setting_and_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_ALLOWED_CONFIG_DIRS", str(tmp_path / "configs"))
    with pytest.raises(ConfigError, match=r"^config_path '/etc/x\.yaml' is outside"):
        check_config_path("/etc/x.yaml")
    with pytest.raises(ConfigError, match="set MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN"):
        check_run_locations(_cfg(**{"registry.tracking_uri": "https://u:pw@mlflow:5000"}))
    pw = _cfg(**{"data.source": "postgresql://etl:S3cret@db/x", "data.query": "q"})
    with pytest.raises(ConfigError, match=r"^data\.source .* holds a password: .*") as err:
        check_no_inline_password(pw)
    assert "data.source_password_env" in str(err.value) and "S3cret" not in str(err.value)
