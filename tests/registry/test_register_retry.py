"""A retried ``register`` never registers a second version of a run (issue 24's soak).

``register_encoder`` looks for the version an earlier try of the same run registered before it
registers one. When that lookup fails (the MLflow server unreachable past the client's retries,
as in the soak's outage), the step must fail and be retried, not take "not found" for an answer
and register the same run again.
"""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from sae_pipeline.config import build_config
from sae_pipeline.registry import tracking
from tests.registry.conftest import make_encoder


def test_a_failed_lookup_fails_the_retry_instead_of_registering_the_run_twice(
    tmp_path, digits, monkeypatch
):
    cfg = build_config(
        {},
        {
            "artifacts_root": str(tmp_path / "artifacts"),
            "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    )
    encoder = make_encoder(digits)
    example = digits.drop(columns="target").head(20)
    run = tracking.find_or_create_run(cfg, "run-a", {})
    first = tracking.register_encoder(cfg, run, "run-a", encoder, example, {})
    assert first == {"encoder": "1", "scaler": "1"}

    def unreachable(self, *args, **kwargs):
        raise mlflow.exceptions.MlflowException("API request failed: Max retries exceeded")

    with monkeypatch.context() as m:  # the retry's lookup cannot reach the server
        m.setattr(MlflowClient, "search_model_versions", unreachable)
        with pytest.raises(mlflow.exceptions.MlflowException, match="Max retries"):
            tracking.register_encoder(cfg, run, "run-a", encoder, example, {})
    c = MlflowClient(tracking.tracking_uri(cfg))
    for name in (cfg.registry.encoder_model_name, cfg.registry.scaler_model_name):
        versions = c.search_model_versions(f"name = '{name}'")
        assert [str(v.version) for v in versions] == ["1"], name  # nothing registered twice
    # The next try, with the server back, finds what the first one registered.
    assert tracking.register_encoder(cfg, run, "run-a", encoder, example, {}) == first


def test_a_model_never_registered_is_not_found(tmp_path):
    cfg = build_config({}, {"registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    c = MlflowClient(tracking.tracking_uri(cfg))
    assert tracking.find_version(c, "no-such-model", "run-a") is None
