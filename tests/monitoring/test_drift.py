"""Drift policy, decision, Evidently reports, the gate's common evaluation, the monitor DAG."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sae_pipeline.errors import ConfigError
from sae_pipeline.monitoring import drift
from sae_pipeline.monitoring.drift import DriftPolicy, decide, load_policy
from sae_pipeline.steps import monitoring

REPO = Path(__file__).resolve().parents[2]


def result(share: float, threshold: float = 0.5) -> dict:
    return {"drift_share": share, "share_threshold": threshold, "drifted": share >= threshold}


def test_policy_defaults_overrides_yaml_and_errors(tmp_path):
    policy = load_policy()
    assert policy.drift_share == 0.5 and policy.min_rows == 100 and policy.retrain
    assert all(policy.share_threshold(s) == 0.5 for s in drift.SIGNALS)
    policy = load_policy(overrides={"signals.codes.drift_share": 0.2, "min_rows": 10})
    assert policy.share_threshold("codes") == 0.2 and policy.share_threshold("raw") == 0.5
    path = tmp_path / "policy.yaml"
    path.write_text("drift_share: 0.3\nsignals:\n  raw: {enabled: false}\n")
    policy = load_policy(path)
    assert policy.drift_share == 0.3 and not policy.signal("raw").enabled
    with pytest.raises(ConfigError, match=r"invalid drift policy: drift_share: .*\(got 1.5\)"):
        load_policy(overrides={"drift_share": 1.5})
    with pytest.raises(ConfigError, match=r"signals\.pixels"):
        load_policy(overrides={"signals.pixels.drift_share": 0.1})
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "missing.yaml")


def test_dag_params_become_policy_overrides():
    overrides = monitoring.policy_overrides(
        {"drift_share": 0.4, "signal_thresholds": {"reconstruction_error": 1.0}, "min_rows": None}
    )
    assert overrides == {"drift_share": 0.4, "signals.reconstruction_error.drift_share": 1.0}
    assert load_policy(overrides=overrides).share_threshold("reconstruction_error") == 1.0


def test_decision_and_its_reason():
    policy = DriftPolicy()
    calm = {s: result(0.0) for s in drift.SIGNALS}
    d = decide(calm, rows=500, policy=policy)
    assert (d["drift_detected"], d["retrain_triggered"], d["decision"]) == (
        False,
        False,
        "no_drift",
    )
    assert "raw 0.00 < 0.50" in d["reason"]

    shifted = {**calm, "codes": result(0.75)}
    d = decide(shifted, rows=500, policy=policy)
    assert (d["drift_detected"], d["retrain_triggered"], d["decision"]) == (True, True, "retrain")
    assert d["drifted_signals"] == ["codes"] and "codes 0.75 >= 0.50" in d["reason"]

    d = decide(shifted, rows=500, policy=load_policy(overrides={"retrain": False}))
    assert (d["drift_detected"], d["retrain_triggered"]) == (True, False)
    assert d["decision"] == "drift_alert" and "retraining is off" in d["reason"]

    d = decide(shifted, rows=99, policy=policy)
    assert d["decision"] == "not_judged" and not d["retrain_triggered"]
    assert "99 valid row(s), fewer than min_rows=100" in d["reason"]


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    cols = ["a", "b", "c", "d"]
    reference = pd.DataFrame(rng.normal(size=(2000, 4)), columns=cols)
    reference["d"] = 0.0  # a constant column (a blank pixel) must not break the report
    current = pd.DataFrame(rng.normal(size=(1500, 4)), columns=cols)
    current["d"] = 0.0
    shifted = current.copy()
    shifted[["a", "b"]] += 1.5
    return reference, current, shifted


def test_evidently_report_gives_share_and_column_verdicts(frames, tmp_path):
    reference, current, shifted = frames
    policy = DriftPolicy()
    snapshot, calm = drift.run_report(current, reference, policy, "raw")
    assert calm["drift_share"] == 0.0 and not calm["drifted"] and calm["columns"] == 4
    _, moved = drift.run_report(shifted, reference, policy, "raw")
    assert moved["drift_share"] == pytest.approx(0.5) and moved["drifted"]
    assert moved["drifted_columns"] == 2
    assert {c for c, v in moved["per_column"].items() if v["drifted"]} == {"a", "b"}
    assert set(moved["top_columns"]) == {"a", "b"}
    # A stricter share threshold for this signal: the same batch is no longer "drifted".
    strict = load_policy(overrides={"signals.raw.drift_share": 0.75})
    assert not drift.run_report(shifted, reference, strict, "raw")[1]["drifted"]
    snapshot.save_html(str(tmp_path / "r.html"))
    snapshot.save_json(str(tmp_path / "r.json"))
    assert (tmp_path / "r.html").stat().st_size > 10_000
    assert "DriftedColumnsCount" in (tmp_path / "r.json").read_text()


def test_summary_reads_first_what_a_reviewer_needs():
    summary = {
        "decision": "retrain",
        "reason": "drift in codes (drift share: codes 0.75 >= 0.50)",
        "batch_key": "b-123",
        "rows_valid": 498,
        "rows_in": 500,
        "rows_tested": 498,
        "model_name": "enc",
        "model_version": "4",
        "signals": {"codes": {**result(0.75), "drifted_columns": 3, "columns": 4,
                              "top_columns": ["code_1"]}},
        "mean_reconstruction_error": {"current": 0.5, "reference": 0.1},
    }  # fmt: skip
    text = drift.summary_markdown(summary)
    lines = text.splitlines()
    assert lines[0] == "**retrain**: drift in codes (drift share: codes 0.75 >= 0.50)"
    assert "batch: `b-123` (498 valid of 500 rows; 498 tested)" in text
    assert "model: enc v4" in text
    assert "codes: drift share 0.75 (3/4 columns, threshold 0.50); most drifted: code_1" in text


def _by_hand(net, fit_ours: np.ndarray, fit_theirs: np.ndarray, data: dict) -> dict:
    """The champion (``net`` behind a min-max scaler fitted on ``fit_theirs``) measured without
    the gate's code: its MSE in the challenger's space (min-max on ``fit_ours``) and in its own,
    and its probe accuracy on its own codes."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def minmax(fit, v):
        return (v - fit.min(0)) / (fit.max(0) - fit.min(0))

    def forward(v):
        with torch.no_grad():
            recon, codes = net(torch.tensor(v, dtype=torch.float32))[:2]
        return recon.numpy().astype(np.float64), codes.numpy()

    x_test = data["x_test"]
    recon_scaled, codes_test = forward(minmax(fit_theirs, x_test))
    recon_raw = recon_scaled * (fit_theirs.max(0) - fit_theirs.min(0)) + fit_theirs.min(0)
    _, codes_train = forward(minmax(fit_theirs, data["x_train"]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200))
    probe.fit(codes_train, data["y_train"])
    return {
        "mse_in_ours": float(
            np.mean((minmax(fit_ours, recon_raw) - minmax(fit_ours, x_test)) ** 2)
        ),
        "mse_in_theirs": float(np.mean((recon_scaled - minmax(fit_theirs, x_test)) ** 2)),
        "probe": float(probe.score(codes_test, data["y_test"])),
    }


