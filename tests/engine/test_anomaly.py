"""``SAEAnomalyDetector``: scikit-learn's contract, thresholds, plain-data state."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from sae_pipeline import SAEAnomalyDetector
from sae_pipeline.engine.anomaly import layer_sizes

FAST = {"n_estimators": 3, "epochs": 4, "random_state": 0}


@parametrize_with_checks([SAEAnomalyDetector(**FAST)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def blobs():
    """Normal rows on a 3-d plane inside 12-d space; anomalies off it and far out."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 12))
    normal = rng.normal(size=(600, 3)) @ basis + 0.05 * rng.normal(size=(600, 12))
    odd = rng.normal(size=(30, 12)) * 2.0
    x = np.vstack([normal, odd])
    y = np.r_[np.zeros(600), np.ones(30)]
    return x, y


def test_scores_rank_anomalies_and_follow_isolation_forest_conventions(blobs):
    x, y = blobs
    det = SAEAnomalyDetector(**FAST).fit(x)
    scores = det.score_samples(x)
    assert roc_auc_score(y, -scores) > 0.95  # higher = more normal
    np.testing.assert_allclose(det.decision_function(x), scores - det.offset_)
    pred = det.predict(x)
    assert set(np.unique(pred)) <= {-1, 1}
    assert (pred[y == 1] == -1).mean() > 0.8 and (pred[y == 0] == -1).mean() < 0.05


def test_contamination_fraction_sets_the_share_flagged_on_training_rows(blobs):
    x, _ = blobs
    det = SAEAnomalyDetector(contamination=0.1, **FAST).fit(x)
    assert abs((det.predict(x) == -1).mean() - 0.1) < 0.01


def test_same_seed_same_scores_and_state_is_plain_arrays(blobs):
    x, _ = blobs
    a = SAEAnomalyDetector(**FAST).fit(x).score_samples(x[:50])
    det = SAEAnomalyDetector(**FAST).fit(x)
    np.testing.assert_array_equal(a, det.score_samples(x[:50]))
    meta, arrays = det.to_state()
    assert meta["n_members"] == 3
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in arrays.values())


@pytest.mark.parametrize(("width", "expected"), [(1, (8, 2)), (6, (12, 2)), (21, (42, 6))])
def test_layer_sizes_follow_the_width(width, expected):
    assert layer_sizes(width) == expected
