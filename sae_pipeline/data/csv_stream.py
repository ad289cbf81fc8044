"""A CSV source read a chunk at a time, with the values and errors of ``sources.read_csv``.

What ingest streams when a CSV is too large to read whole (``data.in_memory_max_bytes``): one
pass finds every column's type over the whole file and raises ``read_csv``'s errors, a second
reads the chunks with those types fixed.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.data._paths import file_stamp
from sae_pipeline.data.sources import (
    _compression,
    _exists,
    _first_line,
    _fs,
    check_unique_names,
)
from sae_pipeline.errors import DataError

CSV_SAMPLE_BYTES = 2**20  # read on opening a CsvStream, to estimate its size
# A compressed CSV's text is estimated at its byte size times this (numeric text compresses
# about 3 to 5 times with gzip); only the in-memory-or-stream decision depends on it.
CSV_COMPRESSION_RATIO = 4
_BLOCK = 2**20

# A column's type over the whole file, as pandas infers it (see _whole_kind): the dtype it is
# read as, and its Arrow type. "boolna" is booleans with a blank: True, False, NaN as objects.
_KINDS = {
    "int": ("int64", "int64"),
    "uint": ("uint64", "uint64"),
    "float": ("float64", "float64"),
    "bool": ("bool", "bool_"),
    "boolna": ("boolean", "bool_"),
    "text": (object, "string"),
}


class CsvStream:
    """A CSV source read ``chunk_rows`` rows at a time, with the values and errors of ``read_csv``.

    Opening it reads only the first MiB, for ``nbytes``: an estimate (rows from the file's
    byte size and the sample's mean line length; a compressed file's size times
    ``CSV_COMPRESSION_RATIO``) until the file has been scanned. The first use of ``rows``,
    ``columns`` or ``chunks`` scans the whole file in chunks, raising the ``DataError`` that
    ``read_csv`` would (empty, not UTF-8, unreadable or repeated header names, an unparseable
    row), and infers each column's type over all of its values with pandas' rules (an
    integer column with a blank cell anywhere is float64, one with text anywhere is text).
    ``chunks`` then reads the file again with those types fixed, so a chunk's types never
    depend on where chunks end and the rows equal ``read_csv``'s. Memory is bounded by one
    chunk; the cost is a second parse of the file. gzip, bz2 and zstd files are decompressed
    as they are read.
    """

    def __init__(self, source: str, chunk_rows: int = 65_536, id_column: str | None = None):
        self.source, self.chunk_rows, self.id_column = source, chunk_rows, id_column
        fs, path = _fs(source)
        if not _exists(fs, path):
            raise DataError(f"data source not found: {source}")
        if fs.isdir(path):
            raise DataError(f"CSV source {source} is a folder, not a file")
        self.file_bytes = int(fs.size(path) or 0)
        self._fs, self._path, self._stamp = fs, path, file_stamp(fs, path)
        self.compressed = _compression(source) is not None
        with self._open() as fh:
            sample = self._read(fh, CSV_SAMPLE_BYTES)
            whole = len(sample) < CSV_SAMPLE_BYTES or not self._read(fh, 1)
        text_bytes = (
            len(sample)
            if whole
            else self.file_bytes * (CSV_COMPRESSION_RATIO if self.compressed else 1)
        )
        lines = sample.splitlines()
        header = next((line for line in lines if line.strip()), b"")
        self.estimated_columns = len(next(csv.reader([header.decode("utf-8", "replace")]), []))
        line_bytes = len(sample) / max(len(lines), 1)
        self.estimated_rows = max(round(text_bytes / line_bytes) - 1, 0) if lines else 0
        self._rows: int | None = None
        self._columns: list[str] | None = None
        self._kinds: dict[str, str] = {}

    @property
    def nbytes(self) -> int:
        """What the source takes in memory as a frame of float64s: rows x columns x 8
        (estimated until the file has been scanned)."""
        if self._rows is None:
            return self.estimated_rows * self.estimated_columns * 8
        return self._rows * len(self._columns or []) * 8

    @property
    def rows(self) -> int:
        self._scan()
        return self._rows

    @property
    def columns(self) -> list[str]:
        self._scan()
        return self._columns

    def chunks(self) -> Iterator[tuple[Any, pd.DataFrame]]:
        """(Arrow table, frame) of each chunk: the frame as ``read_csv`` reads those rows."""
        import pyarrow as pa

        self._scan()
        kinds = dict(self._kinds)
        if self.id_column in kinds:
            kinds[self.id_column] = "text"  # as read_csv: ids as written ("007")
        dtypes = {c: _KINDS[k][0] for c, k in kinds.items()}
        if self.id_column in kinds:
            dtypes[self.id_column] = str
        schema = pa.schema([(c, getattr(pa, _KINDS[k][1])()) for c, k in kinds.items()])
        if self._rows == 0:  # a header and no rows: one empty chunk, for the validator to name
            frame = pd.DataFrame({c: pd.Series(dtype=object) for c in self._columns})
            yield pa.Table.from_pandas(frame, preserve_index=False), frame
            return
        rows = 0
        for frame in self._pandas_chunks(dtypes):
            frame.columns = self._columns
            for c, k in kinds.items():
                if k == "boolna":
                    frame[c] = frame[c].astype(object).where(frame[c].notna(), np.nan)
            rows += len(frame)
            yield pa.Table.from_pandas(frame, schema=schema, preserve_index=False), frame
        if rows != self._rows or file_stamp(self._fs, self._path) != self._stamp:
            raise DataError(
                f"CSV {self.source} changed while it was read ({self._rows} rows when opened, "
                f"{rows} read)"
            )

    # ---- the scan ------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Check the file as ``read_csv`` does, count its rows and infer its column types."""
        if self._rows is not None:
            return
        self._check_bytes()
        try:
            with self._open() as fh:
                header = pd.read_csv(
                    fh, header=None, nrows=1, dtype=str, keep_default_na=False, encoding="utf-8-sig"
                )
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
            raise DataError(
                f"CSV {self.source} has an unreadable header: {_first_line(err)}"
            ) from None
        check_unique_names(header.iloc[0].tolist() if len(header) else [], f"CSV {self.source}")
        first: dict[str, dict[str, int]] = {}  # per column, the first row of each chunk type
        negative: set[str] = set()
        rows, columns = 0, None
        for frame in self._pandas_chunks({self.id_column: str} if self.id_column else None):
            columns = columns or check_unique_names(frame.columns, f"CSV {self.source}")
            for col, values in zip(columns, frame.columns, strict=True):
                kind = _chunk_kind(frame[values])
                if kind == "int" and frame[values].min() < 0:
                    negative.add(col)
                first.setdefault(col, {}).setdefault(kind, rows)
            rows += len(frame)
        if columns is None:  # a header and no rows: pandas gives no chunk
            columns = check_unique_names(header.iloc[0].tolist(), f"CSV {self.source}")
        self._kinds = {
            col: _whole_kind(first.get(col, {"text": 0}), col in negative, col, self.source)
            for col in columns
        }
        self._rows, self._columns = rows, columns

    def _check_bytes(self) -> None:
        """Empty (only white space) or not UTF-8: the errors and wording of ``read_csv``."""
        size, lines, tail, text = 0, 0, b"", False
        with self._open() as fh:
            while block := self._read(fh, _BLOCK):
                text = text or bool(block.strip())
                data = tail + block
                try:
                    data.decode("utf-8")
                    tail = b""
                except UnicodeDecodeError as err:
                    if err.end != len(data) or err.reason != "unexpected end of data":
                        self._not_utf8(data, err.start, size - len(tail), lines)
                    tail = data[err.start :]
                lines += data[: len(data) - len(tail)].count(b"\n")
                size += len(block)
        if not text:
            raise DataError(f"CSV {self.source} is empty ({size} bytes, no header)")
        if tail:
            self._not_utf8(tail, 0, size - len(tail), lines)

    def _not_utf8(self, data: bytes, at: int, base: int, lines: int) -> None:
        line = lines + data[:at].count(b"\n") + 1
        raise DataError(
            f"CSV {self.source} is not UTF-8: byte 0x{data[at : at + 1].hex()} at line {line} "
            f"(offset {base + at}); re-save it as UTF-8"
        )

    def _pandas_chunks(self, dtype: dict | None) -> Iterator[pd.DataFrame]:
        """The file's rows in frames of ``chunk_rows``, each read as a whole (low_memory=False:
        pandas would otherwise infer types per internal block and mix them)."""
        try:
            with self._open() as fh:
                reader = pd.read_csv(
                    fh,
                    chunksize=self.chunk_rows,
                    dtype=dtype,
                    low_memory=False,
                    encoding="utf-8-sig",
                )
                with reader:
                    for frame in reader:
                        frame.index = pd.RangeIndex(len(frame))  # numbered from 0, as chunks are
                        yield frame
        except pd.errors.EmptyDataError:
            raise DataError(f"CSV {self.source} is empty (no header)") from None
        except (pd.errors.ParserError, ValueError) as err:
            raise DataError(f"CSV {self.source} cannot be parsed: {_first_line(err)}") from None
        except (OSError, EOFError) as err:
            raise DataError(f"CSV {self.source} cannot be read: {_first_line(err)}") from None

    @contextlib.contextmanager
    def _open(self):
        import fsspec

        try:
            with fsspec.open(self.source, "rb", compression="infer") as fh:
                yield fh
        except (OSError, EOFError) as err:
            raise DataError(f"CSV {self.source} cannot be read: {_first_line(err)}") from None

    def _read(self, fh, n: int) -> bytes:
        try:
            return fh.read(n)
        except (OSError, EOFError, ValueError) as err:
            raise DataError(f"CSV {self.source} cannot be read: {_first_line(err)}") from None


