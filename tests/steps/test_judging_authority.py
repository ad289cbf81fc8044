"""Run params cannot change the deployment's judging fields (issue 22 item 4, its sibling).

Under ``$SAE_DRIFT_POLICY`` the drift shares, signals, row counts and the downstream probe
are the deployment's: a trigger's ``drift_share: 1.0`` (nothing ever drifts), a dropped
signal or ``sample_rows: 0`` is refused before anything is read, written or triggered. No
champion is trained here: the context is fixed and the steps after ``prepare`` are spied on.
"""

from __future__ import annotations

import pytest
import yaml

from sae_pipeline import cli, storage
from sae_pipeline.errors import ConfigError
from sae_pipeline.monitoring.drift import decide
from sae_pipeline.registry.champion import ModelRef
from sae_pipeline.steps import batch_context as batch_context_module
from sae_pipeline.steps import monitoring

DEPLOYED = {
    "drift_share": 0.3,
    "min_rows": 10,
    "sample_rows": 5000,
    "signals": {"raw": {"drift_share": 0.2}},
    "review": {"retrain": "auto", "drift_alert": "auto"},
}


def _batch_ctx(tmp_path, run_id: str = "manual__1") -> dict:
    root = str(tmp_path / "artifacts")
    ref = ModelRef("enc", "3", "mlflow-run", "champ", f"sqlite:///{tmp_path}/m.db", root)
    return {
        "run_id": run_id,
        "run_key": storage.run_key(run_id),
        "artifacts_root": root,
        "tracking_uri": ref.tracking_uri,
        "scaler_model_name": "scaler",
        "model": ref.to_dict(),
        "batch": {"files": [str(tmp_path / "b.parquet")], "key": "batch-abc"},
    }


@pytest.fixture
def deployed(tmp_path, monkeypatch):
    path = tmp_path / "deployment_policy.yaml"
    path.write_text(yaml.safe_dump(DEPLOYED))
    monkeypatch.setenv("SAE_DRIFT_POLICY", str(path))
    return path


@pytest.fixture
def spied(tmp_path, monkeypatch):
    """``batch_context`` returns the fixed context; every later step records that it ran."""
    ran: list[str] = []
    monkeypatch.setattr(
        batch_context_module, "batch_context", lambda run_id, *a, **k: _batch_ctx(tmp_path, run_id)
    )
    monkeypatch.setattr(
        monitoring, "batch_context", lambda run_id, *a: _batch_ctx(tmp_path, run_id)
    )
    monkeypatch.setattr(monitoring, "run_check", lambda *a, **k: ran.append("check") or {})
    monkeypatch.setattr(monitoring, "check", lambda *a, **k: ran.append("check") or {})
    monkeypatch.setattr(monitoring, "reference", lambda *a, **k: ran.append("reference") or {})
    return ran


# The trigger params (and their CLI spellings) that would loosen or change the judging.
LOOSENING = [
    ({"drift_share": 1.0}, "drift_share"),
    ({"sample_rows": 0}, "sample_rows"),
    ({"min_rows": 100000}, "min_rows"),
    ({"min_rows": 1}, "min_rows"),
    ({"signal_thresholds": {"raw": 1.0}}, "signals.raw.drift_share"),
    ({"signal_thresholds": {"codes": 1.0}}, "signals.codes.drift_share"),
]


