"""Who may decide a drift review, and what a decision record vouches for (issue 22 item 4).

No champion is trained here: the steps under test read only the run's context (model, batch,
policy, store) and the files they write.
"""

from __future__ import annotations

import threading

import pytest
import yaml

from sae_pipeline import storage
from sae_pipeline.registry.champion import ModelRef
from sae_pipeline.steps import _drift_decisions as decisions
from sae_pipeline.steps import monitoring, review


def _ctx(tmp_path, run_id: str, policy=None, **params) -> dict:
    """A drift run's context: ``monitoring.prepare`` over a fixed batch and champion."""
    root = str(tmp_path / "artifacts")
    ref = ModelRef("enc", "3", "mlflow-run", "champ", f"sqlite:///{tmp_path}/m.db", root)
    ctx = {
        "run_id": run_id,
        "run_key": storage.run_key(run_id),
        "artifacts_root": root,
        "tracking_uri": ref.tracking_uri,
        "scaler_model_name": "scaler",
        "model": ref.to_dict(),
        "batch": {"files": [str(tmp_path / "b.parquet")], "key": "batch-abc"},
    }
    return monitoring.prepare(ctx, policy, monitoring.policy_overrides(params))


@pytest.fixture
def deployed(tmp_path, monkeypatch):
    """The deployment's policy asks a person before retraining, and retrains when unanswered
    only after 24 hours (``$SAE_DRIFT_POLICY``)."""
    path = tmp_path / "deployment_policy.yaml"
    path.write_text(yaml.safe_dump({"review": {"retrain": "required", "drift_alert": "required"}}))
    monkeypatch.setenv("SAE_DRIFT_POLICY", str(path))
    return path


# ---- run params cannot lower the review ------------------------------------------------------
def test_a_run_param_cannot_lower_the_deployments_review(tmp_path, deployed):
    """Before: ``{"review": "auto"}`` skipped a required review."""
    ctx = _ctx(tmp_path, "manual__1", review="auto")
    policy = review._policy(ctx)  # what the review step reads from the run's context
    assert policy.required("retrain") and policy.required("drift_alert")
    # In the CLI too: `drift --retrain` under this policy neither records nor retrains.
    summary = {**_summary("manual__1"), "report_dir": "x"}
    got = review.act_here(ctx, summary, "retrain__manual__1")
    assert got["check"]["retrain_triggered"] is False and "review" in got["did_not"][0]
    assert not storage.exists(decisions.decision_uri(ctx))


def test_a_run_policy_file_cannot_lower_it_either(tmp_path, deployed):
    """A ``policy_path`` param naming a file with ``review: auto``, or a ``default: retrain``
    after a minute (auto by another name), leaves the deployment's review as it is."""
    own = tmp_path / "mine.yaml"
    own.write_text(
        yaml.safe_dump(
            {
                "retrain": False,
                "review": {"retrain": "auto", "default": "retrain", "timeout_hours": 0.01},
            }
        )
    )
    ctx = _ctx(tmp_path, "manual__2", str(own))
    policy = monitoring._policy(ctx)
    assert policy.retrain is False  # the run's other fields still apply (judging: the
    # deployment's alone, tests/steps/test_judging_authority.py)
    assert policy.review.required("retrain")
    assert (policy.review.default, policy.review.timeout_hours) == ("dismiss", 24.0)