def _chunk_kind(values: pd.Series) -> str:
    """What pandas inferred one chunk of a column as."""
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_unsigned_integer_dtype(dtype):
        return "uint"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float" if values.notna().any() else "na"
    present = values.dropna()
    if len(present) and isinstance(present.iloc[0], bool | np.bool_):
        return "boolna"  # pandas' booleans with a blank: True, False and NaN as objects
    return "text" if len(present) else "na"


def _whole_kind(first: dict[str, int], negative: bool, col: str, source: str) -> str:
    """The type pandas infers for a column of the whole file, from its chunks' types (each
    with its first row): ints with a blank or a float are floats, booleans with a blank are
    "boolna", any other mix is text (as written)."""
    blank = "na" in first
    kinds = set(first) - {"na"}
    if not kinds:
        return "float"
    if "uint" in kinds:  # integers above 2**63 - 1
        if kinds == {"uint"} and not blank:
            return "uint"
        if kinds == {"uint", "int"} and not blank:
            return "text" if negative else "uint"
        raise DataError(
            f"CSV {source} cannot be streamed: column {col!r} holds integers above 2**63 - 1 "
            f"and, from row {max(first.values())}, other values; read it in memory "
            "(data.in_memory_max_bytes)"
        )
    if kinds <= {"int", "float"}:
        return "float" if blank or "float" in kinds else "int"
    if kinds <= {"bool", "boolna"}:
        return "boolna" if blank or "boolna" in kinds else "bool"
    return "text"
