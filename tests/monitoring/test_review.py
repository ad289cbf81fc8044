"""The review policy, the reviewer's page and what a choice leads to (pure parts)."""

from __future__ import annotations

import pytest

from sae_pipeline.errors import ConfigError
from sae_pipeline.monitoring import review
from sae_pipeline.monitoring.drift import load_policy
from sae_pipeline.steps.monitoring import policy_overrides

SUMMARY = {
    "decision": "retrain",
    "batch_key": "batch_shifted-1613b33dec",
    "model_name": "sae-digits-encoder",
    "model_version": "1",
    "retrain_triggered": True,
    "summary": "**retrain**: drift in raw",
}


def test_review_is_auto_by_default_and_required_per_decision():
    policy = load_policy().review
    assert not policy.required("retrain") and not policy.required("drift_alert")
    assert (policy.default, policy.timeout_hours) == ("dismiss", 24.0)
    policy = load_policy(overrides={"review.retrain": "required"}).review
    assert policy.required("retrain") and not policy.required("drift_alert")
    assert not policy.required("no_drift") and not policy.required("not_judged")
    both = load_policy(overrides=policy_overrides({"review": "required"})).review
    assert both.required("retrain") and both.required("drift_alert")
    with pytest.raises(ConfigError, match=r"review.default"):
        load_policy(overrides={"review.default": "ignore"})
    with pytest.raises(ConfigError, match=r"review.timeout_hours"):
        load_policy(overrides={"review.timeout_hours": 0})


def test_the_reviewers_page_links_every_report_and_the_run():
    links = {"raw report": "file:///r/raw.html", "MLflow run": "http://mlflow/#/runs/abc"}
    body = review.review_body(SUMMARY, links)
    assert body.startswith(SUMMARY["summary"])
    assert "- [raw report](file:///r/raw.html)" in body
    assert "- [MLflow run](http://mlflow/#/runs/abc)" in body
    assert "batch_shifted-1613b33dec" in review.review_subject(SUMMARY)


@pytest.mark.parametrize(
    ("choice", "retrain"), [("retrain", True), ("accept", False), ("dismiss", False), (None, False)]
)
def test_only_retrain_triggers_retraining(choice, retrain):
    got = review.outcome(SUMMARY, choice, "ana", "2026-11-29T05:00:00+00:00")
    assert got["retrain_triggered"] is retrain
    tags = review.review_tags(got["review"])
    if choice is None:
        assert tags == {}
    else:
        assert tags == {
            "sae.review.choice": choice,
            "sae.review.by": "ana",
            "sae.review.at": "2026-11-29T05:00:00+00:00",
        }


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="'ignore' is not one of"):
        review.outcome(SUMMARY, "ignore", "ana", "now")
