"""The drift monitor's memory, and the gate after drift retraining, with a real tiny champion.

A champion is trained in this process (the training steps, tiny settings) on Gaussian blobs;
a shifted batch then drifts.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FEATURES = [f"f{i}" for i in range(6)]


def blobs(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    centres = np.random.default_rng(42).normal(0.0, 3.0, size=(3, len(FEATURES)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    frame = pd.DataFrame(centres[y] + rng.normal(size=(n, len(FEATURES))) + shift, columns=FEATURES)
    frame["target"] = y
    return frame


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sae_pipeline.steps.training import run_training

    tmp = tmp_path_factory.mktemp("drift")
    blobs(300, 0).to_parquet(tmp / "train.parquet", index=False)
    (blobs(120, 1) * 1.5 + 3.0).assign(target=1).to_parquet(tmp / "shifted.parquet", index=False)
    store = {
        "artifacts_root": str(tmp / "artifacts"),
        "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    trained = run_training(
        "manual__champion", None, {**TINY, **store, "data.source": str(tmp / "train.parquet")}
    )
    assert trained["promote"]["promoted"]
    params = {
        "artifacts_root": store["artifacts_root"],
        "tracking_uri": store["registry.tracking_uri"],
    }
    return {"tmp": tmp, "params": params, "champion": trained}


def _daily_run(world, run_id: str):
    """What the drift DAG does for one run: check, retraining data, record (the policy acts
    alone: ``review: auto``), then the retraining conf (None: skipped)."""
    from sae_pipeline.steps import monitoring, review

    params = {**world["params"], "batch": str(world["tmp"] / "shifted.parquet"), "sample_rows": 0}
    ctx = monitoring.context(run_id, params)
    summary = monitoring.prepare_data(ctx, monitoring.run_check(ctx))
    summary = review.record(ctx, summary, {})
    return ctx, summary, monitoring.training_conf(ctx, summary)


def test_the_same_batch_and_champion_are_judged_once(world):
    ctx, first, conf = _daily_run(world, "scheduled__day1")
    assert first["drift_detected"] and first["retrain_triggered"] and conf is not None
    # The next day: same latest batch, same champion (the retraining not run yet).
    _, second, again = _daily_run(world, "scheduled__day2")
    assert again is None and second["retrain_triggered"] is False
    assert second["already_decided_by"] == "scheduled__day1"
    assert second["decision"] == first["decision"]
    # A retry of the first run still gives its own decision (and its conf: the trigger is
    # keyed by the run, so it queues nothing twice).
    _, retried, conf_again = _daily_run(world, "scheduled__day1")
    assert retried["retrain_triggered"] and conf_again == conf
    world["retraining"] = (ctx, first)


def test_after_drift_retraining_the_gate_leaves_out_rows_the_champion_trained_on(world):
    """The retrained challenger is measured on exactly its test rows the champion did not fit
    or early-stop on, in its own space: recomputed here apart from the gate and compared."""
    from mlflow import MlflowClient

    from sae_pipeline.steps import monitoring
    from tests.gate_check import assert_gate_measured, run_context

    # The first day's run (again, if the test above ran it: a retry gives its own decision).
    ctx, summary, conf = _daily_run(world, "scheduled__day1")
    assert summary["retrain_triggered"] and conf is not None
    result = monitoring.retrain(ctx, summary, "drift__scheduled__day1")
    client = MlflowClient(world["params"]["tracking_uri"])
    name, version = "sae-digits-encoder", result["register"]["encoder_version"]
    champion = world["champion"]
    compared = client.get_model_version(name, version).tags["sae.gate.compared_to"]
    assert compared == champion["register"]["encoder_version"]
    challenger_ctx = run_context(world["params"]["artifacts_root"], "drift__scheduled__day1")
    assert_gate_measured(client, name, version, challenger_ctx, champion["context"])


# ---- review by a person (issue 13) ------------------------------------------------------------
def _checked(world, run_id: str, name: str, frame: pd.DataFrame):
    from sae_pipeline.steps import monitoring

    path = world["tmp"] / f"{name}.parquet"
    frame.to_parquet(path, index=False)
    params = {**world["params"], "batch": str(path), "sample_rows": 0, "review": "required"}
    ctx = monitoring.context(run_id, params)
    return params, ctx, monitoring.run_check(ctx)


def test_an_accepted_batch_is_recorded_and_joins_the_reference(world):
    import datetime as dt

    from mlflow import MlflowClient

    from sae_pipeline.steps import monitoring, review

    far = (blobs(120, 2) * 0.5 - 6.0).assign(target=0)
    params, ctx, summary = _checked(world, "review__accept", "far", far)
    assert summary["decision"] == "retrain" and summary["retrain_triggered"]
    asked = review.request(ctx, summary)
    assert asked["required"] and asked["options"] == ["retrain", "accept", "dismiss"]
    assert (asked["default"], asked["timeout_s"]) == ("dismiss", 24 * 3600)
    assert "file://" not in asked["body"] and "runs:/" not in asked["body"]
    assert f"`{summary['report_dir']}`" in asked["body"]  # named, not linked: no public URL
    assert asked["body"].startswith(f"**{summary['decision']}**")
    rows_before = monitoring.reference(ctx)["rows"]

    at = dt.datetime(2026, 11, 29, 5, 0, tzinfo=dt.UTC)
    answer = {"chosen_options": ["accept"], "responded_by_user": {"id": "ana", "name": "ana"}}
    result = review.record(ctx, summary, {**answer, "responded_at": at})
    assert result["retrain_triggered"] is False and monitoring.training_conf(ctx, result) is None
    tags = MlflowClient(world["params"]["tracking_uri"]).get_run(summary["mlflow_run_id"]).data.tags
    assert (tags["sae.review.choice"], tags["sae.review.by"]) == ("accept", "ana")
    assert tags["sae.review.at"] == at.isoformat()

    # The next run: the batch is not judged again, nobody is asked, the reference holds it.
    again_ctx = monitoring.context("review__again", params)
    again = monitoring.run_check(again_ctx)
    assert again["already_decided_by"] == "review__accept" and not again["retrain_triggered"]
    assert review.request(again_ctx, again) == {"required": False}
    assert monitoring.reference(again_ctx)["rows"] == rows_before + len(far)


def test_a_timed_out_review_takes_the_default(world):
    from sae_pipeline.steps import monitoring, review

    odd = (blobs(120, 3) * 2.0 + 8.0).assign(target=2)
    _, ctx, summary = _checked(world, "review__timeout", "odd", odd)
    timed_out = {"chosen_options": ["dismiss"], "responded_by_user": None, "responded_at": None}
    result = review.record(ctx, summary, timed_out)
    assert result["review"]["by"] == review.TIMEOUT_REVIEWER and not result["retrain_triggered"]
    assert monitoring.training_conf(ctx, result) is None


# ---- downstream quality (issue 13) ------------------------------------------------------------
def test_shuffled_labels_fire_the_downstream_signal_and_clean_labels_do_not(world):
    from sae_pipeline.steps import monitoring

    clean = blobs(300, 7)
    shuffled = clean.assign(target=np.random.default_rng(0).permutation(clean["target"].values))
    got = {}
    for name, frame in (("labelled_clean", clean), ("labelled_shuffled", shuffled)):
        path = world["tmp"] / f"{name}.parquet"
        frame.to_parquet(path, index=False)
        params = {**world["params"], "batch": str(path), "sample_rows": 0}
        got[name] = monitoring.run_check(monitoring.context(f"downstream__{name}", params))
    calm, fired = got["labelled_clean"]["downstream"], got["labelled_shuffled"]["downstream"]
    assert calm["judged"] and not calm["fired"], calm
    assert fired["fired"] and fired["drop"] > 0.3, fired
    assert "downstream" in got["labelled_shuffled"]["drifted_signals"]
    assert got["labelled_shuffled"]["decision"] == "retrain"
    assert "downstream" not in got["labelled_clean"]["drifted_signals"]


# ---- when a decision is recorded, and who may act (issues 22 and 23) ------------------------
def _ctx_for(world, run_id: str, name: str, frame: pd.DataFrame, **params):
    from sae_pipeline.steps import monitoring

    path = world["tmp"] / f"{name}.parquet"
    if not path.exists():
        frame.to_parquet(path, index=False)
    return monitoring.context(run_id, {**world["params"], "batch": str(path), **params})


def test_the_decision_is_recorded_when_acted_on_not_at_the_check(world):
    """Before: the check wrote the decision, so a review that failed for good left the batch
    "decided" with nothing done, and the next run returned "already decided"."""
    from sae_pipeline.steps import monitoring, review
    from sae_pipeline.steps._drift_decisions import decision_uri

    late = (blobs(120, 11) * 1.7 - 4.0).assign(target=1)
    ctx = _ctx_for(world, "review__lost", "late", late, sample_rows=0, review="required")
    summary = monitoring.prepare_data(ctx, monitoring.run_check(ctx))
    asked = review.request(ctx, summary)
    assert summary["decision"] == "retrain" and asked["required"]
    # The retraining data was written and checked before anyone is asked; the page says so.
    assert monitoring.storage.exists(summary["retraining_data"]["uri"])
    assert re.search(r"retraining data, checked: \d+ champion row\(s\)", asked["body"])
    assert not monitoring.storage.exists(decision_uri(ctx))  # asked, not decided
    # The review task failed for good: the next run judges the batch again and asks again.
    again = _ctx_for(world, "review__next", "late", late, sample_rows=0, review="required")
    second = monitoring.prepare_data(again, monitoring.run_check(again))
    assert "already_decided_by" not in second and review.request(again, second)["required"]
    answer = {"chosen_options": ["dismiss"], "responded_by_user": {"name": "ana"}}
    review.record(again, second, {**answer, "responded_at": "2026-12-01T06:00:00+00:00"})
    third = _ctx_for(world, "review__third", "late", late, sample_rows=0)
    assert monitoring.run_check(third)["already_decided_by"] == "review__next"


def test_drift_without_retrain_records_nothing_and_a_later_retrain_acts(world):
    """Before: ``drift`` without ``--retrain`` printed ``retrain_triggered: true`` and recorded
    the decision, so ``drift --retrain`` on the batch answered "already decided"."""
    from mlflow import MlflowClient

    from sae_pipeline.steps import monitoring, review
    from sae_pipeline.steps._drift_decisions import decision_uri

    moved = (blobs(150, 12) * 1.4 + 5.0).assign(target=0)
    ctx = _ctx_for(world, "cli_drift__look", "moved", moved, sample_rows=0)
    looked = review.act_here(ctx, monitoring.run_check(ctx), None)
    assert looked["check"]["decision"] == "retrain"
    assert looked["check"]["retrain_triggered"] is False and looked["check"]["retrain_due"]
    assert any("record" in line for line in looked["did_not"])
    assert any("--retrain" in line for line in looked["did_not"])
    assert not monitoring.storage.exists(decision_uri(ctx))

    act = _ctx_for(world, "cli_drift__act", "moved", moved, sample_rows=0)
    done = review.act_here(act, monitoring.run_check(act), "retrain__cli_drift__act")
    assert done["check"]["retrain_triggered"] and done["retraining"]["register"]
    assert any("retrained" in line for line in done["did"])
    record = monitoring.storage.read_json(decision_uri(act))
    assert record["run_key"] == "cli_drift__act"
    assert record["retraining"]["state"] == "succeeded"
    # The version's review tags are the record's (the policy acted: review: auto).
    c = MlflowClient(world["params"]["tracking_uri"])
    reg = done["retraining"]["register"]
    tags = c.get_model_version(reg["encoder_model_name"], reg["encoder_version"]).tags
    assert tags["sae.review.choice"] == "retrain"
    assert tags["sae.review.by"] == record["summary"]["review"]["by"]
    check_tags = c.get_run(done["check"]["mlflow_run_id"]).data.tags
    assert check_tags["sae.retraining.state"] == "succeeded"


def test_a_retraining_that_fails_after_approval_reports_back(world, monkeypatch):
    """Before: the monitor run showed success and the approved retraining failed silently."""
    from mlflow import MlflowClient

    from sae_pipeline.errors import DataError
    from sae_pipeline.steps import monitoring, review, training
    from sae_pipeline.steps._drift_decisions import decision_uri

    far = (blobs(120, 13) * 0.6 + 9.0).assign(target=2)
    ctx = _ctx_for(world, "review__approved", "farther", far, sample_rows=0, review="required")
    summary = monitoring.prepare_data(ctx, monitoring.run_check(ctx))
    answer = {"chosen_options": ["retrain"], "responded_by_user": {"name": "ben"}}
    result = review.record(ctx, summary, {**answer, "responded_at": "2026-12-01T07:00:00+00:00"})

    def failing(*_args, **_kwargs):
        raise DataError("1 row(s) of 60 quarantined: over the limit")

    monkeypatch.setattr(training, "run_training", failing)
    with pytest.raises(DataError):
        monitoring.retrain(ctx, result, "drift__review__approved")
    record = monitoring.storage.read_json(decision_uri(ctx))
    assert record["retraining"]["state"] == "failed"
    assert record["retraining"]["training_run"] == "drift__review__approved"
    assert "over the limit" in record["retraining"]["detail"]
    tags = MlflowClient(world["params"]["tracking_uri"]).get_run(result["mlflow_run_id"]).data.tags
    assert tags["sae.retraining.state"] == "failed"
    assert "over the limit" in tags["sae.retraining.detail"]


def test_the_reports_carry_their_title_and_the_decision_on_top(world):
    """Before: no title, and Evidently's "Dataset Drift is NOT detected" on a batch the
    decision retrained on (other signals drifted)."""
    from sae_pipeline.steps import monitoring

    ctx = _ctx_for(world, "titles__one", "shifted", None, sample_rows=0)
    summary = monitoring.run_check(ctx)
    for name in summary["drift_share"]:
        page = (monitoring.storage.local_path(summary["report_dir"]) / f"{name}.html").read_text()
        title = f"{name} drift: batch {summary['batch_key']}, {summary['model_name']} v"
        top = page.index('data-sae="decision"')
        assert title in page[: page.index("<body")]  # the tab's title
        assert title in page[page.index("<body") : top]  # and the page's heading
        assert top < page.index('<div id="root_')  # before Evidently's own verdict
        assert f"Decision: {summary['decision']}" in page[top : top + 400]
