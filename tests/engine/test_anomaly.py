"""``SAEAnomalyDetector``: scikit-learn's contract, thresholds, plain-data state."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from sae_pipeline import SAEAnomalyDetector
from sae_pipeline.engine import _anomaly_ops as ops
from sae_pipeline.engine.anomaly import layer_sizes

FAST = {"n_estimators": 3, "epochs": 4, "random_state": 0}
TRAINED = {**FAST, "epochs": 12}  # enough for the members to learn the fixture's plane


@parametrize_with_checks([SAEAnomalyDetector(**FAST)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def blobs():
    """Normal rows near a 2-d plane inside 12-d space; each anomaly a normal row with 4 of its
    features taken from other rows: every value is one the normal rows have (isolation trees see
    nothing odd in any single feature), but the row is off the plane, which only a model of the
    plane can tell. An untrained detector of the same shape and IsolationForest rank them
    near 0.7; trained, near 1 (both measured in the test below)."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(2, 12))
    normal = rng.normal(size=(600, 2)) @ basis + 0.05 * rng.normal(size=(600, 12))
    odd = normal[rng.integers(0, 600, 30)].copy()
    for row in odd:
        cols = rng.choice(12, 4, replace=False)
        row[cols] = normal[rng.integers(0, 600, 4), cols]
    x = np.vstack([normal, odd])
    y = np.r_[np.zeros(600), np.ones(30)]
    return x, y


def test_scores_rank_anomalies_and_follow_isolation_forest_conventions(blobs):
    from sklearn.ensemble import IsolationForest

    from tests.baselines import untrained

    x, y = blobs
    det = SAEAnomalyDetector(**TRAINED).fit(x)
    scores = det.score_samples(x)
    auc = roc_auc_score(y, -scores)  # higher = more normal
    with untrained():  # the same detector, its members' weights left at their initial values
        shape_auc = roc_auc_score(y, -SAEAnomalyDetector(**TRAINED).fit(x).score_samples(x))
    forest_auc = roc_auc_score(y, -IsolationForest(random_state=0).fit(x).score_samples(x))
    assert auc > max(shape_auc, forest_auc) + 0.1, (auc, shape_auc, forest_auc)
    np.testing.assert_allclose(det.decision_function(x), scores - det.offset_)
    pred = det.predict(x)
    assert set(np.unique(pred)) <= {-1, 1}
    flagged_odd, flagged_normal = (pred[y == 1] == -1).mean(), (pred[y == 0] == -1).mean()
    assert flagged_odd > 0.8 and flagged_odd > 5 * flagged_normal, (flagged_odd, flagged_normal)


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
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    ints = {k for k, v in arrays.items() if v.dtype == np.int64}
    assert ints == {f"m{i}.tree_feature" for i in range(3)}  # the trees' split features
    assert all(v.dtype == np.float64 for k, v in arrays.items() if k not in ints)


@pytest.mark.parametrize(("width", "expected"), [(1, (8, 2)), (6, (12, 2)), (21, (42, 6))])
def test_layer_sizes_follow_the_width(width, expected):
    assert layer_sizes(width) == expected


def test_isolation_trees_isolate_a_far_row_sooner_than_the_sample_rows():
    rng = np.random.default_rng(0)
    sample = rng.normal(size=(256, 4))
    trees = ops.isolation_trees(sample, 20, np.random.default_rng(1))
    assert trees[0].shape == (20, 2**9 - 1)  # depth ceil(log2 256) = 8, heap-ordered
    depth = ops.isolation_depth(*trees, np.vstack([sample, [[6.0, -6.0, 6.0, 6.0]]]))
    assert depth[-1] < 4 < np.percentile(depth[:-1], 5)  # isolated at one of the first cuts
    # c(n), the mean unsuccessful-search depth of a random BST (Liu et al. 2008)
    np.testing.assert_allclose(ops.average_path_length([1, 2, 256]), [0.0, 1.0, 10.2448], atol=1e-4)


def test_isolation_weight_zero_scores_without_trees(blobs):
    x, _ = blobs
    det = SAEAnomalyDetector(**FAST, isolation_weight=0.0).fit(x)
    meta, arrays = det.to_state()
    assert not any("tree_" in k for k in arrays) and meta["isolation_weight"] == 0.0
    with_trees = SAEAnomalyDetector(**FAST).fit(x)
    assert not np.allclose(det.score_samples(x[:50]), with_trees.score_samples(x[:50]))
