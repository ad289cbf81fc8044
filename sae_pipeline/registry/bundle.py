"""The registered models, written here and read by ``_model_code/sae_model_runtime.py``.

Two models per SAE, both MLflow models-from-code with no pickle inside:

* the **encoder bundle**: ``_model_code/encoder_model.py`` + ``weights.npz`` (state_dict arrays)
  + ``encoder.json`` (architecture, contract, scaler state, outputs, optional ``anomaly`` and
  ``probe`` sections) + with a fitted ``SAEAnomalyDetector``, ``anomaly.npz`` (its arrays);
  raw features in, codes / reconstruction error / anomaly score out;
* the **scaler**: ``_model_code/scaler_model.py`` + ``scaler.json``.

Their code travels in the model (``code_paths``) and their requirements are public pins, so
``mlflow.pyfunc.load_model("models:/<name>@champion")`` and ``mlflow models serve`` work with
only those packages installed. In this repository, ``load_encoder`` rebuilds the engine's
``Encoder`` from the same two files.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sae_pipeline.data.contract import Contract
from sae_pipeline.data.scaling import from_state, to_state
from sae_pipeline.engine.encoder import OUTPUTS, Encoder
from sae_pipeline.engine.net import Architecture, StackedAutoencoderNet
from sae_pipeline.errors import RegistryError
from sae_pipeline.registry._model_code import sae_model_runtime as runtime

__all__ = ["OUTPUTS", "Encoder", "load_encoder", "log_encoder_model", "log_scaler_model"]

MODEL_CODE = Path(__file__).resolve().parent / "_model_code"
RUNTIME_FILE = MODEL_CODE / "sae_model_runtime.py"
ENCODER_FILE = MODEL_CODE / "encoder_model.py"
SCALER_FILE = MODEL_CODE / "scaler_model.py"
# What a registered model needs, as public pins of the versions installed here (a local
# version suffix such as +cpu is dropped: `torch==2.13.0` matches the CPU and CUDA builds).
RUNTIME_PACKAGES = ("mlflow", "torch", "numpy", "pandas")


def requirements() -> list[str]:
    """``<package>==<version>`` for the runtime's packages; nothing from this repository."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in RUNTIME_PACKAGES]


# ---- writing ----------------------------------------------------------------------------------
def encoder_config(
    encoder: Encoder, anomaly: dict[str, float] | None = None, probe: dict | None = None
) -> dict[str, Any]:
    """encoder.json's content: plain data only."""
    config: dict[str, Any] = {
        "format": runtime.FORMAT,
        "arch": encoder.net.arch.to_dict(),
        "contract": encoder.contract.to_dict(),
        "scaler": to_state(encoder.scaler),
        "default_output": "codes",
    }
    if anomaly is None and encoder.anomaly is not None:
        anomaly = encoder.anomaly[0]  # the detector's metadata; its arrays go to anomaly.npz
    if anomaly is not None:
        config["anomaly"] = dict(anomaly)
    if probe is not None:
        config["probe"] = dict(probe)
    return config


