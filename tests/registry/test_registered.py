"""Registered versions: pickle-free files, public requirements, MLflow's scoring app answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def no_pickle(monkeypatch, registered):
    """MLflow refuses to unpickle anything: a cloudpickled pyfunc would fail to load."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    return registered


def _model_dir(uri: str, tmp_path) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))


def test_the_champion_loads_with_pickle_disabled_and_gives_the_encoders_codes(no_pickle, tmp_path):
    import mlflow.pyfunc

    reg = no_pickle
    model = mlflow.pyfunc.load_model(f"models:/{reg['encoder_name']}@champion")
    frame = reg["frame"]
    want = reg["encoder"].transform(frame, "all")
    np.testing.assert_allclose(
        model.predict(frame, params={"output": "all"}).to_numpy(), want, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(model.predict(frame).to_numpy(), want[reg["encoder"].code_columns])
    local = _model_dir(f"models:/{reg['encoder_name']}@champion", tmp_path)
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "encoder_model.py", "code/sae_model_runtime.py"} <= files
    assert {"artifacts/encoder.json", "artifacts/weights.npz", "requirements.txt"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".joblib", ".pt", ".pickle"))]


def test_requirements_name_public_packages_only(no_pickle, tmp_path):
    local = _model_dir(f"models:/{no_pickle['encoder_name']}@champion", tmp_path)
    reqs = (local / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in reqs] == ["mlflow", "torch", "numpy", "pandas"]
    assert not (local / "uv.lock").exists() and not (local / "pyproject.toml").exists()


def test_the_scaler_model_is_bit_equal_to_sklearn(no_pickle):
    import mlflow.pyfunc

    reg = no_pickle
    scaler = mlflow.pyfunc.load_model(f"models:/{reg['scaler_name']}@champion")
    x = reg["frame"].to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(scaler.predict(reg["frame"]), reg["encoder"].scaler.transform(x))
    back = scaler.predict(reg["frame"], params={"direction": "inverse"})
    np.testing.assert_array_equal(back, reg["encoder"].scaler.inverse_transform(x))


def test_load_encoder_rebuilds_the_engine_encoder_of_each_version(no_pickle):
    from sae_pipeline.registry import champion

    reg = no_pickle
    cfg = reg["cfg"]
    for version, encoder in reg["encoders"].items():
        ref = champion.resolve(cfg, version=version)
        loaded = champion.load_encoder(ref)
        assert loaded.contract == encoder.contract
        np.testing.assert_array_equal(
            loaded.transform(reg["frame"]), encoder.transform(reg["frame"])
        )
    assert champion.resolve(cfg).version == "2"


