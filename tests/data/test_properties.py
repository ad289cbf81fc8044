"""Property-based: malformed files and frames never give a traceback.

Whatever hypothesis generates, ``sae-pipeline ingest`` either exits 2 with one line that names
the problem (and writes nothing), or exits 0 having accounted for every row: rows in = rows
accepted + rows quarantined, with a quarantine file holding a reason for each quarantined row.
"""

import csv
import io
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ingest_helpers import (
    ERROR_PREFIX,
    assert_accounted,
    assert_one_line_error,
    clean_frame,
    run_ingest,
    write_csv,
)

SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Mostly good values, so that most examples get past the file checks to the row checks.
GOOD = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
CELLS = st.one_of(
    GOOD,
    GOOD,
    GOOD,
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["", "abc", "1.5", " 7 ", "inf", "-inf", "nan", "NULL", "1e999", "é", "1,5", "0x1F", "True"]
    ),
    st.none(),
)
NAMES = st.lists(
    st.sampled_from(["a", "b", "c", "target", "id", "x y", "é"]),
    min_size=1,
    max_size=5,
    unique=True,
)
SOMETIMES = st.sampled_from([False, False, False, False, True])
POLICIES = st.fixed_dictionaries(
    {
        "non_numeric": st.sampled_from(["reject", "quarantine"]),
        "missing_values": st.sampled_from(["reject", "quarantine"]),
        "infinite_values": st.sampled_from(["reject", "quarantine"]),
        "out_of_range": st.sampled_from(["reject", "quarantine", "accept"]),
        "extra_columns": st.sampled_from(["reject", "ignore"]),
        "column_order": st.sampled_from(["reject", "reorder"]),
        "max_quarantine_fraction": st.sampled_from([0.0, 0.5, 1.0, 1.0]),
    }
)


def policy_args(policies: dict) -> list[str]:
    return [a for k, v in policies.items() for a in ("--set", f"data.validation.{k}={v}")]


def check_outcome(result, source: str, names: list[str], rows: int | None) -> None:
    """The property: a one-line error that names something, or every row accounted for."""
    assert result.rc in (0, 2), result.err
    if result.rc == 2:
        message = assert_one_line_error(result)
        rest = message.replace(source, "")
        # a damaged file can show other column names than were written: any quoted name counts
        named = (
            source in message
            or any(repr(str(n)) in message for n in names)
            or re.search(r"'[^']+'", message) is not None
            or re.search(r"\d", rest) is not None
        )
        assert named, f"the error names no column, count, value or file: {message}"
        return
    assert ERROR_PREFIX not in result.err
    m = assert_accounted(result)
    if rows is not None:
        assert m["rows_in"] == rows
    snap = result.snapshot()
    features = m["contract"]["feature_columns"]
    assert np.isfinite(snap[features].to_numpy(dtype=np.float64)).all()


# ---- malformed files --------------------------------------------------------------------------
def csv_bytes(names: list[str], cells: list[list]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(names)
    writer.writerows([["" if v is None else v for v in row] for row in cells])
    return buf.getvalue().encode()


def parquet_bytes(names: list[str], cells: list[list]) -> bytes:
    arrays = []
    for j in range(len(names)):
        column = [row[j] for row in cells]
        if all(v is None or isinstance(v, int | float) for v in column):
            arrays.append(pa.array([None if v is None else float(v) for v in column], pa.float64()))
        else:
            arrays.append(pa.array([None if v is None else str(v) for v in column], pa.string()))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, names=names), buf)  # duplicate names allowed
    return buf.getvalue()


def damage(data: bytes, kind: str, where: float) -> bytes:
    cut = int(len(data) * where)
    if kind == "truncate":
        return data[:cut]
    if kind == "flip":
        return data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1 :] if cut < len(data) else data
    if kind == "latin1":
        return data[:cut] + b"\xe9" + data[cut:]
    if kind == "empty":
        return b""
    if kind == "ragged":
        return data.rstrip(b"\n") + b",1,2\n"
    return data


@st.composite
def malformed_files(draw):
    names = draw(NAMES)
    if draw(SOMETIMES):
        names.append(names[0])  # a duplicate name
    rows = 0 if draw(SOMETIMES) else draw(st.integers(1, 10))
    cells = [[draw(CELLS) for _ in names] for _ in range(rows)]
    kind = draw(st.sampled_from(["csv", "parquet"]))
    harms = ["truncate", "flip", "latin1", "empty", "ragged"] if kind == "csv" else ["truncate"]
    harm = draw(st.sampled_from(["none"] * 5 + harms + ["flip", "empty"] * (kind == "parquet")))
    data = csv_bytes(names, cells) if kind == "csv" else parquet_bytes(names, cells)
    return names, rows, kind, harm, damage(data, harm, draw(st.floats(0.0, 0.999)))


@SETTINGS
@given(spec=malformed_files(), policies=POLICIES, use_id=st.booleans())
def test_malformed_files_give_an_error_or_a_quarantine(spec, policies, use_id):
    names, rows, kind, harm, data = spec
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"batch.{kind}"
        source.write_bytes(data)
        args = policy_args(policies)
        if use_id and "id" in names:
            args += ["--id-column", "id"]
        result = run_ingest(source, Path(tmp) / "out", *args)
        check_outcome(result, str(source), names, rows if harm == "none" else None)


# ---- malformed batches against a recorded contract --------------------------------------------
@pytest.fixture(scope="module")
def contract_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    result = run_ingest(write_csv(clean_frame(), tmp / "train.csv"), tmp / "train")
    assert_accounted(result)
    return str(tmp / "train" / "manifest.json")


@st.composite
def malformed_batches(draw):
    frame = clean_frame(n=draw(st.integers(1, 12)), seed=draw(st.integers(0, 5))).astype(object)
    for _ in range(draw(st.integers(0, 4))):  # cells replaced, most often by a bad value
        row = draw(st.integers(0, len(frame) - 1))
        col = draw(st.sampled_from(list(frame.columns)))
        frame.iloc[row, frame.columns.get_loc(col)] = draw(
            st.one_of(CELLS, st.sampled_from([1e6, -1e6, 50.0, np.nan, "x"]))
        )
    if draw(SOMETIMES):
        frame = frame.drop(columns=draw(st.sampled_from(["a", "b", "c", "target"])))
    if draw(SOMETIMES):
        frame["extra"] = 1.0
    if draw(SOMETIMES):
        frame = frame[draw(st.permutations(list(frame.columns)))]
    names = [str(c) for c in frame.columns]
    if draw(SOMETIMES) and len(names) > 1:
        names[-1] = names[0]  # a duplicate name
    if draw(SOMETIMES):
        frame = frame.iloc[:0]
    return names, frame


@SETTINGS
@given(batch=malformed_batches(), policies=POLICIES, as_parquet=st.booleans())
def test_batches_against_a_contract_give_an_error_or_a_quarantine(
    contract_path, batch, policies, as_parquet
):
    names, frame = batch
    cells = frame.to_numpy().tolist()
    with tempfile.TemporaryDirectory() as tmp:
        kind = "parquet" if as_parquet else "csv"
        source = Path(tmp) / f"batch.{kind}"
        builder = parquet_bytes if as_parquet else csv_bytes
        source.write_bytes(builder(names, cells))
        args = [*policy_args(policies), "--contract", contract_path]
        result = run_ingest(source, Path(tmp) / "out", *args)
        check_outcome(result, str(source), names, len(frame))
        if result.rc == 0:
            assert list(result.snapshot().columns) == [
                c for c in ("a", "b", "c", "target") if c in names
            ]
