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

from sae_pipeline import boundary
from sae_pipeline.errors import ConfigError

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "linear"]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Epochs = Annotated[int, Field(ge=0, le=100_000)]
LearningRate = Annotated[float, Field(gt=0.0, le=10.0)]
# A streamed phase's shuffle buffer grows to hold one batch: a batch cannot be the whole data.
BatchSize = Annotated[int, Field(gt=0, le=65_536)]


class _Section(BaseModel):
    # Unknown keys are typos; failing on them beats silently training the default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


RowPolicy = Literal["reject", "quarantine"]


class ValidationConfig(_Section):
    """What to do with each kind of bad input: fail the batch, or quarantine the bad rows.

    Row problems (a bad value in some rows) can be quarantined: those rows go to the
    quarantine file with a reason each, the rest is accepted. Column problems (a missing,
    extra or reordered column) concern every row, so the batch passes or fails as a whole.
    """

    non_numeric: RowPolicy = Field("quarantine", description="A feature that is not a number.")
    missing_values: RowPolicy = Field(
        "quarantine", description="An empty/NaN feature value, or a missing label or id."
    )
    infinite_values: RowPolicy = Field("quarantine", description="+inf or -inf in a feature.")
    out_of_range: Literal["reject", "quarantine", "accept"] = Field(
        "quarantine",
        description="A value far outside the training range recorded in the contract "
        "(only when validating against an existing contract).",
    )
    range_tolerance: Annotated[float, Field(ge=0.0, le=1e6, allow_inf_nan=False)] = Field(
        1.0,
        description="How far outside [min, max] of training is 'far': this many times the "
        "training range (max - min).",
    )
    duplicate_ids: RowPolicy = Field(
        "quarantine", description="A repeated value of the id column (the first is kept)."
    )
    extra_columns: Literal["reject", "ignore"] = Field(
        "reject", description="Columns the contract does not know (ignore drops them)."
    )
    column_order: Literal["reject", "reorder"] = Field(
        "reorder", description="The contract's columns in another order."
    )
    constant_columns: Literal["reject", "warn"] = Field(
        "warn", description="A feature with one value in every accepted row."
    )
    max_quarantine_fraction: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = Field(
        0.1, description="The batch fails when a larger share of its rows is quarantined."
    )


class DataConfig(_Section):
    """Where the data comes from and which columns mean what."""

    source: str = Field(
        "sklearn://digits",
        description="sklearn://digits|breast_cancer|wine, a CSV or Parquet path/URL, or a "
        "SQLAlchemy URL (with `query`).",
    )
    format: Literal["auto", "csv", "parquet", "sklearn", "sql"] = "auto"
    query: str | None = Field(None, description="SQL query when `source` is a SQLAlchemy URL.")
    source_password_env: str | None = Field(
        None,
        description="Environment variable holding the database password of a `source` URL "
        "written without one (postgresql://etl@db/x): the password never enters the config, "
        "MLflow or the run conf.",
    )
    label_column: str | None = Field("target", description="Optional label, used by probes only.")
    id_column: str | None = Field(None, description="Optional id carried through untouched.")
    feature_columns: list[str] | None = Field(
        None, description="Feature columns; default: every numeric column but label and id."
    )
    contract: str | None = Field(
        None,
        description="A data contract to validate against (contract.json, or the manifest.json "
        "of an earlier snapshot); default: record a new one from this data.",
    )
    snapshot_shard_rows: Annotated[int, Field(gt=0)] = Field(
        1_000_000, description="A snapshot larger than this is written as a folder of shards."
    )
    in_memory_max_bytes: Annotated[int, Field(ge=0)] = Field(
        256 * 2**20,
        description="Ingest and validate a Parquet or CSV source in memory when rows x columns "
        "x 8 bytes (for a CSV estimated from its byte size) is at most this; otherwise chunk by "
        "chunk, with memory bounded by the chunk (docs/engine-scaling.md). SQL and scikit-learn "
        "sources are always read in memory.",
    )
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _consistent_columns(self) -> DataConfig:
        if self.feature_columns is not None:
            if not self.feature_columns:
                raise ValueError("data.feature_columns is empty; leave it unset to use all")
            dupes = sorted({c for c in self.feature_columns if self.feature_columns.count(c) > 1})
            if dupes:
                raise ValueError(f"data.feature_columns repeats {', '.join(map(repr, dupes))}")
            for role in ("label_column", "id_column"):
                if getattr(self, role) in self.feature_columns:
                    raise ValueError(
                        f"data.{role} {getattr(self, role)!r} is also in data.feature_columns"
                    )
        if self.id_column is not None and self.id_column == self.label_column:
            raise ValueError(f"data.id_column and data.label_column are both {self.id_column!r}")
        if self.format == "sql" and not self.query:
            raise ValueError("data.format is 'sql' but data.query is empty")
        return self


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

    hidden_dims: Annotated[list[PositiveInt], Field(min_length=1, max_length=8)] = [256, 64, 10]
    activation: Activation = "relu"
    code_activation: Activation = Field("linear", description="linear keeps every code unit alive.")
    output_activation: Literal["auto", "sigmoid", "linear"] = Field(
        "auto", description="auto: sigmoid when the scaler maps to [0, 1], else linear."
    )
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    batch_norm: bool = False
    tied_weights: bool = False
    # Denoising (Gaussian, sigma 0.2 on [0, 1] data) is what lifts the codes above PCA's on
    # the probe; see bench/bench_quality.py.
    noise: Literal["none", "gaussian", "masking"] = "gaussian"
    noise_level: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    sparsity: Literal["none", "l1", "kl"] = "none"
    sparsity_weight: Annotated[float, Field(ge=0.0)] = 0.0
    sparsity_target: Fraction = 0.05