@pytest.mark.parametrize("params, field", LOOSENING)
def test_a_trigger_cannot_change_a_judging_field(tmp_path, deployed, spied, params, field):
    """Before: the param replaced the deployment's value (e.g. drift_share 1.0: never drift)."""
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        monitoring.context("manual__1", params)
    assert "\n" not in str(err.value) and "deployment" in str(err.value)
    assert spied == [] and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize(
    "setting, field",
    [
        ("drift_share=1.0", "drift_share"),
        ("signals.codes.enabled=false", "signals.codes.enabled"),
        ("downstream.enabled=false", "downstream.enabled"),
        ("sample_rows=0", "sample_rows"),
    ],
)
def test_drift_flags_cannot_change_one_either(tmp_path, deployed, spied, capsys, setting, field):
    """`sae-pipeline drift --policy-set ...`: refused, no check run, nothing written."""
    argv = ["drift", "--batch", str(tmp_path / "b.parquet"), "--policy-set", setting, "-q"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert field in err and len(err.strip().splitlines()) == 1
    assert spied == [] and not (tmp_path / "artifacts").exists()


def test_a_run_policy_file_cannot_change_one(tmp_path, deployed, spied):
    """A ``policy_path`` (or ``--policy``) file that drops a signal is refused the same way."""
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"signals": {"raw": {"enabled": False}}, "retrain": False}))
    with pytest.raises(ConfigError, match=r"signals\.raw\.enabled"):
        monitoring.prepare(_batch_ctx(tmp_path), str(own))
    assert spied == []


def test_the_decision_uses_the_deployments_values(tmp_path, deployed, monkeypatch):
    """Before: ``drift`` without ``--policy`` judged with the built-in policy (min_rows 100,
    drift_share 0.5), not the deployment's (min_rows 10, drift_share 0.3)."""
    from sae_pipeline.steps import review

    seen = []
    monkeypatch.setattr(
        batch_context_module, "batch_context", lambda run_id, *a, **k: _batch_ctx(tmp_path, run_id)
    )
    monkeypatch.setattr(monitoring, "run_check", lambda ctx, **k: seen.append(ctx) or {})
    monkeypatch.setattr(review, "act_here", lambda ctx, summary, run: {})
    assert cli.main(["drift", "--batch", str(tmp_path / "b.parquet"), "-q"]) == 0
    policy = monitoring._policy(seen[0])
    assert (policy.min_rows, policy.drift_share, policy.sample_rows) == (10, 0.3, 5000)
    assert policy.share_threshold("raw") == 0.2 and policy.share_threshold("codes") == 0.3
    # A 50-row batch with a quarter of its raw columns drifted: judged, and drifted under the
    # deployment's 0.2 (the built-in policy: not judged, fewer rows than its min_rows 100).
    threshold = policy.share_threshold("raw")
    raw = {"drift_share": 0.25, "share_threshold": threshold, "drifted": threshold <= 0.25}
    got = decide({"raw": raw}, 50, policy)
    assert got["decision"] != "not_judged" and got["drift_detected"]


def test_a_run_may_restate_the_deployments_values_and_set_the_others(tmp_path, deployed):
    params = {"drift_share": 0.3, "min_rows": 10, "retrain": False}
    params["monitoring_experiment"] = "elsewhere"
    ctx = monitoring.prepare(_batch_ctx(tmp_path), None, monitoring.policy_overrides(params))
    policy = monitoring._policy(ctx)
    assert (policy.drift_share, policy.retrain, policy.experiment) == (0.3, False, "elsewhere")
    # The deployment's own file named as the run's (the DAG's default) changes nothing.
    same = monitoring._policy(monitoring.prepare(_batch_ctx(tmp_path), str(deployed)))
    assert same.model_dump(exclude={"retrain", "experiment"}) == policy.model_dump(
        exclude={"retrain", "experiment"}
    )


def test_without_a_deployment_policy_a_run_judges_as_today(tmp_path, monkeypatch):
    """The embedded demo has no ``$SAE_DRIFT_POLICY``: the run's params apply as given."""
    monkeypatch.delenv("SAE_DRIFT_POLICY", raising=False)
    params = {"drift_share": 1.0, "sample_rows": 0, "signal_thresholds": {"raw": 0.9}}
    ctx = monitoring.prepare(_batch_ctx(tmp_path), None, monitoring.policy_overrides(params))
    policy = monitoring._policy(ctx)
    assert (policy.drift_share, policy.sample_rows, policy.share_threshold("raw")) == (1.0, 0, 0.9)
