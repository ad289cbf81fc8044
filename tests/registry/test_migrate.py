"""A legacy (pickled) encoder version is refused by the loader and re-registered by migrate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sae_pipeline.config import build_config
from tests.registry.conftest import make_encoder

pytestmark = pytest.mark.integration


def register_legacy(cfg, encoder, tmp_path) -> str:
    """What register_encoder wrote before the bundle format: a cloudpickled pyfunc with
    net.pt, scaler.joblib and contract.json, and an sklearn scaler model of the same run."""
    import joblib
    import mlflow
    import mlflow.pyfunc
    import mlflow.sklearn

    from sae_pipeline.engine.net import save_net
    from sae_pipeline.registry import tracking

    class EncoderPyfunc(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    names = {"net": "net.pt", "scaler": "scaler.joblib", "contract": "contract.json"}
    files = {k: str(tmp_path / f) for k, f in names.items()}
    save_net(encoder.net, files["net"])
    joblib.dump(encoder.scaler, files["scaler"])
    (tmp_path / "contract.json").write_text(json.dumps(encoder.contract.to_dict()))
    run = tracking.find_or_create_run(cfg, "legacy", {})
    tags = {tracking.RUN_KEY_TAG: "legacy", "sae.mlflow_run_id": run}
    with mlflow.start_run(run_id=run):
        enc = mlflow.pyfunc.log_model(
            name="encoder", python_model=EncoderPyfunc(), artifacts=files, pip_requirements=[],
            registered_model_name=cfg.registry.encoder_model_name,
        )  # fmt: skip
        sc = mlflow.sklearn.log_model(
            encoder.scaler, name="scaler", registered_model_name=cfg.registry.scaler_model_name,
            serialization_format="cloudpickle", pip_requirements=[],
        )  # fmt: skip
    c = tracking.client(cfg)
    for name, info in (
        (cfg.registry.encoder_model_name, enc),
        (cfg.registry.scaler_model_name, sc),
    ):
        for k, v in tags.items():
            c.set_model_version_tag(name, info.registered_model_version, k, v)
        c.set_registered_model_alias(name, "champion", info.registered_model_version)
    return str(enc.registered_model_version)


def test_migrate_re_registers_a_legacy_version_and_moves_its_aliases(digits, tmp_path):
    from sae_pipeline.errors import RegistryError
    from sae_pipeline.registry import champion, tracking
    from sae_pipeline.registry.migrate import migrate_version

    cfg = build_config(
        {},
        {
            "artifacts_root": str(tmp_path / "artifacts"),
            "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    )
    encoder = make_encoder(digits, kind="standard")
    version = register_legacy(cfg, encoder, tmp_path)
    ref = champion.resolve(cfg)
    with pytest.raises(RegistryError, match="registry migrate --version"):
        champion.load_encoder(ref)

    result = migrate_version(cfg, version)
    assert result["new"] and result["aliases"] == ["champion"]
    assert migrate_version(cfg, version)["encoder"] == result["encoder"]  # idempotent
    ref = champion.resolve(cfg)
    assert ref.version == result["encoder"] and ref.run_key == "legacy"
    frame = digits.drop(columns="target")
    np.testing.assert_array_equal(
        champion.load_encoder(ref).transform(frame, "all"), encoder.transform(frame, "all")
    )
    c = tracking.client(cfg)
    scaler = c.get_model_version_by_alias(cfg.registry.scaler_model_name, "champion")
    assert str(scaler.version) == result["scaler"]
    assert scaler.tags["sae.migrated_from"] == "1"
