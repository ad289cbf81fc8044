"""Validating a batch chunk by chunk: the policies of ``validation.validate_batch``, streamed.

``StreamValidator.check`` takes one chunk of rows (its first row's number in the batch as
``offset``) and returns the chunk's accepted rows and its quarantined rows with their reasons;
``finish`` applies what needs every row (a column without a single number, the quarantine
ceiling, constant columns, the recorded training ranges) and returns the outcome. The same row
checks as in memory (``_row_checks``), so both paths accept, quarantine and word the same.

Memory: one chunk, plus per feature a few numbers, plus, only when there is an id column, the
ids seen so far as sorted 64-bit keys with their first row (``SeenIds``: 16 bytes per id).
A ``reject`` policy fails on the first chunk that has the problem; its message counts that
chunk's rows with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.config import DataConfig
from sae_pipeline.data._row_checks import (
    RowProblem,
    feature_problems,
    label_and_id_problems,
    names_of,
    no_number_error,
    valid_rows,
)
from sae_pipeline.data.contract import Contract, infer_contract
from sae_pipeline.data.validation import (
    _accepted,
    _check_shape,
    _match_columns,
    _too_many_message,
)
from sae_pipeline.errors import DataError


class SeenIds:
    """The ids seen so far, without a Python set: sorted uint64 keys and each one's first row.

    Integer ids are their own key (exact). Other ids (text) are keyed by a 64-bit hash: two
    different ids share a key with probability about n**2 / 2**65 (1e-5 at 16 million ids),
    and the later one would be quarantined as a repeat. Keys are kept in sorted runs merged
    like a binary counter, so adding n ids costs O(n log^2 n) and looking up O(log^2 n) each.
    """

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, first rows)

    @staticmethod
    def keys(values: pd.Series) -> np.ndarray:
        if pd.api.types.is_unsigned_integer_dtype(values.dtype):
            return values.to_numpy(dtype=np.uint64, na_value=0)
        if pd.api.types.is_integer_dtype(values.dtype):
            return values.to_numpy(dtype=np.int64, na_value=0).view(np.uint64)
        return pd.util.hash_pandas_object(values, index=False).to_numpy()

    def first_rows(self, keys: np.ndarray) -> np.ndarray:
        """The first row of each key seen before, -1 for keys not seen."""
        out = np.full(len(keys), -1, dtype=np.int64)
        for run_keys, run_rows in self.runs:
            at = np.searchsorted(run_keys, keys)
            hit = at < len(run_keys)
            hit[hit] = run_keys[at[hit]] == keys[hit]
            out[hit] = run_rows[at[hit]]
        return out

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        run = (keys[order], rows[order])
        while self.runs and len(self.runs[-1][0]) <= len(run[0]):
            k, r = self.runs.pop()
            keys_, rows_ = np.concatenate([k, run[0]]), np.concatenate([r, run[1]])
            order = np.argsort(keys_, kind="stable")
            run = (keys_[order], rows_[order])
        self.runs.append(run)


@dataclass
class _Tally:
    """One kind of problem in one column over every chunk: its first chunk's problem, and
    the total count (what ``_too_many_message`` and the manifest need)."""

    first: RowProblem
    count: int

    def summary(self) -> str:
        return self.first.summary(self.count)


class StreamValidator:
    """The policies of ``validate_batch``, applied to a batch of ``rows_in`` rows in chunks."""

    def __init__(self, cfg: DataConfig, contract: Contract | None, rows_in: int):
        self.cfg, self.policy, self.contract = cfg, cfg.validation, contract
        self.inferred = contract is None
        self.rows_in = rows_in
        self.warnings: list[str] = []
        self.dropped: list[str] = []
        self.tallies: dict[tuple[str, str, str], _Tally] = {}
        self.rows_bad = 0
        self.seen_ids = SeenIds()
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.has_number: dict[str, bool] = {}
        self.no_number_example: dict[str, Any] = {}
        self.dtypes: dict[str, str] = {}
        self.started = False

    def _start(self, frame: pd.DataFrame) -> None:
        if self.contract is None:
            self.contract = infer_contract(frame, self.cfg)
            self.dropped = [c for c in frame.columns if c not in self.contract.columns]
        else:
            self.dropped = _match_columns(frame, self.contract, self.policy, self.warnings)
            label = self.contract.label_column
            if label is not None and label not in frame.columns:
                self.contract = replace(self.contract, label_column=None)
        self.has_number = {c: False for c in self.contract.feature_columns}
        self.started = True

    def check(self, frame: pd.DataFrame, offset: int) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
        """(accepted rows, chunk positions of the quarantined rows, their reasons)."""
        frame = _check_shape(frame)
        if not self.started:
            self._start(frame)
        contract, policy = self.contract, self.policy
        ranges = None
        if not self.inferred and policy.out_of_range != "accept":
            ranges = contract.feature_ranges
        numeric: dict[str, np.ndarray] = {}
        problems: list[RowProblem] = []
        for col in contract.feature_columns:
            limits = ranges.get(col) if ranges else None
            numeric[col], found = feature_problems(
                frame[col], col, limits, policy.range_tolerance, whole=False
            )
            self._note_numbers(col, numeric[col], found)
            problems += found
        problems += label_and_id_problems(frame, contract)
        problems = [p for p in problems if p.count]
        repeated = self._repeated_ids(frame, problems, offset)
        problems += [repeated] if repeated is not None and repeated.count else []
        for p in problems:
            p.offset = offset
            if getattr(policy, p.policy_field) == "reject":
                raise DataError(
                    f"{p.summary()}; {self.rows_in} rows in "
                    f"(data.validation.{p.policy_field} is 'reject')"
                )
            key = (p.kind, p.column, p.role)
            if key in self.tallies:
                self.tallies[key].count += p.count
            else:
                self.tallies[key] = _Tally(p, p.count)
        bad = np.zeros(len(frame), dtype=bool)
        for p in problems:
            bad |= p.mask
        self.rows_bad += int(bad.sum())
        accepted = _accepted(frame, contract, numeric, ~bad)
        self._note_ranges(accepted)
        rows = np.flatnonzero(bad)
        reasons = {int(i): [] for i in rows}
        for p in problems:
            for i in np.flatnonzero(p.mask):
                reasons[int(i)].append(p.row_reason(int(i)))
        return accepted, rows, ["; ".join(reasons[int(i)]) for i in rows]

    def _note_numbers(self, col: str, num: np.ndarray, found: list[RowProblem]) -> None:
        if self.has_number[col]:
            return
        non_numeric = found[0].mask
        if not np.isnan(num).all():  # an infinite value counts, as it does in memory
            self.has_number[col] = True
        elif non_numeric.any() and col not in self.no_number_example:
            self.no_number_example[col] = found[0].values.iloc[int(np.flatnonzero(non_numeric)[0])]

    def _note_ranges(self, accepted: pd.DataFrame) -> None:
        for col in self.contract.feature_columns:
            self.dtypes.setdefault(col, str(accepted[col].dtype))
            if not len(accepted):
                continue
            x = accepted[col].to_numpy(dtype=np.float64)
            self.lo[col] = min(self.lo.get(col, np.inf), float(x.min()))
            self.hi[col] = max(self.hi.get(col, -np.inf), float(x.max()))

    def _repeated_ids(
        self, frame: pd.DataFrame, problems: list[RowProblem], offset: int
    ) -> RowProblem | None:
        """Rows whose id an earlier valid row has, in this chunk or an earlier one."""
        ident = self.contract.id_column
        if ident is None or ident not in frame.columns:
            return None
        values = frame[ident]
        valid = valid_rows(len(frame), problems)
        where = np.flatnonzero(valid)
        keys = SeenIds.keys(values.iloc[where])
        rows = where + offset
        before = self.seen_ids.first_rows(keys)
        uniq, first_at = np.unique(keys, return_index=True)
        first_here = rows[first_at[np.searchsorted(uniq, keys)]]
        first = np.where(before >= 0, before, first_here)
        again = first != rows
        new = before[first_at] < 0
        self.seen_ids.add(uniq[new], rows[first_at][new])
        repeated = np.zeros(len(frame), dtype=bool)
        repeated[where[again]] = True
        pairs = zip(where[again], first[again], strict=True)
        first_seen = {values.iloc[i]: int(f) for i, f in pairs}
        return RowProblem("duplicate_id", ident, "id", repeated, values, "", first_seen)

    def _order(self, tally: _Tally) -> tuple[int, int, int]:
        """validate_batch's order: each feature's problems, then label, id, repeated ids."""
        p, features = tally.first, self.contract.feature_columns
        kinds = ("non_numeric", "missing", "infinite", "out_of_range", "duplicate_id")
        if p.role == "column":
            return (0, features.index(p.column), kinds.index(p.kind))
        return ({"label": 1, "id": 2}[p.role] + (p.kind == "duplicate_id"), 0, 0)

    def finish(self) -> dict[str, Any]:
        """Checks over every row; the batch's contract, counts, problems and warnings."""
        if not self.started:
            raise DataError(f"the data has a header but no rows ({self.rows_in} rows in)")
        n = self.rows_in
        for col, seen in self.has_number.items():
            if not seen:
                example = self.no_number_example.get(col)
                raise no_number_error(col, n, col in self.no_number_example, example)
        # In the order validate_batch finds them (not the order chunks showed them in).
        tallies = sorted(self.tallies.values(), key=self._order)
        ceiling = self.policy.max_quarantine_fraction
        if self.rows_bad == n or self.rows_bad / n > ceiling:
            raise DataError(_too_many_message(tallies, self.rows_bad, n, ceiling))
        accepted = n - self.rows_bad
        constant = [c for c in self.contract.feature_columns if self.lo[c] == self.hi[c]]
        if accepted >= 2 and constant:
            message = (
                f"{len(constant)} constant feature column(s), one value in all {accepted} "
                f"accepted rows: {names_of(constant)}"
            )
            if self.policy.constant_columns == "reject":
                raise DataError(f"{message} (data.validation.constant_columns is 'reject')")
            self.warnings.append(message)
        contract = self.contract
        if self.inferred:
            ranges = {c: [self.lo[c], self.hi[c]] for c in contract.feature_columns}
            contract = Contract(
                list(contract.feature_columns),
                dict(self.dtypes),
                contract.label_column,
                contract.id_column,
                ranges,
            )
        return {
            "contract": contract,
            "counts": {"rows_in": n, "rows_accepted": accepted, "rows_quarantined": self.rows_bad},
            "problems": [
                {
                    "problem": t.first.kind,
                    "column": t.first.column,
                    "role": t.first.role,
                    "rows": t.count,
                    "message": t.summary(),
                }
                for t in tallies
            ],
            "warnings": self.warnings,
            "dropped_columns": self.dropped,
        }
