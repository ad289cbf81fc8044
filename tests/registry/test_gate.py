from sae_pipeline.config import build_config
from sae_pipeline.steps.training import gate_decision

CHAMPION = {"test_mse": 0.020, "probe_accuracy_sae": 0.95}


def test_first_version_always_becomes_champion():
    assert gate_decision({"test_mse": 1.0}, None, build_config()) == (True, "no champion yet")


def test_better_on_both_counts_is_promoted():
    ok, reason = gate_decision(
        {"test_mse": 0.018, "probe_accuracy_sae": 0.96}, CHAMPION, build_config()
    )
    assert ok and "0.018000 < 0.020000" in reason


def test_lower_accuracy_or_higher_error_is_rejected_with_the_reason():
    ok, reason = gate_decision(
        {"test_mse": 0.018, "probe_accuracy_sae": 0.94}, CHAMPION, build_config()
    )
    assert not ok and "probe accuracy 0.9400 is below" in reason
    ok, reason = gate_decision(
        {"test_mse": 0.021, "probe_accuracy_sae": 0.96}, CHAMPION, build_config()
    )
    assert not ok and "test MSE 0.021000 is not below" in reason


def test_gate_thresholds_are_configurable():
    cfg = build_config({}, {"registry.gate.max_probe_accuracy_drop": 0.02})
    assert gate_decision({"test_mse": 0.019, "probe_accuracy_sae": 0.94}, CHAMPION, cfg)[0]
    cfg = build_config({}, {"registry.gate.min_relative_mse_improvement": 0.2})
    assert not gate_decision({"test_mse": 0.019, "probe_accuracy_sae": 0.96}, CHAMPION, cfg)[0]


def test_comparison_leaves_out_test_rows_the_champion_trained_on():
    import numpy as np
    import pandas as pd

    from sae_pipeline.registry.gate import trained_rows, without_rows

    rng = np.random.default_rng(0)
    snapshot = pd.DataFrame(rng.normal(size=(10, 3)), columns=["a", "b", "c"])
    split = {"train": np.array([0, 1, 2, 3]), "val": np.array([4, 5]), "test": np.arange(6, 10)}
    seen = trained_rows(snapshot, split, ["a", "b", "c"])
    x = snapshot.to_numpy()
    new = rng.normal(size=(3, 3))
    # The challenger's test split: two champion training rows, one champion validation row,
    # one champion test row and three new rows.
    x_test = np.vstack([x[[0, 3, 5, 8]], new])
    data = {"x_test": x_test, "y_test": np.arange(7), "x_train": x}
    kept, excluded = without_rows(data, seen)
    assert excluded == 3
    np.testing.assert_array_equal(kept["x_test"], np.vstack([x[[8]], new]))
    np.testing.assert_array_equal(kept["y_test"], [3, 4, 5, 6])
    assert kept["x_train"] is x
