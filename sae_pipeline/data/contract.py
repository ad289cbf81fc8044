"""The data contract, content hashes and deterministic splits.

Reading sources lives in ``sae_pipeline.data.sources`` and the policy-driven validation of a
batch (accept, quarantine or reject) in ``sae_pipeline.data.validation``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.config import DataConfig, SplitConfig
from sae_pipeline.errors import DataError


@dataclass
class Contract:
    """The columns a model was trained on: recorded at first training, checked afterwards.

    ``feature_ranges`` holds each feature's [min, max] over the accepted training rows, so that
    a later batch can be checked for values far outside what the model has seen.
    """

    feature_columns: list[str]
    dtypes: dict[str, str]
    label_column: str | None = None
    id_column: str | None = None
    feature_ranges: dict[str, list[float]] | None = None

    @property
    def columns(self) -> list[str]:
        """Every column the contract names, in snapshot order: features, label, id."""
        extra = [c for c in (self.label_column, self.id_column) if c is not None]
        return [*self.feature_columns, *extra]

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_columns": list(self.feature_columns),
            "dtypes": dict(self.dtypes),
            "label_column": self.label_column,
            "id_column": self.id_column,
            "feature_ranges": self.feature_ranges,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contract:
        """A contract from ``to_dict`` output (also one written before ranges were recorded)."""
        if not isinstance(d, dict) or not isinstance(d.get("feature_columns"), list):
            raise DataError("not a data contract: it needs a 'feature_columns' list")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def infer_contract(frame: pd.DataFrame, cfg: DataConfig) -> Contract:
    """Feature columns from the config, else every column but label and id.

    ``dtypes`` are the frame's as given; ``validation.validate_batch`` records the contract
    of the accepted rows instead (numeric dtypes, training ranges).
    """
    dupes = frame.columns[frame.columns.duplicated()].unique().tolist()
    if dupes:
        raise DataError(f"duplicate column names: {', '.join(map(repr, dupes))}")
    if cfg.id_column is not None and cfg.id_column not in frame.columns:
        raise DataError(f"data.id_column {cfg.id_column!r} is not a column of the data")
    label = cfg.label_column if cfg.label_column in frame.columns else None
    reserved = {label, cfg.id_column}
    features = cfg.feature_columns or [str(c) for c in frame.columns if c not in reserved]
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise DataError(
            f"data.feature_columns names column(s) missing from the data: "
            f"{', '.join(map(repr, missing))}"
        )
    if not features:
        shown = ", ".join(repr(str(c)) for c in frame.columns)
        raise DataError(f"the data has no feature columns, only the label or id column: {shown}")
    dtypes = {c: str(frame[c].dtype) for c in features}
    return Contract(features, dtypes, label, cfg.id_column)


class ContentHasher:
    """``content_hash`` computed chunk by chunk: feeding a frame's rows in any chunks gives the
    hash of the whole frame (each row's hash depends on that row alone)."""

    def __init__(self, columns) -> None:
        self._h = hashlib.sha256()
        self._h.update("\x1f".join(map(str, columns)).encode())

    def update(self, frame: pd.DataFrame) -> ContentHasher:
        self._h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16]


def content_hash(frame: pd.DataFrame) -> str:
    """A hash of the frame's columns and values: the same data gives the same hash."""
    return ContentHasher(frame.columns).update(frame).hexdigest()


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
