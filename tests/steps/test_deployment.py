"""What a run may point at (allow-lists), and credentials kept out of what is recorded."""

from __future__ import annotations

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


def test_with_credentials_in_env_only_the_configured_server_is_accepted(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-secret")
    check_run_locations(_cfg(**{"registry.tracking_uri": "http://mlflow:5000/"}))
    check_run_locations(_cfg())  # unset: the configured one
    with pytest.raises(ConfigError, match="not this deployment's MLflow server") as err:
        check_run_locations(_cfg(**{"registry.tracking_uri": "http://attacker.example:80"}))
    assert "admin-secret" not in str(err.value)


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


def test_a_source_with_an_inline_password_is_refused_before_it_is_stored(store):
    from sae_pipeline.steps import training as steps

    with pytest.raises(ConfigError, match="source_password_env") as err:
        steps.prepare(
            "manual__pw", None,
            {**store, "data.source": "postgresql://etl:S3cret@db/x", "data.query": "select 1"},
        )  # fmt: skip
    assert "S3cret" not in str(err.value)
    check_no_inline_password(_cfg(**{"data.source": "postgresql://etl@db/x", "data.query": "q"}))


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
