"""Reading sources into frames, validating them, and splitting them deterministically."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.config import DataConfig, SplitConfig
from sae_pipeline.errors import DataError

SKLEARN_DATASETS = ("digits", "breast_cancer", "wine")


def source_format(cfg: DataConfig) -> str:
    """The source's format: the configured one, or guessed from the source string."""
    if cfg.format != "auto":
        return cfg.format
    src = cfg.source.lower()
    if src.startswith("sklearn://"):
        return "sklearn"
    if "://" in src and src.split("://")[0].split("+")[0] in {
        "postgresql", "postgres", "mysql", "sqlite", "mssql", "oracle", "mariadb",
    }:  # fmt: skip
        return "sql"
    if src.rstrip("/").endswith((".parquet", ".pq")) or src.endswith("/"):
        return "parquet"
    if src.endswith((".csv", ".csv.gz", ".txt")):
        return "csv"
    raise DataError(
        f"cannot tell the format of data source {cfg.source!r}; set data.format to csv, "
        "parquet, sklearn or sql"
    )


def load_sklearn(name: str) -> pd.DataFrame:
    """One of scikit-learn's bundled datasets as a frame with a ``target`` column."""
    from sklearn import datasets

    if name not in SKLEARN_DATASETS:
        raise DataError(
            f"unknown sklearn dataset {name!r}; choose from {', '.join(SKLEARN_DATASETS)}"
        )
    bunch = getattr(datasets, f"load_{name}")()
    if name == "digits":
        columns = [f"pixel_{i}" for i in range(bunch.data.shape[1])]
    else:
        columns = [str(c).replace(" ", "_") for c in bunch.feature_names]
    frame = pd.DataFrame(bunch.data.astype(np.float64), columns=columns)
    frame["target"] = bunch.target.astype(np.int64)
    return frame


def read_source(cfg: DataConfig) -> pd.DataFrame:
    """Read the configured source into a frame; raise DataError naming what is wrong."""
    fmt = source_format(cfg)
    if fmt == "sklearn":
        return load_sklearn(cfg.source.split("://", 1)[1].strip("/"))
    if fmt == "sql":
        if not cfg.query:
            raise DataError(f"data.source {cfg.source!r} is a database URL but data.query is empty")
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(cfg.source)
            with engine.connect() as conn:
                return pd.read_sql_query(sqlalchemy.text(cfg.query), conn)
        except sqlalchemy.exc.SQLAlchemyError as err:
            raise DataError(f"SQL source failed: {str(err).splitlines()[0]}") from None
    try:
        if fmt == "csv":
            return pd.read_csv(cfg.source, encoding="utf-8")
        return pd.read_parquet(cfg.source)
    except FileNotFoundError:
        raise DataError(f"data source not found: {cfg.source}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"CSV {cfg.source} is not UTF-8 (byte offset {err.start})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"CSV {cfg.source} is empty") from None
    except (pd.errors.ParserError, OSError, ValueError) as err:
        kind = "CSV" if fmt == "csv" else "Parquet"
        raise DataError(f"{kind} {cfg.source} cannot be read: {str(err).splitlines()[0]}") from None


@dataclass
class Contract:
    """The columns a model was trained on: recorded at first training, checked afterwards."""

    feature_columns: list[str]
    dtypes: dict[str, str]
    label_column: str | None = None
    id_column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_columns": self.feature_columns,
            "dtypes": self.dtypes,
            "label_column": self.label_column,
            "id_column": self.id_column,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contract:
        return cls(**d)


def infer_contract(frame: pd.DataFrame, cfg: DataConfig) -> Contract:
    """Feature columns from the config, else every column but label and id."""
    dupes = frame.columns[frame.columns.duplicated()].unique().tolist()
    if dupes:
        raise DataError(f"duplicate column names: {', '.join(map(str, dupes))}")
    if cfg.id_column is not None and cfg.id_column not in frame.columns:
        raise DataError(f"data.id_column {cfg.id_column!r} is not a column of the data")
    label = cfg.label_column if cfg.label_column in frame.columns else None
    reserved = {label, cfg.id_column}
    features = cfg.feature_columns or [str(c) for c in frame.columns if c not in reserved]
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise DataError(f"feature column(s) missing from the data: {', '.join(missing)}")
    if not features:
        raise DataError("the data has no feature columns")
    dtypes = {c: str(frame[c].dtype) for c in features}
    return Contract(features, dtypes, label, cfg.id_column)


def validate_frame(frame: pd.DataFrame, contract: Contract) -> dict[str, Any]:
    """Check that features are numeric, finite and present; raise DataError on the first problem."""
    if len(frame) == 0:
        raise DataError("the data has a header but no rows")
    missing = [c for c in contract.feature_columns if c not in frame.columns]
    if missing:
        raise DataError(f"feature column(s) missing: {', '.join(missing)}")
    for col in contract.feature_columns:
        values = frame[col]
        if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
            bad = pd.to_numeric(values, errors="coerce").isna() & values.notna()
            example = values[bad].iloc[0] if bad.any() else values.iloc[0]
            raise DataError(
                f"column {col!r} is not numeric: {int(bad.sum())} row(s), e.g. {example!r}"
            )
        arr = values.to_numpy(dtype=np.float64)
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        if n_nan or n_inf:
            raise DataError(f"column {col!r} has {n_nan} NaN and {n_inf} infinite value(s)")
    return {"rows": len(frame), "columns": len(contract.feature_columns)}


def content_hash(frame: pd.DataFrame) -> str:
    """A hash of the frame's columns and values: the same data gives the same hash."""
    h = hashlib.sha256()
    h.update("\x1f".join(map(str, frame.columns)).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def split_indices(n: int, labels: np.ndarray | None, cfg: SplitConfig) -> dict[str, np.ndarray]:
    """Deterministic train/val/test row indices (stratified by label when asked and possible)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    if n < 10:
        raise DataError(f"too few rows to split: {n} (need at least 10)")

    def strat(ix: np.ndarray) -> np.ndarray | None:
        if not cfg.stratify or labels is None:
            return None
        counts = np.unique(labels[ix], return_counts=True)[1]
        return labels[ix] if counts.min() >= 2 else None

    rest, test = train_test_split(
        idx, test_size=cfg.test_fraction, random_state=cfg.seed, stratify=strat(idx)
    )
    val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
    train, val = train_test_split(
        rest, test_size=val_share, random_state=cfg.seed, stratify=strat(rest)
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
