import pytest

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


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_trained_among_streams_the_champions_snapshot_and_follows_its_split(tmp_path, mode):
    """The gate's common evaluation leaves out the challenger's test rows the champion fitted
    or early-stopped on, reading the champion's snapshot row group by row group."""
    import numpy as np
    import pandas as pd

    from sae_pipeline import storage
    from sae_pipeline.config import DataConfig
    from sae_pipeline.data.parts import HashSplit
    from sae_pipeline.data.snapshot import write_snapshot
    from sae_pipeline.registry.champion import ModelRef
    from sae_pipeline.registry.gate import trained_among, without_mask

    ref = ModelRef("m", "1", "r", "key", "sqlite://", str(tmp_path))
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(300, 3)).astype(np.float32), columns=list("abc"))
    cfg = DataConfig(source="x", label_column=None, snapshot_shard_rows=100)
    write_snapshot(frame, cfg, storage.join(ref.run_dir, "validate"))
    if mode == "memory":
        idx = {"train": np.arange(0, 200), "val": np.arange(200, 250), "test": np.arange(250, 300)}
        storage.write_arrays(storage.join(ref.run_dir, "split", "indices.npz"), **idx)
        held_out = np.arange(250, 300)
    else:
        split = HashSplit(3, 0.2, 0.3)
        plan = {"mode": "stream", "split": split.to_dict(), "rows": split.counts(300)}
        storage.write_json(storage.join(ref.run_dir, "split", "plan.json"), plan)
        held_out = np.flatnonzero(split.mask("test", 0, 300))
    seen = np.setdiff1d(np.arange(300), held_out)
    x = frame.to_numpy(dtype=np.float64)
    new = rng.normal(size=(4, 3))
    x_test = np.vstack([x[seen[:5]], x[held_out[:3]], new])
    trained = trained_among(ref, x_test, list("abc"))
    np.testing.assert_array_equal(trained, [True] * 5 + [False] * 7)
    kept, excluded = without_mask({"x_test": x_test, "y_test": np.arange(12)}, trained)
    assert excluded == 5 and len(kept["x_test"]) == 7


def test_the_drift_reference_of_a_streamed_run_is_a_fixed_size_seeded_sample(tmp_path):
    import numpy as np
    import pandas as pd

    from sae_pipeline import storage
    from sae_pipeline.config import DataConfig
    from sae_pipeline.data.parts import HashSplit
    from sae_pipeline.data.snapshot import write_snapshot
    from sae_pipeline.registry.champion import ModelRef, reference_rows

    ref = ModelRef("m", "1", "r", "key", "sqlite://", str(tmp_path))
    frame = pd.DataFrame({"a": np.arange(500.0), "b": np.arange(500.0) * 2})
    cfg = DataConfig(source="x", label_column=None, snapshot_shard_rows=200)
    write_snapshot(frame, cfg, storage.join(ref.run_dir, "validate"))
    split = HashSplit(0, 0.2, 0.2)
    plan = {"mode": "stream", "split": split.to_dict(), "rows": split.counts(500)}
    storage.write_json(storage.join(ref.run_dir, "split", "plan.json"), plan)
    x, heldout = reference_rows(ref, ["a", "b"], 100, seed=1)
    x2, _ = reference_rows(ref, ["a", "b"], 100, seed=1)
    assert x.shape == (100, 2)
    np.testing.assert_array_equal(x, x2)
    rows = x[:, 0].astype(int)
    np.testing.assert_array_equal(x[:, 1], rows * 2)
    np.testing.assert_array_equal(heldout, split.parts_of(rows.astype(np.uint64)) != 0)
    assert len(reference_rows(ref, ["a", "b"], None, seed=1)[0]) == 500


def test_without_probe_accuracies_the_reason_is_the_mse_alone():
    ok, reason = gate_decision({"test_mse": 0.01}, {"test_mse": 0.02}, build_config())
    assert ok and reason == "test MSE 0.010000 < 0.020000"