def write_encoder_bundle(encoder: Encoder, directory: str | Path, **sections: Any) -> dict:
    """Write ``weights.npz`` and ``encoder.json``; returns them as MLflow ``artifacts``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().cpu().numpy() for k, v in encoder.net.state_dict().items()}
    np.savez(d / "weights.npz", **arrays)
    config = encoder_config(encoder, **sections)
    (d / "encoder.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    files = {"config": str(d / "encoder.json"), "weights": str(d / "weights.npz")}
    if encoder.anomaly is not None and "anomaly" not in sections:
        np.savez(d / "anomaly.npz", **encoder.anomaly[1])
        files["anomaly"] = str(d / "anomaly.npz")
    return files


def write_scaler_bundle(encoder: Encoder, directory: str | Path) -> dict[str, str]:
    config = {
        "format": runtime.SCALER_FORMAT,
        "feature_columns": list(encoder.contract.feature_columns),
        "scaler": to_state(encoder.scaler),
    }
    path = Path(directory) / "scaler.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return {"config": str(path)}


# ---- reading (in this repository) ---------------------------------------------------------
def encoder_from_files(config_path: str | Path, weights_path: str | Path) -> Encoder:
    """The engine's ``Encoder`` from a bundle's encoder.json and weights.npz (and the
    detector's anomaly.npz beside them, when encoder.json has a detector section)."""
    config = runtime.read_json(config_path)
    if config.get("format") != runtime.FORMAT:
        raise RegistryError(f"{config_path}: not an encoder bundle ({config.get('format')!r})")
    net = StackedAutoencoderNet(Architecture(**config["arch"]))
    net.load_state_dict(runtime.load_weights(weights_path))
    anomaly = None
    section = config.get("anomaly") or {}
    if section.get("kind") in runtime.DETECTOR_KINDS:
        anomaly = (section, runtime.load_arrays(Path(config_path).with_name("anomaly.npz")))
    contract, scaler = Contract.from_dict(config["contract"]), from_state(config["scaler"])
    return Encoder(contract, scaler, net.eval(), anomaly)


def download(model_uri: str, tracking_uri: str, dst: str) -> Path:
    """A model's files, fetched from the registry at ``tracking_uri`` (never MLflow's
    process-wide URI, whose silent default is ``sqlite:///mlflow.db`` in the working folder).

    MLflow resolves a ``models:/`` URI with the process-wide registry even when given a
    tracking URI, so the version (or logged model) is resolved here with an explicit client.
    """
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if not tracking_uri:
        raise RegistryError(f"no MLflow tracking URI to load {model_uri} from")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    uri = model_uri
    for _ in range(2):  # a version's source may itself be a logged model (models:/m-...)
        if not uri.startswith("models:"):
            break
        found = get_model_name_and_version(client, uri)
        if len(found) == 1:
            uri = client.get_logged_model(found[0]).artifact_location
        else:
            uri = client.get_model_version_download_uri(*found)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
    )


def load_encoder(model_uri: str, tracking_uri: str) -> Encoder:
    """The ``Encoder`` of a registered version (``models:/<name>/<version>``) in the registry
    at ``tracking_uri`` (the config's, explicitly), pickle-free.

    A version registered before the bundle format (a pickled pyfunc) is refused with the
    command that re-registers it: its files can only be read by unpickling.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = download(model_uri, tracking_uri, tmp)
        config, weights = local / "artifacts" / "encoder.json", local / "artifacts" / "weights.npz"
        if not config.is_file():
            if (local / "python_model.pkl").is_file():
                raise RegistryError(
                    f"{model_uri} is a legacy (pickled) encoder; re-register it in the "
                    "pickle-free format with: sae-pipeline registry migrate --version <n>"
                )
            raise RegistryError(f"{model_uri} is not an encoder bundle (no encoder.json)")
        return encoder_from_files(config, weights)


def encoder_json(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """A registered encoder's ``encoder.json`` (plain data: contract, scaler, probe, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download(model_uri, tracking_uri, tmp)
        config = local / "artifacts" / "encoder.json"
        if not config.is_file():
            raise RegistryError(f"{model_uri} is not an encoder bundle (no encoder.json)")
        return runtime.read_json(config)


# ---- logging -----------------------------------------------------------------------------------
def input_types(contract: Contract, example=None) -> dict[str, str]:
    """MLflow's type of each feature column: ``long`` where the training data held integers
    (so the same data passes MLflow's check unchanged), ``double`` otherwise. The dtypes of
    ``example`` (training rows: what MLflow checks against the signature as the model is
    logged) come first, the contract's where it has no such column."""
    kinds = dict(contract.dtypes or {})
    if example is not None:
        kinds.update({str(c): str(t) for c, t in example.dtypes.items()})
    return {
        c: "long" if str(kinds.get(c, "")).startswith(("int", "uint")) else "double"
        for c in contract.feature_columns
    }