def test_common_evaluation_measures_both_models_in_the_challengers_space():
    from sae_pipeline.data.contract import Contract
    from sae_pipeline.data.scaling import fit_scaler
    from sae_pipeline.engine.encoder import Encoder
    from sae_pipeline.engine.net import Architecture, build_net
    from sae_pipeline.registry import gate as comparison

    rng = np.random.default_rng(0)
    features = ["p", "q", "r"]
    contract = Contract(features, dict.fromkeys(features, "float64"))
    x = rng.normal(size=(300, 3)) * 4 + 10
    data = {"x_train": x[:200], "x_test": x[200:], "y_train": (x[:200, 0] > 10).astype(int),
            "y_test": (x[200:, 0] > 10).astype(int)}  # fmt: skip
    net = build_net(Architecture(3, [2]), seed=0)
    ours = Encoder(contract, fit_scaler("minmax", x[:200]), net)
    # The same network behind another scaler: a different model, compared in our space.
    theirs = Encoder(contract, fit_scaler("minmax", x[:200] * 2), net)
    mine, other, basis = comparison.on_test_split(ours, theirs, data, probe_max_iter=200)
    assert basis == "both measured on 100 of the challenger's test rows"
    assert mine == comparison.measure(ours, data, ours.scaler, 200)
    # The same numbers computed here by hand: min-max by its definition, the network's forward.
    expected = _by_hand(net, x[:200], x[:200] * 2, data)
    assert other["test_mse"] == pytest.approx(expected["mse_in_ours"], rel=1e-4)
    assert other["test_mse"] != pytest.approx(expected["mse_in_theirs"], rel=1e-2)
    assert other["probe_accuracy_sae"] == pytest.approx(expected["probe"], abs=1e-9)
    same = comparison.measure(ours, data, fit_scaler("minmax", x[:200]), 200)
    assert same["test_mse"] == pytest.approx(mine["test_mse"], rel=1e-5)  # scaler round trip
    stranger = Encoder(Contract(["p", "q", "s"], {}), ours.scaler, net)
    assert comparison.on_test_split(ours, stranger, data) is None


