"""The one typed configuration of a training run, validated once at the boundary.

The defaults are the digits demo; ``configs/digits.yaml`` spells them out. Every step takes a
``PipelineConfig``; DAG params and CLI flags become overrides applied by ``resolve_config``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sae_pipeline.errors import ConfigError

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "linear"]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class _Section(BaseModel):
    # Unknown keys are typos; failing on them beats silently training the default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the data comes from and which columns mean what."""

    source: str = Field(
        "sklearn://digits",
        description="sklearn://digits|breast_cancer|wine, a CSV or Parquet path/URL, or a "
        "SQLAlchemy URL (with `query`).",
    )
    format: Literal["auto", "csv", "parquet", "sklearn", "sql"] = "auto"
    query: str | None = Field(None, description="SQL query when `source` is a SQLAlchemy URL.")
    label_column: str | None = Field("target", description="Optional label, used by probes only.")
    id_column: str | None = Field(None, description="Optional id carried through untouched.")
    feature_columns: list[str] | None = Field(
        None, description="Feature columns; default: every numeric column but label and id."
    )


class SplitConfig(_Section):
    """A deterministic train/validation/test split."""

    test_fraction: Fraction = 0.25
    val_fraction: Fraction = 0.15
    seed: int = 0
    stratify: bool = True

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitConfig:
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError(
                f"test_fraction + val_fraction = {self.test_fraction + self.val_fraction:g} "
                "leaves under 10% of rows for training"
            )
        return self


class ScalerConfig(_Section):
    """Normalization fitted on the training part only."""

    kind: Literal["standard", "minmax", "robust", "none"] = "minmax"


class ModelConfig(_Section):
    """Architecture of the stacked autoencoder."""

    hidden_dims: Annotated[list[PositiveInt], Field(min_length=1, max_length=8)] = [64, 10]
    activation: Activation = "relu"
    code_activation: Activation = Field(
        "linear", description="Activation of the code layer; linear keeps every unit alive."
    )
    output_activation: Literal["auto", "sigmoid", "linear"] = Field(
        "auto", description="auto: sigmoid when the scaler maps to [0, 1], else linear."
    )
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    batch_norm: bool = False
    tied_weights: bool = False
    noise: Literal["none", "gaussian", "masking"] = "none"
    noise_level: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    sparsity: Literal["none", "l1", "kl"] = "none"
    sparsity_weight: Annotated[float, Field(ge=0.0)] = 0.0
    sparsity_target: Fraction = 0.05


class PhaseConfig(_Section):
    """Optimisation settings of one training phase (pretraining or fine-tuning)."""

    epochs: Annotated[int, Field(ge=0, le=100_000)] = 50
    batch_size: PositiveInt = 64
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    patience: Annotated[int, Field(ge=0)] = Field(
        10, description="Early stopping on validation loss; 0 turns it off."
    )


class TrainingConfig(_Section):
    """Both training phases and where they run."""

    pretrain: PhaseConfig = PhaseConfig(epochs=40, learning_rate=3e-3)
    finetune: PhaseConfig = PhaseConfig(epochs=120, learning_rate=1e-3)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="Mixed precision on CUDA; ignored on CPU.")


class EvaluationConfig(_Section):
    """Downstream probes: logistic regression on codes, raw features and PCA."""

    probe_max_iter: PositiveInt = 5000


class GateConfig(_Section):
    """When a new version may replace the champion."""

    max_probe_accuracy_drop: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0, description="The challenger's probe accuracy may be at most this much lower."
    )
    min_relative_mse_improvement: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="Test reconstruction MSE must be lower by at least this fraction."
    )


class RegistryConfig(_Section):
    """MLflow tracking and model registry."""

    tracking_uri: str | None = Field(
        None, description="Default: $MLFLOW_TRACKING_URI, else a SQLite store under artifacts/."
    )
    experiment: str = "sae-training"
    encoder_model_name: str = Field("sae-digits-encoder", min_length=1)
    scaler_model_name: str = Field("sae-digits-scaler", min_length=1)
    gate: GateConfig = GateConfig()


class PipelineConfig(_Section):
    """Everything one training run needs."""

    name: str = Field("digits", min_length=1)
    artifacts_root: str = Field("artifacts", description="Local folder or fsspec URL.")
    heavy_queue: str = Field("default", description="Airflow queue of pretrain/fine-tune tasks.")
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    scaler: ScalerConfig = ScalerConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    registry: RegistryConfig = RegistryConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        m = self.model
        if m.noise != "none" and m.noise_level == 0.0:
            raise ValueError(f"model.noise is {m.noise!r} but model.noise_level is 0")
        if m.sparsity != "none" and m.sparsity_weight == 0.0:
            raise ValueError(f"model.sparsity is {m.sparsity!r} but model.sparsity_weight is 0")
        if m.sparsity == "kl" and m.code_activation != "sigmoid":
            raise ValueError("model.sparsity 'kl' needs model.code_activation 'sigmoid'")
        if m.tied_weights and m.batch_norm:
            raise ValueError("model.tied_weights and model.batch_norm cannot be combined")
        return self

    @property
    def n_layers(self) -> int:
        return len(self.model.hidden_dims)

    @property
    def code_dim(self) -> int:
        return self.model.hidden_dims[-1]

    def output_activation(self) -> str:
        """The decoder's last activation, resolved from ``auto`` by the scaler."""
        if self.model.output_activation != "auto":
            return self.model.output_activation
        return "sigmoid" if self.scaler.kind == "minmax" else "linear"

    def config_hash(self) -> str:
        """Stable hash of the resolved configuration (lineage tag)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat_params(self) -> dict[str, str]:
        """The config as flat ``section.key`` strings, for MLflow params."""
        return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in _flatten(self)}


def _flatten(config: BaseModel, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in config.model_dump(mode="json").items():
        name = f"{prefix}{key}"
        field = getattr(config, key)
        if isinstance(field, BaseModel):
            items.extend(_flatten(field, prefix=f"{name}."))
        else:
            items.append((name, value))
    return items


def _error_message(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    extra = f"; and {len(err.errors()) - 1} more problem(s)" if len(err.errors()) > 1 else ""
    return f"invalid config: {where}: {first['msg']}{shown}{extra}"


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted == 'a.b'``, creating sections."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"invalid config override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def build_config(
    data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> PipelineConfig:
    """Validate a config dict plus dotted overrides; raise ConfigError naming the field."""
    merged = json.loads(json.dumps(data or {}))
    for key, value in (overrides or {}).items():
        if value is not None:
            set_path(merged, key, value)
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_error_message(err)) from None


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> PipelineConfig:
    """Read a YAML config (or the embedded defaults when ``path`` is None)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}".splitlines()[0]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    return build_config(data, overrides)
