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