def test_drift_monitor_dag_wiring():
    spec = importlib.util.spec_from_file_location("_t_drift", REPO / "dags/sae_drift_monitor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.drift_dag
    order = [
        "prepare", "reference", "check", "retraining_data", "review_request", "review",
        "record_review", "retraining_conf", "trigger_retraining",
    ]  # fmt: skip
    assert set(dag.task_ids) == set(order)
    review = dag.get_task("review")
    assert type(review).__mro__[1].__name__ == "HITLOperator"
    assert review.options == ["retrain", "accept", "dismiss"]
    assert dag.params["review"] is None  # the policy's, `auto` by default
    for up, down in itertools.pairwise(order):
        assert down in dag.get_task(up).downstream_task_ids, (up, down)
    trigger = dag.get_task("trigger_retraining")
    assert trigger.trigger_dag_id == "sae_training"
    assert trigger.trigger_run_id == "drift__{{ run_id }}"
    assert trigger.skip_when_already_exists
    # Scheduled and started by new batches.
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    assert "sae://batches/new" in str(dag.timetable.asset_condition)


def test_the_shipped_policy_file_spells_out_the_defaults():
    assert load_policy(REPO / "configs" / "drift_policy.yaml") == DriftPolicy()


# ---- data safety (issue 14) -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ks", "mannw", "wasserstein"])
def test_most_drifted_columns_come_first_whatever_the_test(frames, method):
    reference, current, _ = frames
    moved = current.copy()
    moved["a"] += 2.0  # a: far
    moved["b"] += 0.4  # b: near
    policy = load_policy(overrides={"signals.raw.method": method} if method else None)
    _, got = drift.run_report(moved, reference, policy, "raw")
    assert got["top_columns"] == ["a", "b"], got["per_column"]


def test_top_columns_order_by_the_tests_kind():
    def col(score: float, method: str) -> dict:
        return {"score": score, "method": method, "threshold": 0.05, "drifted": True}

    p_values = {"a": col(1e-9, "ks"), "b": col(1e-3, "ks"), "c": col(1e-20, "ks")}
    assert drift.top_columns(p_values) == ["c", "a", "b"]
    named = {"a": col(1e-9, "Mann-Whitney U-rank test"), "b": col(1e-3, "Mann-Whitney U-rank test")}
    assert drift.top_columns(named) == ["a", "b"]
    distances = {"a": col(0.2, "wasserstein"), "b": col(0.9, "Wasserstein distance (normed)")}
    assert drift.top_columns(distances) == ["b", "a"]


def test_decision_edges_exactly_min_rows_and_two_drifted_signals():
    policy = DriftPolicy()
    two = {s: result(0.0) for s in drift.SIGNALS} | {"raw": result(0.6), "codes": result(0.9)}
    d = decide(two, rows=policy.min_rows, policy=policy)  # exactly min_rows: judged
    assert d["decision"] == "retrain" and d["drifted_signals"] == ["raw", "codes"]
    assert d["reason"].startswith("drift in raw, codes (drift share: raw 0.60 >= 0.50, ")
    alert = decide(two, rows=policy.min_rows, policy=load_policy(overrides={"retrain": False}))
    assert alert["drifted_signals"] == ["raw", "codes"]
    assert decide(two, rows=policy.min_rows - 1, policy=policy)["drifted_signals"] == []