class PhaseConfig(_Section):
    """Optimisation settings of one training phase; the defaults are pretraining's."""

    epochs: Epochs = 40
    batch_size: BatchSize = 64
    learning_rate: LearningRate = 3e-3
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    patience: Annotated[int, Field(ge=0)] = Field(
        0,
        description="Early stopping after this many epochs without a better validation loss; "
        "0 turns it off. The best epoch's weights are kept either way.",
    )
    max_steps: Annotated[int, Field(gt=0)] | None = Field(
        None, description="Stop the phase after this many optimisation steps (all epochs)."
    )
    max_samples: Annotated[int, Field(gt=0)] | None = Field(
        None,
        description="Stop the phase after this many training rows seen. Unset (with max_steps "
        "unset): no cap in memory; streamed data gets AUTO_MAX_SAMPLES (docs/engine-scaling.md).",
    )


class FinetuneConfig(PhaseConfig):
    """End-to-end fine-tuning. Its defaults are fields, so `finetune: {epochs: 30}` keeps them."""

    epochs: Epochs = 400
    learning_rate: LearningRate = 2e-3
    lr_schedule: Literal["constant", "cosine", "step"] = "cosine"


class TrainingConfig(_Section):
    """Both training phases and where they run."""

    pretrain: PhaseConfig = PhaseConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 on CUDA for layers of 1,024+ units (AMP_MIN_WIDTH).")
    in_memory_max_bytes: Annotated[int, Field(ge=0)] = Field(
        128 * 2**20,
        description="Train in memory when rows x features x 4 bytes is at most this; stream "
        "from the snapshot's shards otherwise. The in-memory path peaks near 12x this size.",
    )
    shuffle_buffer_rows: Annotated[int, Field(gt=0)] = Field(
        131_072,
        description="Streaming: rows shuffled together (8 random slices of the row cache, or "
        "2 row groups without one); about 5 x (this + 16,384) x features x 4 bytes of memory.",
    )
    val_sample_rows: Annotated[int, Field(gt=0)] = Field(
        65_536, description="Streaming: the fixed, seeded validation sample early stopping uses."
    )
    row_cache: bool = Field(
        True,
        description="Streaming: fit_scaler also stores the training part as row-major float32 "
        "files (rows x features x 4 bytes of disk), which every epoch then reads without "
        "decoding Parquet; false reads the snapshot's shards each epoch.",
    )
    checkpoint_every_steps: Annotated[int, Field(gt=0)] = Field(
        2000, description="Streaming: a mid-epoch checkpoint every this many steps."
    )


