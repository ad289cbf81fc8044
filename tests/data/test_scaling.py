"""Scalers: fitted on the training part only, stored, and applied identically when encoding."""

import json

import numpy as np
import pytest

from sae_pipeline import storage
from sae_pipeline.config import build_config
from sae_pipeline.data.scaling import SCALERS, apply_scaler, fit_scaler, from_state, to_state
from sae_pipeline.data.snapshot import read_manifest, write_snapshot
from sae_pipeline.steps import training as steps
from tests.ingest_helpers import clean_frame


@pytest.mark.parametrize("kind", SCALERS)
def test_each_kind_learns_from_the_training_rows_only(kind, tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.normal(5.0, 2.0, (50, 3))
    x_train[:, 2] = 7.0  # a constant column must not give NaN
    x_other = rng.normal(-50.0, 20.0, (10, 3))
    scaler = fit_scaler(kind, x_train)
    scaled = apply_scaler(scaler, x_train)
    assert scaled.dtype == np.float32 and np.isfinite(scaled).all()
    expected = {
        "standard": lambda s: np.testing.assert_allclose(s.mean_, x_train.mean(axis=0)),
        "minmax": lambda s: np.testing.assert_allclose(s.data_min_, x_train.min(axis=0)),
        "robust": lambda s: np.testing.assert_allclose(s.center_, np.median(x_train, axis=0)),
        "none": lambda s: np.testing.assert_allclose(apply_scaler(s, x_other), x_other, rtol=1e-6),
    }
    expected[kind](scaler)
    # stored as JSON, not pickle: the rebuilt scaler transforms (and inverts) bit for bit
    again = from_state(json.loads(json.dumps(to_state(scaler))))
    assert type(again) is type(scaler)
    np.testing.assert_array_equal(apply_scaler(again, x_other), apply_scaler(scaler, x_other))
    if kind != "none":
        np.testing.assert_array_equal(
            again.inverse_transform(x_other), scaler.inverse_transform(x_other)
        )


@pytest.mark.parametrize("kind", SCALERS)
def test_the_fit_scaler_step_uses_the_train_split_and_encoding_applies_the_same(kind, tmp_path):
    from sae_pipeline.data.contract import Contract
    from sae_pipeline.engine.encoder import Encoder
    from sae_pipeline.engine.net import build_net
    from sae_pipeline.engine.trainer import encode_array

    cfg = build_config({}, {"scaler.kind": kind, "model.hidden_dims": [4, 2]})
    run_dir = str(tmp_path / "run")
    ctx = {"run_dir": run_dir, "config_uri": storage.join(run_dir, "config.json")}
    storage.write_json(ctx["config_uri"], cfg.model_dump(mode="json"))
    frame = clean_frame(n=80)
    write_snapshot(frame, cfg.data, storage.join(run_dir, "validate"))
    steps.split(ctx)
    out = steps.fit_scaler(ctx)
    assert out["kind"] == kind

    idx = storage.read_arrays(storage.join(run_dir, "split", "indices.npz"))
    x = frame[["a", "b", "c"]].to_numpy(dtype=np.float64)
    assert out["scaler"].endswith("scaler.json")
    scaler = from_state(storage.read_json(out["scaler"]))
    reference = fit_scaler(kind, x[idx["train"]])
    scaled = storage.read_arrays(out["scaled"])
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(scaled[part], apply_scaler(reference, x[idx[part]]))
    if kind != "none":  # fitted on all rows it would differ: the other parts did not leak in
        everything = apply_scaler(fit_scaler(kind, x), x[idx["train"]])
        assert not np.allclose(everything, scaled["train"])

    # the encoder bundle scales raw rows exactly as training did
    contract = Contract.from_dict(read_manifest(storage.join(run_dir, "validate"))["contract"])
    net = build_net(steps.architecture(cfg, 3), seed=0)
    codes = Encoder(contract, scaler, net).transform(frame.iloc[idx["test"]])
    np.testing.assert_allclose(codes.to_numpy(), encode_array(net, scaled["test"]), rtol=1e-6)


def test_a_broken_state_names_the_problem():
    from sae_pipeline.errors import DataError

    state = to_state(fit_scaler("minmax", np.arange(6.0).reshape(3, 2)))
    with pytest.raises(DataError, match="kind 'zscore'"):
        from_state({**state, "kind": "zscore"})
    with pytest.raises(DataError, match=r"scale has shape \(3,\), expected \(2,\)"):
        from_state({**state, "scale": [1.0, 2.0, 3.0]})
