"""Validating a batch against the data contract: pure functions on frames, no I/O.

``validate_batch`` sorts the rows of a batch into accepted rows and quarantined rows (each with
its reason), or rejects the whole batch with a ``DataError`` that names the problem, following
the policies in ``data.validation``. Always: rows in = rows accepted + rows quarantined.

- Column problems concern every row and fail the batch: no columns, duplicate names, no rows,
  a contract column that is missing, a column with no number in it, a column of a non-numeric
  type. Extra columns, reordered columns and constant features fail it when the policy says so.
- Row problems are non-numeric, missing (NaN, empty) and infinite values, values far outside
  the training range recorded in the contract, a missing label, a missing or repeated id. Each
  rejects the batch or quarantines its rows, as the policy says; when more than
  ``max_quarantine_fraction`` of the rows would be quarantined, the batch fails.

Row numbers in messages and in the quarantine file's ``_row`` column count data rows from 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.config import DataConfig, ValidationConfig
from sae_pipeline.data._row_checks import (
    RowProblem,
    feature_problems,
    label_and_id_problems,
    names_of,
    valid_rows,
)
from sae_pipeline.data.contract import Contract, infer_contract
from sae_pipeline.data.sources import check_unique_names
from sae_pipeline.errors import DataError

REASON_COLUMN = "_quarantine_reason"
ROW_COLUMN = "_row"


@dataclass
class ValidationResult:
    """The outcome of validating one batch."""

    accepted: pd.DataFrame  # contract columns (features, label, id), numeric features
    quarantined: pd.DataFrame  # input columns + _row + _quarantine_reason
    contract: Contract  # the contract checked against, or the one recorded from this batch
    rows_in: int
    problems: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dropped_columns: list[str] = field(default_factory=list)

    @property
    def rows_accepted(self) -> int:
        return len(self.accepted)

    @property
    def rows_quarantined(self) -> int:
        return len(self.quarantined)

    def counts(self) -> dict[str, int]:
        return {
            "rows_in": self.rows_in,
            "rows_accepted": self.rows_accepted,
            "rows_quarantined": self.rows_quarantined,
        }


def validate_batch(
    frame: pd.DataFrame, cfg: DataConfig, contract: Contract | None = None
) -> ValidationResult:
    """Accept, quarantine or reject the rows of ``frame``.

    Without ``contract`` (first training) the contract is inferred from the config and the
    data, and recorded from the accepted rows (dtypes, training ranges). With one, the batch
    must match it, and values far outside its training ranges are row problems.
    """
    policy = cfg.validation
    frame = _check_shape(frame)
    warnings: list[str] = []
    inferred = contract is None
    if contract is None:
        contract = infer_contract(frame, cfg)
        dropped = [c for c in frame.columns if c not in contract.columns]
    else:
        dropped = _match_columns(frame, contract, policy, warnings)
        if contract.label_column is not None and contract.label_column not in frame.columns:
            contract = replace(contract, label_column=None)  # what these rows hold: no label
    ranges = None
    if not inferred and policy.out_of_range != "accept":
        ranges = contract.feature_ranges

    numeric: dict[str, np.ndarray] = {}
    problems: list[RowProblem] = []
    for col in contract.feature_columns:
        limits = ranges.get(col) if ranges else None
        numeric[col], found = feature_problems(frame[col], col, limits, policy.range_tolerance)
        problems += found
    problems += label_and_id_problems(frame, contract)
    problems = [p for p in problems if p.count]
    # Repeats are looked for among the rows valid otherwise: the policy keeps the first of them.
    problems += [p for p in [_repeated_ids(frame, contract, problems)] if p is not None and p.count]

    n = len(frame)
    for p in problems:
        if getattr(policy, p.policy_field) == "reject":
            raise DataError(
                f"{p.summary()}; {n} rows in (data.validation.{p.policy_field} is 'reject')"
            )
    bad = np.zeros(n, dtype=bool)
    for p in problems:
        bad |= p.mask
    n_bad = int(bad.sum())
    if n_bad == n or n_bad / n > policy.max_quarantine_fraction:
        raise DataError(_too_many_message(problems, n_bad, n, policy.max_quarantine_fraction))

    accepted = _accepted(frame, contract, numeric, ~bad)
    _check_constant(accepted, contract, policy, warnings)
    if inferred:
        contract = _recorded(accepted, contract)
    return ValidationResult(
        accepted=accepted,
        quarantined=_quarantined(frame, problems, bad),
        contract=contract,
        rows_in=n,
        problems=[
            {
                "problem": p.kind,
                "column": p.column,
                "role": p.role,
                "rows": p.count,
                "message": p.summary(),
            }
            for p in problems
        ],
        warnings=warnings,
        dropped_columns=dropped,
    )


def check_features(frame: pd.DataFrame, contract: Contract) -> None:
    """Strict check of the contract's features: raise DataError on the first problem."""
    if len(frame) == 0:
        raise DataError("the data has a header but no rows")
    missing = [c for c in contract.feature_columns if c not in frame.columns]
    if missing:
        raise DataError(f"feature column(s) missing: {', '.join(missing)}")
    for col in contract.feature_columns:
        _, found = feature_problems(frame[col], col, None, 0.0)
        for p in found:
            if p.count:
                raise DataError(f"{p.summary()}; {len(frame)} rows in")