class EvaluationConfig(_Section):
    """Downstream probes: logistic regression on codes, raw features and PCA."""

    probe_max_iter: PositiveInt = 5000
    sample_rows: PositiveInt = Field(
        50_000,
        description="Streamed data: evaluation, probes and the gate use a fixed, seeded sample "
        "of this many rows of each part they need (train, test).",
    )


class AnomalyConfig(_Section):
    """Anomaly scoring (off by default): ``SAEAnomalyDetector`` fitted on the training part,
    registered inside the encoder bundle (outputs ``anomaly_score`` and ``is_anomaly``)."""

    enabled: bool = False
    contamination: Annotated[float, Field(gt=0.0, le=0.5)] = Field(
        0.01,
        description="Share of training rows flagged: the threshold is that quantile of their "
        "scores. The drift monitor expects this share of a new batch flagged.",
    )
    anomaly_label: int | str = Field(
        1,
        description="The value of the data's label column that marks a known anomaly. When the "
        "test part holds both kinds, ROC AUC and PR AUC of the detector and of IsolationForest "
        "(fitted on the same training rows) are logged to the run.",
    )
    n_estimators: PositiveInt = 10
    max_samples: Annotated[int, Field(ge=2)] = 256
    epochs: PositiveInt = 20
    isolation_weight: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.35,
        description="The isolation trees' share of each member's score (0: reconstruction "
        "error and code density only, as versions before sae-ensemble/2).",
    )


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
    promotion_lock_timeout_s: Annotated[float, Field(gt=0)] = Field(
        600.0, description="How long a promotion waits for another one of the same model."
    )


class SelectionConfig(_Section):
    """Hyperparameter selection by validation probe accuracy (empty: train the config as is).

    Each candidate is a set of dotted overrides, e.g. ``{"model.hidden_dims": [64, 8]}``.
    The training DAG trains every candidate in parallel (dynamic task mapping), records each
    in MLflow, and carries the winner on to pretraining and fine-tuning.
    """

    candidates: list[dict[str, Any]] = []
    metric: Literal["probe_accuracy", "val_mse"] = "probe_accuracy"


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
    selection: SelectionConfig = SelectionConfig()
    anomaly: AnomalyConfig = AnomalyConfig()

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
        for i, cand in enumerate(self.selection.candidates):
            dims = cand.get("model.hidden_dims", m.hidden_dims)
            if not isinstance(dims, list) or len(dims) != len(m.hidden_dims):
                # The DAG has one task per layer, fixed when it is parsed.
                raise ValueError(
                    f"selection.candidates[{i}]: model.hidden_dims {dims!r} must have "
                    f"{len(m.hidden_dims)} layer(s) like model.hidden_dims"
                )
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
        """The config as flat ``section.key`` strings, for MLflow params (which every MLflow
        user may read): passwords in URLs are masked."""
        return {
            k: mask_credentials(json.dumps(v) if not isinstance(v, str) else v)
            for k, v in _flatten(self)
        }


def _flatten(config: BaseModel, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in config.model_dump(mode="json").items():
        name, field = f"{prefix}{key}", getattr(config, key)
        if isinstance(field, BaseModel):
            items.extend(_flatten(field, prefix=f"{name}."))
        else:
            items.append((name, value))
    return items


def mask_credentials(text: str) -> str:
    """``text`` with every password in a URL (``scheme://user:password@host``, or a query key
    such as ``password``, ``token`` or ``X-Amz-Signature``) shown as ***."""
    return boundary.mask_secrets(text)


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


def build_config(data: dict | None = None, overrides: dict | None = None) -> PipelineConfig:
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
    """Read a YAML config; the embedded defaults when ``path`` is None or empty (compose files
    and shells leave ``SAE_CONFIG=""`` behind)."""
    data: dict[str, Any] = {}
    if path is not None and str(path).strip():
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