def test_a_legacy_pickled_version_is_refused_with_the_migrate_command(
    no_pickle, monkeypatch, tmp_path
):
    import mlflow
    import mlflow.pyfunc

    from sae_pipeline.errors import RegistryError
    from sae_pipeline.registry import bundle

    class Legacy(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    # Its own experiment with its artifacts under tmp_path: the store's default experiment
    # keeps them in ./mlruns of whatever folder the tests run from.
    exp = mlflow.create_experiment("legacy", artifact_location=(tmp_path / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(name="legacy", python_model=Legacy(), pip_requirements=[])
    with pytest.raises(RegistryError, match="sae-pipeline registry migrate --version"):
        bundle.load_encoder(info.model_uri, no_pickle["uri"])


@pytest.mark.parametrize("server", ["mlflow", "sae-pipeline serve"])
def test_the_scoring_apps_answer_bad_requests_with_400_naming_the_problem(no_pickle, server):
    """MLflow's scoring app checks the input schema first (its message names the column, with
    a summary of the data); the app of ``sae-pipeline serve`` answers with one line only."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import load_model
    from mlflow.pyfunc.scoring_server import init

    from sae_pipeline.registry.serving import create_app

    reg = no_pickle
    model = load_model(f"models:/{reg['encoder_name']}@champion")
    app = TestClient(init(model) if server == "mlflow" else create_app(model))
    cols = list(reg["frame"].columns)
    row = reg["frame"].iloc[0].tolist()
    ok = app.post("/invocations", json={"dataframe_split": {"columns": cols, "data": [row]}})
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(
        ok.json()["predictions"][0]["code_0"],
        reg["encoder"].transform(reg["frame"].head(1))["code_0"].iloc[0],
        rtol=1e-5,
    )
    bad = {
        "missing column": (
            {"columns": cols[1:], "data": [row[1:]]},
            "Model is missing inputs ['pixel_0']",
            "input lacks 1 feature column(s): pixel_0",
        ),
        "non-numeric": (
            {"columns": cols, "data": [["x", *row[1:]]]},
            "pixel_0",
            "non-numeric value(s) in feature column(s): pixel_0 (row 0: 'x')",
        ),
        "no rows": ({"columns": cols, "data": []}, "input has no rows", "input has no rows"),
    }
    for name, (split, mlflows, ours) in bad.items():
        r = app.post("/invocations", json={"dataframe_split": split})
        body = r.json()
        assert r.status_code == 400, (name, body)
        assert "stack_trace" not in body, (name, body)
        if server == "mlflow":
            assert mlflows in body["message"], (name, body)
        else:
            assert body["message"] == ours, (name, body)


def test_the_service_path_and_batch_encoding_give_the_same_codes(no_pickle, tmp_path):
    """A held-out batch encoded through the registered pyfunc (what ``mlflow models serve``
    loads) and through batch encoding (the version's bundle, streamed in chunks): the same
    codes. bench/bench_scale.py checks the same on the model it trains on 16M rows."""
    import mlflow.pyfunc
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sae_pipeline.data import batches
    from sae_pipeline.engine import batch_encoding
    from sae_pipeline.registry.champion import _load

    reg = no_pickle
    uri = f"models:/{reg['encoder_name']}@champion"
    held_out = reg["frame"].sample(300, random_state=7).reset_index(drop=True)
    served = mlflow.pyfunc.load_model(uri).predict(held_out)
    pq.write_table(pa.Table.from_pandas(held_out), tmp_path / "b.parquet", row_group_size=64)
    encoder = _load(reg["uri"], uri)
    parts = []
    for shard in batch_encoding.plan(batches.list_files(str(tmp_path / "b.parquet")), 128):
        out = batch_encoding.encode_shard(
            encoder, shard, str(tmp_path / f"o{shard['index']}.parquet"),
            str(tmp_path / f"q{shard['index']}.parquet"), chunk_rows=50,
        )  # fmt: skip
        parts.append(pq.read_table(out["part"]).to_pandas())
    batch = pd.concat(parts, ignore_index=True)[encoder.code_columns]
    np.testing.assert_array_equal(batch.to_numpy(), served.to_numpy())  # bit for bit


def test_the_models_declare_their_inputs_and_name_them_to_unnamed_arrays(no_pickle, recwarn):
    """The signature names the feature columns (doubles): tools that read it see them, and
    MLflow refuses an array without column names naming the columns it expects."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import validate_serving_input

    reg = no_pickle
    features = list(reg["frame"].columns)
    uri = f"models:/{reg['encoder_name']}@champion"
    model = mlflow.pyfunc.load_model(uri)
    assert not [w for w in recwarn if "Add type hints" in str(w.message)]
    for name in (reg["encoder_name"], reg["scaler_name"]):
        schema = mlflow.pyfunc.load_model(f"models:/{name}@champion").metadata.get_input_schema()
        assert schema.input_names() == features
        assert {t.name for t in schema.input_types()} == {"double"}
    x = reg["frame"].head(4).to_numpy()
    for unnamed in (x, pd.DataFrame(x)):  # MLflow's check names the expected columns
        with pytest.raises(Exception, match=r"Model is missing inputs \['pixel_0', 'pixel_1',"):
            model.predict(unnamed)
    body = json.dumps({"dataframe_split": reg["frame"].head(2).to_dict(orient="split")})
    assert len(validate_serving_input(uri, body)) == 2


def test_a_model_trained_on_integer_columns_takes_the_same_integers(digits, tmp_path):
    """Integer features (counts, a CSV of whole numbers): declared long, the model registers
    (MLflow checks the example against the signature) and in-process predict takes int64."""
    import mlflow.pyfunc

    from sae_pipeline.config import build_config
    from sae_pipeline.registry import tracking
    from tests.registry.conftest import make_encoder

    ints = digits.astype("int64")
    cfg = build_config({}, {"artifacts_root": str(tmp_path / "a"),
                            "registry.tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"})  # fmt: skip
    encoder = make_encoder(ints)
    features = ints.drop(columns="target")
    run = tracking.find_or_create_run(cfg, "ints", {})
    versions = tracking.register_encoder(cfg, run, "ints", encoder, features.head(20), {})
    uri = f"models:/{cfg.registry.encoder_model_name}/{versions['encoder']}"
    model = mlflow.pyfunc.load_model(uri)
    schema = model.metadata.get_input_schema()
    assert {t.name for t in schema.input_types()} == {"long"}
    np.testing.assert_allclose(
        model.predict(features.head(30)).to_numpy(),
        encoder.transform(features.head(30)).to_numpy(),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_load_encoder_reads_the_registry_it_is_given_never_mlflows_default(
    registered, tmp_path, monkeypatch
):
    """Before: ``bundle.load_encoder(uri)`` read MLflow's process-wide registry, which with
    nothing set is the silent default ``sqlite:///mlflow.db`` in the working folder."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from sae_pipeline.errors import RegistryError
    from sae_pipeline.registry import bundle

    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # nothing set in this process
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    uri = f"models:/{registered['encoder_name']}@champion"
    loaded = bundle.load_encoder(uri, registered["uri"])
    want = registered["encoders"]["2"]
    np.testing.assert_array_equal(
        loaded.transform(registered["frame"]), want.transform(registered["frame"])
    )
    assert bundle.encoder_json(uri, registered["uri"])["contract"] == want.contract.to_dict()
    with pytest.raises(RegistryError, match="no MLflow tracking URI"):
        bundle.load_encoder(uri, "")
    assert not list(tmp_path.iterdir())  # no mlflow.db, no mlruns/ in the working folder