def test_a_run_may_ask_for_more_review(tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_DRIFT_POLICY", raising=False)
    assert not monitoring._policy(_ctx(tmp_path, "manual__3")).review.required("retrain")
    ctx = _ctx(tmp_path, "manual__4", review="required")
    assert monitoring._policy(ctx).review.required("retrain")


# ---- the decision's key ----------------------------------------------------------------------
def test_the_decision_key_is_batch_version_and_the_judging_fields_only(tmp_path, monkeypatch):
    """Before: the key hashed the whole policy, so other review/experiment/timeout params made
    a dismissed batch undecided again."""
    monkeypatch.delenv("SAE_DRIFT_POLICY", raising=False)
    base = decisions.decision_uri(_ctx(tmp_path, "r1"))
    same = [
        _ctx(tmp_path, "r2", review="required"),
        _ctx(tmp_path, "r3", monitoring_experiment="elsewhere"),
        _ctx(tmp_path, "r4", retrain=False),
    ]
    timeout = tmp_path / "timeout.yaml"
    timeout.write_text(yaml.safe_dump({"review": {"timeout_hours": 1.0}}))
    same.append(_ctx(tmp_path, "r5", str(timeout)))
    assert {decisions.decision_uri(c) for c in same} == {base}
    for other in (
        _ctx(tmp_path, "r6", drift_share=0.2),
        _ctx(tmp_path, "r7", min_rows=5),
        _ctx(tmp_path, "r8", signal_thresholds={"raw": 0.9}),
    ):
        assert decisions.decision_uri(other) != base


# ---- one run acts on a batch ---------------------------------------------------------------
def _summary(run_key: str) -> dict:
    return {
        "batch_key": "batch-abc",
        "decision": "retrain",
        "reason": "drift in raw",
        "retrain_triggered": True,
        "report_dir": f"/x/{run_key}",
    }


def test_two_runs_racing_on_one_batch_act_once(tmp_path, monkeypatch):
    """Before: the decision was checked, then written, with no lock: ``drift --retrain`` and
    a DAG run could both retrain one batch."""
    monkeypatch.delenv("SAE_DRIFT_POLICY", raising=False)
    ctxs = [_ctx(tmp_path, f"run_{i}") for i in range(8)]
    held: dict[str, bool] = {}
    start = threading.Barrier(len(ctxs))
    real_exists = storage.exists

    def slow_exists(uri):  # widen the window between the check and the write
        found = real_exists(uri)
        threading.Event().wait(0.05)
        return found

    monkeypatch.setattr(storage, "exists", slow_exists)

    def act(ctx):
        start.wait()
        held[ctx["run_key"]], _ = decisions.claim(ctx, _summary(ctx["run_key"]))

    threads = [threading.Thread(target=act, args=(c,)) for c in ctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [k for k, ok in held.items() if ok]
    assert len(winners) == 1
    record = storage.read_json(decisions.decision_uri(ctxs[0]))
    assert record["run_key"] == winners[0]
    # A retry of the winner holds it still; every other run gets the earlier decision.
    winner = next(c for c in ctxs if c["run_key"] == winners[0])
    assert decisions.claim(winner, _summary("again"))[0]
    loser = next(c for c in ctxs if c["run_key"] != winners[0])
    ok, earlier = decisions.claim(loser, _summary(loser["run_key"]))
    assert not ok and earlier["already_decided_by"] == winners[0]
    assert earlier["retrain_triggered"] is False


def test_the_losing_run_records_nothing_and_queues_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_DRIFT_POLICY", raising=False)
    first, second = _ctx(tmp_path, "cli_drift__1"), _ctx(tmp_path, "scheduled__2")
    assert review.record(first, _summary("cli_drift__1"), None)["retrain_triggered"]
    got = review.record(second, _summary("scheduled__2"), None)
    assert got["already_decided_by"] == "cli_drift__1" and not got["retrain_triggered"]
    assert monitoring.training_conf(second, got) is None
    assert not storage.exists(storage.join(second["artifacts_root"], "retraining"))
    record = storage.read_json(decisions.decision_uri(first))
    assert record["run_key"] == "cli_drift__1"


# ---- review tags come from the record -------------------------------------------------------
def _recorded(tmp_path, run_id: str, choice: str, by: str) -> dict:
    """A monitor run whose check summary is stored and whose review ``record`` wrote."""
    ctx = _ctx(tmp_path, run_id)
    summary = {**_summary(ctx["run_key"]), "model_name": "enc", "model_version": "3"}
    full = {**summary, "policy": ctx["policy"]}
    storage.write_json(
        storage.join(ctx["artifacts_root"], "monitoring", "checks", ctx["run_key"], "summary.json"),
        full,
    )
    answer = {"chosen_options": [choice], "responded_by_user": {"name": by}}
    review.record(ctx, summary, {**answer, "responded_at": "2026-12-01T00:00:00+00:00"})
    return ctx


def test_review_tags_come_only_from_the_monitor_runs_record(tmp_path, monkeypatch):
    """Before: the training DAG's free-form ``review`` conf became the version's tags."""
    monkeypatch.delenv("SAE_DRIFT_POLICY", raising=False)
    ctx = _recorded(tmp_path, "scheduled__approved", "retrain", "ben")
    root = ctx["artifacts_root"]
    data = decisions.retraining_data_uri(root, ctx["run_key"])
    tags = decisions.review_tags_for(root, "scheduled__approved", data)
    assert tags == {
        "sae.review.choice": "retrain",
        "sae.review.by": "ben",
        "sae.review.at": "2026-12-01T00:00:00+00:00",
    }
    # No record for the named run, other data than the run wrote, or no monitor run: none.
    assert decisions.review_tags_for(root, "manual__forged", data) == {}
    assert decisions.review_tags_for(root, "scheduled__approved", "/srv/other.parquet") == {}
    assert decisions.review_tags_for(root, None, data) == {}


def test_a_dismissed_review_vouches_for_no_retraining(tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_DRIFT_POLICY", raising=False)
    ctx = _recorded(tmp_path, "scheduled__dismissed", "dismiss", "ana")
    data = decisions.retraining_data_uri(ctx["artifacts_root"], ctx["run_key"])
    assert decisions.review_tags_for(ctx["artifacts_root"], "scheduled__dismissed", data) == {}


def test_the_training_dag_passes_no_conf_review_to_register(monkeypatch):
    """A conf carrying ``review`` (alice approved) reaches ``register`` as nothing at all."""
    import importlib.util
    from pathlib import Path

    from sae_pipeline.steps import training

    path = Path(__file__).resolve().parents[2] / "dags" / "sae_training.py"
    spec = importlib.util.spec_from_file_location("_t_training_review", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.training_dag
    assert "review" not in dag.params and "monitor_run" in dag.params
    seen = {}

    def register(ctx, monitor_run=None, **kwargs):
        seen.update(monitor_run=monitor_run, **kwargs)
        return {}

    monkeypatch.setattr(training, "register", register)
    forged = {"review": {"sae.review.choice": "retrain", "sae.review.by": "alice"}}
    dag.get_task("register").python_callable({"run_id": "x"}, params=forged)
    assert seen == {"monitor_run": None}


def test_the_training_dags_end_is_reported_to_the_monitor_run(monkeypatch):
    """A retraining the monitor queued reports its failure (the failure callback) and its
    success (``promote``) back to the monitor run's record (issue 23 item 5)."""
    import importlib.util
    from pathlib import Path

    from sae_pipeline.steps import training

    path = Path(__file__).resolve().parents[2] / "dags" / "sae_training.py"
    spec = importlib.util.spec_from_file_location("_t_training_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reported, failed = [], []
    monkeypatch.setattr(training, "mark_failed", lambda ctx, reason: failed.append(reason))
    monkeypatch.setattr(
        training, "report_to_monitor", lambda ctx, run, ok, detail: reported.append((run, ok))
    )

    class TI:
        task_id = "validate"

        def xcom_pull(self, task_ids):
            return {"run_id": "drift__scheduled__1"}

    params = {"monitor_run": "scheduled__1"}
    context = {"ti": TI(), "params": params, "exception": ValueError("over the limit")}
    module.mark_mlflow_run_failed(context)
    assert failed and "over the limit" in failed[0]
    assert reported == [("scheduled__1", False)]
    module.mark_mlflow_run_failed({**context, "params": {}})  # not queued by a monitor run
    assert reported == [("scheduled__1", False)]

    monkeypatch.setattr(
        training, "promote", lambda ctx, reg: {"promoted": True, "reason": "better"}
    )
    promote = module.training_dag.get_task("promote").python_callable
    promote({"run_id": "drift__scheduled__1"}, {"encoder_version": "2"}, params=params)
    assert reported[-1] == ("scheduled__1", True)
