"""Request bodies to frames and frames to answers, for the encoder service (``serving.py``).

Bodies: JSON (MLflow's ``dataframe_split``, ``dataframe_records``, ``instances`` and ``inputs``,
with ``params``), CSV, Parquet and Arrow IPC stream. Answers: JSON (MLflow's
``{"predictions": [records]}``), CSV and Arrow IPC stream. Every parse error is a
``RequestError``: a status and a one-line message that never holds the request's data.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
ARROW = "application/vnd.apache.arrow.stream"
CONTENT_TYPES = (JSON, CSV, PARQUET, ARROW)
JSON_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


class RequestError(Exception):
    """A request the service refuses: HTTP ``status`` with ``message`` (no request data)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def bad(message: str) -> RequestError:
    return RequestError(400, message)


def too_many_rows(rows: int, limit: int) -> RequestError:
    return RequestError(
        413, f"request has {rows} rows; the limit is {limit} (SAE_SERVE_MAX_ROWS): split it"
    )


# ---- bodies -------------------------------------------------------------------------------------
def parse(kind: str, body: bytes, max_rows: int) -> tuple[pd.DataFrame, dict]:
    """(frame, params) of a body of content type ``kind``; 413 past ``max_rows`` rows."""
    if kind == JSON:
        frame, params = _json(body, max_rows)
    elif kind == CSV:
        frame, params = _csv(body), {}
    else:
        frame, params = _arrow(body, parquet=kind == PARQUET), {}
    if len(frame) > max_rows:
        raise too_many_rows(len(frame), max_rows)
    return frame, params


def _json(body: bytes, max_rows: int) -> tuple[pd.DataFrame, dict]:
    try:
        doc = orjson.loads(body)  # nesting past 1024 and numbers past float64: errors
    except orjson.JSONDecodeError as err:
        reason = str(err).split(":")[0]  # "depth limit exceeded", never the text around it
        raise bad(f"the body is not valid JSON ({reason})") from None
    if not isinstance(doc, dict):
        raise bad(f"the JSON body must be an object with one of {', '.join(JSON_FORMATS)}")
    keys = [k for k in JSON_FORMATS if k in doc]
    if len(keys) != 1 or set(doc) - {keys[0], "params"}:
        raise bad(f"the JSON body must have exactly one of {', '.join(JSON_FORMATS)} (and params)")
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise bad(f"params must be an object, got {_kind(params)}")
    data = doc[keys[0]]
    if isinstance(data, list) and len(data) > max_rows:
        raise too_many_rows(len(data), max_rows)
    if keys[0] == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise bad("dataframe_split must be an object with columns and data (a list of rows)")
        columns = data.get("columns")
        if len(data["data"]) > max_rows:
            raise too_many_rows(len(data["data"]), max_rows)
        return _rows(data["data"], columns, body, "dataframe_split"), params
    if isinstance(data, dict):  # instances/inputs as columns: {"pixel_0": [...], ...}
        lengths = {len(v) if isinstance(v, list) else 1 for v in data.values()}
        if len(lengths) > 1:
            raise bad(f"{keys[0]}: the columns have different lengths")
        if max(lengths, default=0) > max_rows:
            raise too_many_rows(max(lengths), max_rows)
        return _frame(lambda: pd.DataFrame(data)), params
    if not isinstance(data, list):
        raise bad(f"{keys[0]} must be a list of rows, got {_kind(data)}")
    if data and all(isinstance(r, dict) for r in data):
        return _frame(lambda: pd.DataFrame.from_records(data)), params
    if keys[0] == "dataframe_records":
        raise bad("dataframe_records must be a list of objects (column -> value)")
    return _rows(data, None, body, keys[0]), params


