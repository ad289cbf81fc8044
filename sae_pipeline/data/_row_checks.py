"""Row checks of a batch, one chunk of rows at a time: pure functions on frames, no I/O.

``validation.validate_batch`` (a whole frame in memory) and ``_stream_validation`` (a Parquet
source chunk by chunk) share them, so both paths find the same problems and say so in the same
words. Row numbers count data rows from 0 over the whole batch: a chunk's problems carry the
chunk's ``offset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.data.contract import Contract
from sae_pipeline.errors import DataError

# Problem kind -> (the data.validation field that decides it, what one bad value is called)
KINDS = {
    "non_numeric": ("non_numeric", "non-numeric value"),
    "missing": ("missing_values", "missing value"),
    "infinite": ("infinite_values", "infinite value"),
    "out_of_range": ("out_of_range", "value"),
    "duplicate_id": ("duplicate_ids", "repeated value"),
}
# Text that means "no value" rather than "not a number".
_NA_TEXT = {"", "nan", "na", "n/a", "null", "none", "<na>"}


@dataclass
class RowProblem:
    """One kind of problem in one column: which rows have it, and how to say so."""

    kind: str
    column: str
    role: str  # "column", "label" or "id"
    mask: np.ndarray  # (rows,) bool
    values: pd.Series  # the column as given, for the messages
    note: str = ""  # e.g. " far outside the training range [0, 16]"
    first_seen: dict[Any, int] = field(default_factory=dict)  # repeated ids: value -> first row
    offset: int = 0  # the batch row number of the chunk's first row

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    @property
    def where(self) -> str:
        return f"{self.role} {self.column!r}"

    @property
    def policy_field(self) -> str:
        return KINDS[self.kind][0]

    def row_reason(self, i: int) -> str:
        """Why row ``i`` is quarantined, for the quarantine file."""
        if self.kind == "missing":
            return f"{self.where}: missing value"
        value = self.values.iloc[i]
        if self.kind == "duplicate_id":
            first = self.first_seen.get(value)
            return f"{self.where}: repeated value {show(value)} (first at row {first})"
        return f"{self.where}: {KINDS[self.kind][1]} {show(value)}{self.note}"

    def summary(self, total: int | None = None) -> str:
        """One line: where, how many (``total``: over every chunk), and the first example."""
        first = int(np.flatnonzero(self.mask)[0])
        example = "" if self.kind == "missing" else f" {show(self.values.iloc[first])}"
        count = self.count if total is None else total
        return (
            f"{self.where} has {count} {KINDS[self.kind][1]}(s){self.note}, "
            f"e.g.{example} at row {first + self.offset}"
        )


# ---- row checks -------------------------------------------------------------------------------
def feature_problems(
    values: pd.Series, col: str, limits: list[float] | None, tolerance: float, whole: bool = True
) -> tuple[np.ndarray, list[RowProblem]]:
    """The column as float64 (NaN where no number), and its row problems.

    ``whole``: these are all the column's values, so a column without a single number fails
    here; a chunk of a streamed batch leaves that check to the end of the stream.
    """
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype) or (
        pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype)
    ):
        num = values.to_numpy(dtype=np.float64, na_value=np.nan)
        non_numeric = np.zeros(len(values), dtype=bool)
    elif pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
        num, non_numeric = parse_numbers(values)
    else:
        raise DataError(f"column {col!r} has type {dtype}, not a number")
    missing = np.isnan(num) & ~non_numeric
    if whole and (missing | non_numeric).all():
        example = values.iloc[int(np.flatnonzero(non_numeric)[0])] if non_numeric.any() else None
        raise no_number_error(col, len(values), non_numeric.any(), example)
    problems = [
        RowProblem("non_numeric", col, "column", non_numeric, values),
        RowProblem("missing", col, "column", missing, values),
        RowProblem("infinite", col, "column", np.isinf(num), values),
    ]
    if limits is not None:
        lo, hi = float(limits[0]), float(limits[1])
        # "Far" is measured in training ranges; a constant training column gets a unit range.
        span = hi - lo if hi > lo else max(abs(hi), 1.0)
        with np.errstate(invalid="ignore"):
            far = np.isfinite(num) & ((num < lo - tolerance * span) | (num > hi + tolerance * span))
        problems.append(
            RowProblem(
                "out_of_range",
                col,
                "column",
                far,
                values,
                f" far outside the training range [{lo:g}, {hi:g}]",
            )
        )
    return num, problems


def no_number_error(col: str, n: int, non_numeric: bool, example: Any) -> DataError:
    """A feature column in which none of the ``n`` values is a number."""
    if non_numeric:
        return DataError(
            f"column {col!r} is not numeric: none of its {n} value(s) is a number, "
            f"e.g. {show(example)}"
        )
    return DataError(f"column {col!r} has no values: all {n} row(s) are empty")


def parse_numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Numbers in a text/object column: (float64 values, mask of values that are no number)."""
    try:
        num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError, OverflowError):
        num = np.array([_to_float(v) for v in values], dtype=np.float64)
    # pandas parses text to the nearest float or not, depending on the rest of the column
    # ("-9223372036854775808" among numbers only, or next to a word): each number written as
    # text is parsed on its own, so a value does not depend on its chunk.
    text = np.array([isinstance(v, str) for v in values], dtype=bool) & ~np.isnan(num)
    if text.any():
        num[text] = [_to_float(v) for v in values.to_numpy()[text]]
    given = values.notna().to_numpy()
    na_text = np.array(
        [isinstance(v, str) and v.strip().lower() in _NA_TEXT for v in values], dtype=bool
    )
    return num, np.isnan(num) & given & ~na_text


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return float("nan")


def label_and_id_problems(frame: pd.DataFrame, contract: Contract) -> list[RowProblem]:
    problems = []
    label = contract.label_column
    if label is not None and label in frame.columns:
        values = frame[label]
        problems.append(RowProblem("missing", label, "label", values.isna().to_numpy(), values))
    ident = contract.id_column
    if ident is not None and ident in frame.columns:
        values = frame[ident]
        problems.append(RowProblem("missing", ident, "id", values.isna().to_numpy(), values))
    return problems


def show(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    text = f"{value:g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def names_of(columns: Any, limit: int = 8) -> str:
    names = [repr(str(c)) for c in columns]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def valid_rows(n: int, problems: list[RowProblem]) -> np.ndarray:
    """The rows (boolean mask of length ``n``) that none of ``problems`` flagged."""
    valid = np.ones(n, dtype=bool)
    for p in problems:
        valid &= ~p.mask
    return valid
