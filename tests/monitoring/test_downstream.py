"""The downstream signal: the plain-number probe, its judgement, and the decision it joins."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sae_pipeline.engine.evaluation import fit_probe, probe_accuracy_on
from sae_pipeline.monitoring.downstream import DownstreamPolicy, combine, judge


@pytest.mark.parametrize("n_classes", [2, 3])
def test_the_plain_probe_predicts_what_the_fitted_pipeline_predicts(n_classes):
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 2.0, (n_classes, 4))
    y = rng.integers(0, n_classes, 400)
    f = centres[y] + rng.normal(size=(400, 4)) * np.array([1.0, 5.0, 0.1, 2.0]) + 3.0
    probe = fit_probe(f[:300], y[:300], f[300:], y[300:], max_iter=1000)
    assert np.asarray(probe["coef"]).shape == (n_classes, 4)
    sk = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(f[:300], y[:300])
    # Row by row, not only on average: the documented rule gives the pipeline's labels.
    scores = f @ np.asarray(probe["coef"]).T + np.asarray(probe["intercept"])
    plain = np.asarray(probe["classes"])[scores.argmax(axis=1)]
    np.testing.assert_array_equal(plain, sk.predict(f))
    assert probe["test_accuracy"] == pytest.approx(sk.score(f[300:], y[300:]))
    assert probe_accuracy_on(probe, f, y) == pytest.approx(sk.score(f, y))
    flipped = {**probe, "coef": (-np.asarray(probe["coef"])).tolist()}  # the check can fail
    assert probe_accuracy_on(flipped, f, y) < sk.score(f, y) - 0.2


def test_a_drop_beyond_max_drop_fires_and_joins_the_decision():
    policy = DownstreamPolicy(max_drop=0.1)
    calm = judge(0.93, 0.95, 200, policy)
    assert calm["judged"] and not calm["fired"]
    dropped = judge(0.40, 0.95, 200, policy)
    assert dropped["fired"] and dropped["drop"] == pytest.approx(0.55)
    assert not judge(0.0, 0.95, 10, policy)["judged"]  # too few labelled rows

    no_drift = {"drift_detected": False, "retrain_triggered": False, "decision": "no_drift",
                "reason": "no signal drifted", "drifted_signals": []}  # fmt: skip
    assert combine(no_drift, calm, retrain=True) == no_drift
    got = combine(no_drift, dropped, retrain=True)
    assert (got["decision"], got["retrain_triggered"]) == ("retrain", True)
    assert got["drifted_signals"] == ["downstream"] and "probe accuracy 0.400" in got["reason"]
    assert combine(no_drift, dropped, retrain=False)["decision"] == "drift_alert"