# ---- column checks ----------------------------------------------------------------------------
def _check_shape(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with string column names, if it has columns, rows and no name twice."""
    if frame.shape[1] == 0:
        raise DataError("the data has no columns")
    names = check_unique_names(frame.columns, "the data")
    reserved = [c for c in (REASON_COLUMN, ROW_COLUMN) if c in names]
    if reserved:
        raise DataError(f"column name {reserved[0]!r} is reserved for the quarantine file")
    if len(frame) == 0:
        raise DataError(f"the data has a header but no rows (columns: {names_of(names)})")
    return frame.set_axis(names, axis=1)


def _match_columns(
    frame: pd.DataFrame, contract: Contract, policy: ValidationConfig, warnings: list[str]
) -> list[str]:
    """Check the batch's columns against the contract; return the columns dropped."""
    missing = [c for c in contract.feature_columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{len(missing)} feature column(s) of the contract missing from the data: "
            f"{names_of(missing)}"
        )
    if contract.id_column is not None and contract.id_column not in frame.columns:
        raise DataError(f"id column {contract.id_column!r} of the contract is missing")
    extra = [c for c in frame.columns if c not in contract.columns]
    if extra and policy.extra_columns == "reject":
        raise DataError(
            f"{len(extra)} column(s) not in the contract: {names_of(extra)} "
            "(data.validation.extra_columns is 'reject'; 'ignore' drops them)"
        )
    if extra:
        warnings.append(f"dropped {len(extra)} column(s) not in the contract: {names_of(extra)}")
    present = [c for c in frame.columns if c in contract.columns]
    expected = [c for c in contract.columns if c in frame.columns]
    if present != expected:
        i = next(k for k, (a, b) in enumerate(zip(present, expected, strict=True)) if a != b)
        message = (
            f"columns are not in the contract's order: column {present[i]!r} is where the "
            f"contract has {expected[i]!r}"
        )
        if policy.column_order == "reject":
            raise DataError(f"{message} (data.validation.column_order is 'reject')")
        warnings.append(f"{message}; reordered")
    if contract.label_column is not None and contract.label_column not in frame.columns:
        warnings.append(f"label column {contract.label_column!r} is absent")
    return extra


def _check_constant(
    accepted: pd.DataFrame, contract: Contract, policy: ValidationConfig, warnings: list[str]
) -> None:
    if len(accepted) < 2:
        return
    constant = [c for c in contract.feature_columns if accepted[c].nunique(dropna=False) <= 1]
    if not constant:
        return
    message = (
        f"{len(constant)} constant feature column(s), one value in all {len(accepted)} "
        f"accepted rows: {names_of(constant)}"
    )
    if policy.constant_columns == "reject":
        raise DataError(f"{message} (data.validation.constant_columns is 'reject')")
    warnings.append(message)


# ---- repeated ids ---------------------------------------------------------------------------
def _repeated_ids(
    frame: pd.DataFrame, contract: Contract, problems: list[RowProblem]
) -> RowProblem | None:
    """Rows whose id an earlier valid row has (rows with other problems are not looked at)."""
    ident = contract.id_column
    if ident is None or ident not in frame.columns:
        return None
    values = frame[ident]
    valid = valid_rows(len(frame), problems)
    repeated = np.zeros(len(frame), dtype=bool)
    repeated[valid] = values[valid].duplicated(keep="first").to_numpy()
    first_seen: dict[Any, int] = {}
    if repeated.any():
        for i in np.flatnonzero(valid):
            first_seen.setdefault(values.iloc[i], int(i))
    return RowProblem("duplicate_id", ident, "id", repeated, values, "", first_seen)


# ---- results ----------------------------------------------------------------------------------
def _accepted(
    frame: pd.DataFrame, contract: Contract, numeric: dict[str, np.ndarray], keep: np.ndarray
) -> pd.DataFrame:
    """The contract's columns of the kept rows; text features become float64 numbers."""
    out = {}
    for col in contract.columns:
        if col not in frame.columns:
            continue  # an absent label
        values = frame[col]
        if col in numeric and not (
            pd.api.types.is_bool_dtype(values.dtype) or pd.api.types.is_numeric_dtype(values.dtype)
        ):
            out[col] = numeric[col][keep]
        else:
            out[col] = _plain(values.array[keep])
    return pd.DataFrame(out)


def _plain(values: Any) -> Any:
    """Accepted values in one type whichever chunk or path they came in: a nullable column
    (integers with a null somewhere in the batch) without a null among the accepted rows in
    its NumPy type, as a column that never had one; booleans with a null as float64, as pandas
    reads them from a CSV (objects, parsed as numbers); otherwise its own type (exact ids)."""
    dtype = values.dtype
    if isinstance(dtype, pd.BooleanDtype) and not values.isna().any():
        return values.to_numpy(dtype=np.float64)
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and not values.isna().any():
        numpy_dtype = getattr(dtype, "numpy_dtype", None)
        if numpy_dtype is not None and numpy_dtype != np.dtype(object):
            return values.to_numpy(dtype=numpy_dtype)
    return values


def _recorded(accepted: pd.DataFrame, contract: Contract) -> Contract:
    """The contract of first training: accepted dtypes and each feature's training range."""
    ranges = {}
    for col in contract.feature_columns:
        x = accepted[col].to_numpy(dtype=np.float64)
        ranges[col] = [float(x.min()), float(x.max())]
    dtypes = {col: str(accepted[col].dtype) for col in contract.feature_columns}
    return Contract(
        list(contract.feature_columns), dtypes, contract.label_column, contract.id_column, ranges
    )


def _quarantined(frame: pd.DataFrame, problems: list[RowProblem], bad: np.ndarray) -> pd.DataFrame:
    """The bad rows as given, with their input row number and every reason."""
    rows = np.flatnonzero(bad)
    reasons: dict[int, list[str]] = {int(i): [] for i in rows}
    for p in problems:
        for i in np.flatnonzero(p.mask):
            reasons[int(i)].append(p.row_reason(int(i)))
    out = frame.iloc[rows].reset_index(drop=True)
    out[ROW_COLUMN] = rows.astype(np.int64)
    out[REASON_COLUMN] = ["; ".join(reasons[int(i)]) for i in rows]
    return out


def _too_many_message(problems: list[RowProblem], n_bad: int, n: int, ceiling: float) -> str:
    worst = sorted(problems, key=lambda p: -p.count)[:3]
    more = f"; and {len(problems) - 3} more problem(s)" if len(problems) > 3 else ""
    if n_bad == n:
        head = f"no rows left: all {n} rows fail validation: "
    else:
        head = (
            f"{n_bad} of {n} rows ({n_bad / n:.0%}) fail validation, more than "
            f"data.validation.max_quarantine_fraction={ceiling:g} allows: "
        )
    return head + "; ".join(p.summary() for p in worst) + more


def validate_frame(frame: pd.DataFrame, contract: Contract) -> dict[str, Any]:
    """Check that features are present, numeric and finite; raise DataError on the first problem.

    The strict check for a batch about to be encoded. ``validation.validate_batch`` is the
    policy-driven one that can quarantine bad rows instead.
    """
    check_features(frame, contract)
    return {"rows": len(frame), "columns": len(contract.feature_columns)}
