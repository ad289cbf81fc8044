"""The flagged-share signal: quiet on a clean batch, fires on a batch with injected anomalies."""

import numpy as np
import pytest

from sae_pipeline import SAEAnomalyDetector
from sae_pipeline.monitoring.drift import DriftPolicy, decide, summary_markdown
from sae_pipeline.monitoring.flagged import FLAGGED, flagged_share_result


def _rows(rng, n):
    """Rows on a 2-d plane in 8-d space, plus a little noise."""
    basis = np.random.default_rng(42).normal(size=(2, 8))
    return rng.normal(size=(n, 2)) @ basis + 0.05 * rng.normal(size=(n, 8))


@pytest.fixture(scope="module")
def detector_and_share():
    rng = np.random.default_rng(0)
    det = SAEAnomalyDetector(n_estimators=3, epochs=5, contamination=0.02, random_state=0).fit(
        _rows(rng, 2000)
    )
    return det, 0.02


def test_quiet_on_a_clean_batch(detector_and_share):
    det, share = detector_and_share
    clean = _rows(np.random.default_rng(1), 1000)
    r = flagged_share_result(det.predict(clean) == -1, share)
    assert not r["drifted"]
    assert r["observed_share"] == pytest.approx(share, abs=0.02)
    assert r["p_value"] > 1e-3


def test_fires_on_a_batch_with_injected_anomalies(detector_and_share):
    det, share = detector_and_share
    rng = np.random.default_rng(2)
    batch = _rows(rng, 1000)
    batch[:60] = rng.normal(scale=3.0, size=(60, 8))  # 6% rows off the plane
    r = flagged_share_result(det.predict(batch) == -1, share)
    assert r["drifted"] and r["p_value"] < 1e-3
    assert r["observed_share"] > 0.06


def test_one_sided_fewer_flags_than_expected_is_not_drift():
    r = flagged_share_result(np.zeros(1000, dtype=bool), 0.05)
    assert not r["drifted"] and r["p_value"] == pytest.approx(1.0)


def test_decide_and_summary_name_the_signal():
    fired = flagged_share_result(np.r_[np.ones(50), np.zeros(950)].astype(bool), 0.01)
    decision = decide({FLAGGED: fired}, 1000, DriftPolicy())
    assert decision["drifted_signals"] == [FLAGGED] and decision["decision"] == "retrain"
    assert "flagged 5.0% vs 1.0% expected" in decision["reason"]
    text = summary_markdown(
        {
            "decision": "retrain",
            "reason": decision["reason"],
            "batch_key": "b",
            "rows_valid": 1,
            "rows_in": 1,
            "rows_tested": 1,
            "model_name": "m",
            "model_version": "1",
            "signals": {FLAGGED: fired},
        }
    )
    assert "- flagged_share: flagged 5.0%" in text
