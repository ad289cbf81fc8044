"""The registered models: pickle-free files whose runtime reproduces the trained encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sae_pipeline.registry import bundle
from sae_pipeline.registry._model_code import sae_model_runtime as runtime
from tests.registry.conftest import make_encoder

ARCHS = {
    "plain": {},
    "batch_norm": {"batch_norm": True},
    "tied_tanh": {"tied_weights": True, "activation": "tanh", "output_activation": "linear"},
    "three_layers_leaky": {"hidden_dims": [24, 12, 5], "activation": "leaky_relu", "dropout": 0.2},
}


@pytest.mark.parametrize("kind", ["minmax", "standard", "robust", "none"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_runtime_gives_the_engine_encoders_outputs(digits, tmp_path, kind, arch):
    encoder = make_encoder(digits, kind=kind, **ARCHS[arch])
    files = bundle.write_encoder_bundle(encoder, tmp_path)
    served = runtime.EncoderBundle.load(files["config"], files["weights"])
    frame = digits.drop(columns="target").sample(300, random_state=0)
    want = encoder.transform(frame, "all")
    got = served.predict(frame, {"output": "all"})
    assert list(got.columns) == list(want.columns) and got.index.equals(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-5, atol=1e-6)
    # the scaler is bit-equal to scikit-learn's; the engine rebuilds the same Encoder
    x = frame.to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(served.scaler.transform(x), encoder.scaler.transform(x))
    again = bundle.encoder_from_files(files["config"], files["weights"])
    np.testing.assert_array_equal(again.transform(frame, "all"), want)


def test_output_param_selects_columns_as_before(digits, tmp_path):
    encoder = make_encoder(digits)
    files = bundle.write_encoder_bundle(encoder, tmp_path)
    served = runtime.EncoderBundle.load(files["config"], files["weights"])
    frame = digits.drop(columns="target").head(7)
    assert list(served.predict(frame).columns) == encoder.code_columns
    assert list(served.predict(frame, {"output": "reconstruction_error"}).columns) == [
        "reconstruction_error"
    ]
    assert served.outputs == ("codes", "reconstruction_error", "all")


def test_the_bundle_files_are_plain_data(digits, tmp_path):
    files = bundle.write_encoder_bundle(make_encoder(digits), tmp_path)
    config = json.loads(Path(files["config"]).read_text())
    assert {"format", "arch", "contract", "scaler", "default_output"} <= set(config)
    assert config["contract"]["feature_columns"][:2] == ["pixel_0", "pixel_1"]
    with np.load(files["weights"], allow_pickle=False) as z:  # would raise on object arrays
        assert "encoders.0.weight" in z.files


def test_optional_anomaly_and_probe_sections_add_outputs(digits, tmp_path):
    encoder = make_encoder(digits)
    probe = {"classes": [0, 1, 2], "coef": np.eye(3, 4).tolist(), "intercept": [0.0, 0.1, 0.2]}
    anomaly = {"center": 0.01, "scale": 0.02, "threshold": 3.0}
    files = bundle.write_encoder_bundle(encoder, tmp_path, anomaly=anomaly, probe=probe)
    served = runtime.EncoderBundle.load(files["config"], files["weights"])
    frame = digits.drop(columns="target").head(50)
    out = served.predict(frame, {"output": "all"})
    err = encoder.transform(frame, "reconstruction_error")["reconstruction_error"].to_numpy()
    score = (err.astype(np.float64) - 0.01) / 0.02
    np.testing.assert_allclose(out["anomaly_score"], score, rtol=1e-5)
    np.testing.assert_array_equal(out["is_anomaly"], score > 3.0)
    codes = encoder.transform(frame)[encoder.code_columns].to_numpy()
    np.testing.assert_array_equal(out["probe_label"], (codes[:, :3] + [0, 0.1, 0.2]).argmax(1))
    assert list(served.predict(frame, {"output": "anomaly"}).columns) == [
        "anomaly_score",
        "is_anomaly",
    ]


def test_a_fitted_detector_travels_as_plain_arrays_and_scores_the_same(digits, tmp_path):
    import dataclasses

    from sae_pipeline import SAEAnomalyDetector

    frame = digits.drop(columns="target")
    det = SAEAnomalyDetector(n_estimators=2, epochs=3, random_state=0).fit(frame.to_numpy())
    encoder = dataclasses.replace(make_encoder(digits), anomaly=det.to_state())
    files = bundle.write_encoder_bundle(encoder, tmp_path)
    assert json.loads(Path(files["config"]).read_text())["anomaly"]["kind"] == "sae-ensemble/2"
    with np.load(files["anomaly"], allow_pickle=False) as z:
        assert {"m0.w0", "m0.tree_feature"} <= set(z.files)
    served = runtime.EncoderBundle.load(files["config"], files["weights"], files["anomaly"])
    out = served.predict(frame.head(80), {"output": "anomaly"})
    want = -det.score_samples(frame.head(80).to_numpy())
    np.testing.assert_allclose(out["anomaly_score"], want, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(out["is_anomaly"], want > -det.offset_)
    engine = bundle.encoder_from_files(files["config"], files["weights"])
    np.testing.assert_allclose(engine.transform(frame.head(80), "anomaly")["anomaly_score"], want)


def test_a_bundle_of_the_first_detector_kind_still_scores(digits):
    """Versions registered before isolation trees (kind /1: error and code density only)."""
    from sae_pipeline import SAEAnomalyDetector

    x = digits.drop(columns="target").to_numpy()
    det = SAEAnomalyDetector(n_estimators=2, epochs=3, isolation_weight=0.0, random_state=0)
    meta, arrays = det.fit(x).to_state()
    meta = {k: v for k, v in meta.items() if k != "isolation_weight"} | {"kind": "sae-ensemble/1"}
    arrays["norms"] = arrays["norms"][:, :2]  # (members, 2 views, 2)
    got = runtime.detector_outlyingness(meta, arrays, x[:80])
    np.testing.assert_allclose(got, -det.score_samples(x[:80]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("frame", "params", "message"),
    [
        (pd.DataFrame({"pixel_0": [1.0]}), None, "input lacks 63 feature column(s): pixel_1"),
        ("abc", None, "non-numeric value(s) in feature column(s): pixel_0 (row 0: 'abc')"),
        (np.nan, None, "missing or infinite value(s) in feature column(s): pixel_0"),
        ("rows0", None, "input has no rows"),
        (0.0, {"output": "bogus"}, "params.output must be one of codes, reconstruction_error"),
    ],
)
def test_bad_requests_raise_a_400_error_naming_the_problem(
    digits, tmp_path, frame, params, message
):
    from mlflow.exceptions import MlflowException

    files = bundle.write_encoder_bundle(make_encoder(digits), tmp_path)
    served = runtime.EncoderBundle.load(files["config"], files["weights"])
    good = digits.drop(columns="target").head(2).reset_index(drop=True).astype(object)
    if isinstance(frame, str) and frame == "rows0":
        frame = good.iloc[:0]
    elif not isinstance(frame, pd.DataFrame):
        good.loc[0, "pixel_0"] = frame
        frame = good
    with pytest.raises(MlflowException) as err:
        served.predict(frame, params)
    assert message in err.value.message
    assert err.value.get_http_status_code() == 400


def test_requirements_are_public_pins_only():
    reqs = bundle.requirements()
    assert [r.split("==")[0] for r in reqs] == ["mlflow", "torch", "numpy", "pandas"]
    assert not any("+" in r or "sae" in r for r in reqs)


def _served(digits, tmp_path, **arch):
    files = bundle.write_encoder_bundle(make_encoder(digits, **arch), tmp_path)
    return runtime.EncoderBundle.load(files["config"], files["weights"])


def _message(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return err.value.message


def test_a_value_that_overflows_float32_is_refused_naming_its_column(digits, tmp_path):
    """1e39 is a finite float64; cast to the network's float32 it would be inf, and the codes
    Infinity/NaN in a 200. Checked after scaling and the cast: a 400 naming the column."""
    served = _served(digits, tmp_path, kind="none")
    frame = digits.drop(columns="target").head(3).copy()
    frame.loc[frame.index[1], "pixel_5"] = 1e39
    message = _message(lambda: served.predict(frame, {"output": "all"}))
    assert (
        message
        == "value(s) out of range after scaling in feature column(s): pixel_5 (first at row 1)"
    )
    ok = served.predict(frame.drop(index=frame.index[1]), {"output": "all"})
    assert np.isfinite(ok.to_numpy(float)).all()


def test_arrays_and_unnamed_frames_of_the_right_width_are_the_feature_columns(digits, tmp_path):
    served = _served(digits, tmp_path)
    frame = digits.drop(columns="target").head(5)
    want = served.predict(frame).to_numpy()
    x = frame.to_numpy()
    for data in (x, pd.DataFrame(x), x.tolist()):
        np.testing.assert_array_equal(served.predict(data).to_numpy(), want)
    for wrong in (x[:, :3], pd.DataFrame(x[:, :3])):
        message = _message(lambda w=wrong: served.predict(w))
        assert message.startswith("input has 3 unnamed column(s); expected 64 feature columns: ")
        assert "pixel_0, pixel_1" in message and "and 54 more" in message


def test_a_non_string_output_param_is_named_by_its_type_only(digits, tmp_path):
    served = _served(digits, tmp_path)
    frame = digits.drop(columns="target").head(2)
    for value, kind in (([1, 2, 3], "list"), ({"rows": [[9.5]]}, "dict")):
        message = _message(lambda v=value: served.predict(frame, {"output": v}))
        assert message == f"params.output must be a string, got {kind}"


def test_the_input_schema_keeps_the_training_datas_integer_columns_long():
    from sae_pipeline.data.contract import Contract

    contract = Contract(["a", "b", "c"], {"a": "int64", "b": "float64", "c": "uint8"}, None)
    assert bundle.input_types(contract) == {"a": "long", "b": "double", "c": "long"}
    signature = bundle._signature(bundle.input_types(contract), ["code_0"], "output", "codes")
    assert [(s.name, s.type.name, s.required) for s in signature.inputs.inputs] == [
        ("a", "long", True), ("b", "double", True), ("c", "long", True)
    ]  # fmt: skip


def test_the_example_logged_with_the_model_sets_the_types_it_is_checked_against():
    """MLflow refuses to log a model whose input example does not match its signature: the
    training rows handed to registration decide (a contract that says int64 for a column the
    rows hold as float64 would otherwise fail the registration)."""
    from sae_pipeline.data.contract import Contract

    contract = Contract(["a", "b"], {"a": "int64", "b": "int64"}, None)
    example = pd.DataFrame({"a": [1, 2], "b": [0.5, 1.0]})
    assert bundle.input_types(contract, example) == {"a": "long", "b": "double"}