def _rows(data: list, columns: Any, body: bytes, where: str) -> pd.DataFrame:
    """A list of rows (lists) as a frame; the first row of another width is named."""
    if columns is not None and (
        not isinstance(columns, list) or not all(isinstance(c, (str, int)) for c in columns)
    ):
        raise bad(f"{where}: columns must be a list of names")
    width = len(columns) if columns is not None else (len(data[0]) if data else 0)
    for i, row in enumerate(data):
        if not isinstance(row, list) or len(row) != width:
            got = f"{len(row)} values" if isinstance(row, list) else _kind(row)
            raise bad(f"{where}: row {i} has {got}; expected {width} (one per column)")
    if b"true" not in body and b"false" not in body:  # booleans would pass as 1.0/0.0
        try:  # the fast path: numbers only
            x = np.array(data, dtype=np.float64).reshape(len(data), width)
            return pd.DataFrame(x, columns=columns)
        except (ValueError, TypeError, OverflowError):
            pass  # text cells: the model names them
    return _frame(lambda: pd.DataFrame(data, columns=columns))


def _frame(build) -> pd.DataFrame:
    try:
        return build()
    except (ValueError, TypeError, OverflowError):
        raise bad("the JSON rows do not form a table of feature columns") from None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a scalar")


def _csv(body: bytes) -> pd.DataFrame:
    import pyarrow.csv as pcsv

    if not body.strip():
        raise bad("the CSV body is empty: a header line and rows are needed")
    try:
        table = pcsv.read_csv(pa.py_buffer(body), read_options=pcsv.ReadOptions(block_size=1 << 22))
    except pa.ArrowInvalid:
        raise bad(_csv_problem(body)) from None
    return table.to_pandas()


def _csv_problem(body: bytes) -> str:
    """What is wrong with a CSV body pyarrow refused: the first row whose width differs."""
    try:
        reader = csv.reader(io.StringIO(body.decode("utf-8"), newline=""))
        header = next(reader)
        for row, fields in enumerate(r for r in reader if r):  # pyarrow skips empty lines
            if len(fields) != len(header):
                return (
                    f"CSV row {row} has {len(fields)} fields; the header has {len(header)} "
                    "(rows count from 0 after the header)"
                )
    except (UnicodeDecodeError, csv.Error, StopIteration):
        return "the body is not UTF-8 CSV with a header line"
    return "the body is not CSV with a header line and rows of its width"


def _arrow(body: bytes, parquet: bool) -> pd.DataFrame:
    try:
        if parquet:
            import pyarrow.parquet as pq

            table = pq.read_table(pa.BufferReader(body))
        else:  # the buffer is read in place: the columns point into the body
            table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
        return table.to_pandas()
    except (pa.ArrowException, OSError, ValueError):
        what = "Parquet" if parquet else "an Arrow IPC stream"
        raise bad(f"the body is not {what}") from None


# ---- answers ------------------------------------------------------------------------------------
def answer_kind(request_kind: str, accept: str | None) -> str:
    """JSON unless ``Accept`` asks for CSV or Arrow; an Arrow request gets Arrow by default."""
    accept = (accept or "").lower()
    for kind in (ARROW, CSV, JSON):
        if kind in accept:
            return kind
    return ARROW if request_kind == ARROW else JSON


def encode(kind: str, out: pd.DataFrame) -> bytes:
    """The answer body of the model's output frame."""
    if kind == ARROW:
        table = pa.Table.from_pandas(out, preserve_index=False)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()
    if kind == CSV:
        import pyarrow.csv as pcsv

        sink = pa.BufferOutputStream()
        pcsv.write_csv(pa.Table.from_pandas(out, preserve_index=False), sink)
        return sink.getvalue().to_pybytes()
    # MLflow's answer, {"predictions": [{column: value}, ...]}, built column-wise: one tolist
    # per column instead of a Python-level encoder per value (the exact float64 of each value)
    names = [str(c) for c in out.columns]
    rows = zip(*(out[c].to_numpy().tolist() for c in out.columns), strict=True)
    return orjson.dumps({"predictions": [dict(zip(names, r, strict=True)) for r in rows]})