def _signature(
    inputs: dict[str, str],
    columns: list[str],
    param: str,
    default: str,
    dtype: str = "float",
    extra: dict | None = None,
):
    """The feature columns in (``inputs``: name -> type, each required), ``columns`` (+
    ``extra``, name -> type) out, one string param.

    With an input schema MLflow checks each in-process ``predict`` before the model sees it: a
    missing column, a text cell, a column of another type than in training (int64 data for a
    double, floats for a long: "unsafe" casts to MLflow) or an array without column names is
    refused with MLflow's message, which names the columns. The
    scoring servers parse JSON and CSV straight to doubles; ``sae-pipeline serve`` hands the
    rows to the bundle itself, whose one-line 400s name the problem (docs/service.md)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    specs = [ColSpec(dtype, c, required=False) for c in columns]
    specs += [ColSpec(t, c, required=False) for c, t in (extra or {}).items()]
    return ModelSignature(
        inputs=Schema([ColSpec(t, c) for c, t in inputs.items()]),
        outputs=Schema(specs),
        params=ParamSchema([ParamSpec(param, "string", default)]),
    )


def _log(name: str, code: Path, artifacts: dict[str, str], **kwargs: Any):
    import mlflow

    # MLflow would copy uv.lock + pyproject.toml of the working directory into the model (and
    # `--env-manager uv` would then install this whole project): not for a self-contained model.
    previous = os.environ.get("MLFLOW_LOG_UV_FILES")
    os.environ["MLFLOW_LOG_UV_FILES"] = "false"
    # log_model executes the code file here (signature and example checks) before the copied
    # code_paths are importable: let it find the runtime under its top-level name meanwhile.
    sys.path.insert(0, str(MODEL_CODE))
    try:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code),
            code_paths=[str(RUNTIME_FILE)],
            artifacts=artifacts,
            pip_requirements=requirements(),
            **kwargs,
        )
    finally:
        sys.path.remove(str(MODEL_CODE))
        sys.modules.pop(RUNTIME_FILE.stem, None)
        if previous is None:
            os.environ.pop("MLFLOW_LOG_UV_FILES", None)
        else:
            os.environ["MLFLOW_LOG_UV_FILES"] = previous


def log_encoder_model(encoder: Encoder, example, registered_name: str, tags: dict, **sections):
    """Log (in the active run) and register the encoder bundle; returns MLflow's ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_encoder_bundle(encoder, tmp, **sections)
        # The bundle must give the trained encoder's codes before anything is registered.
        bundle = runtime.EncoderBundle.load(
            artifacts["config"], artifacts["weights"], artifacts.get("anomaly")
        )
        got = bundle.transform(example, "all")
        want = encoder.transform(example, "all")
        if not (
            np.allclose(
                got[want.columns].to_numpy(float), want.to_numpy(float), rtol=1e-5, atol=1e-6
            )
        ):
            raise RegistryError("the encoder bundle does not reproduce the encoder's outputs")
        columns = [*encoder.code_columns, runtime.ERROR_COLUMN]
        features = input_types(encoder.contract, example)
        extra = {"anomaly_score": "double", "is_anomaly": "boolean"} if bundle.anomaly else {}
        if bundle.probe:
            text = any(isinstance(c, str) for c in bundle.probe["classes"])
            extra["probe_label"] = "string" if text else "long"
        return _log(
            "encoder",
            ENCODER_FILE,
            artifacts,
            signature=_signature(features, columns, "output", "codes", extra=extra),
            input_example=(example.head(5), {"output": "codes"}),
            registered_model_name=registered_name,
            tags=tags,
        )


def log_scaler_model(encoder: Encoder, example, registered_name: str, tags: dict):
    """Log (in the active run) and register the scaler; returns MLflow's ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_scaler_bundle(encoder, tmp)
        columns = list(encoder.contract.feature_columns)
        return _log(
            "scaler",
            SCALER_FILE,
            artifacts,
            signature=_signature(
                input_types(encoder.contract, example),
                columns,
                "direction",
                "transform",
                dtype="double",
            ),
            input_example=(example.head(5), {"direction": "transform"}),
            registered_model_name=registered_name,
            tags=tags,
        )
