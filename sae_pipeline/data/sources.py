"""Reading a data source into a frame: CSV, Parquet (a file or a folder of shards), a SQL query,
or one of scikit-learn's bundled datasets; local paths and fsspec URLs alike.

Every problem that stops a source from being read becomes a ``DataError`` naming the source
and what is wrong with it (not found, empty, not UTF-8, corrupt, duplicate column names).
Sources are only ever read: nothing here writes to them.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.boundary import SQL_SCHEMES
from sae_pipeline.config import DataConfig, mask_credentials
from sae_pipeline.data._exact import numpy_unless_nullable, table_to_frame
from sae_pipeline.data._paths import data_files, file_stamp
from sae_pipeline.data._schema import arrow_schema, cast_frame, common_dtypes, file_dtypes
from sae_pipeline.errors import DataError

SKLEARN_DATASETS = ("digits", "breast_cancer", "wine")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zst", ".txt")

# What pyarrow and fsspec raise on bytes that are not a readable Parquet file.
_CORRUPT = (OSError, ValueError, TypeError, KeyError, IndexError, EOFError, MemoryError)


def source_format(cfg: DataConfig) -> str:
    """The source's format: the configured one, or guessed from the source string."""
    if cfg.format != "auto":
        return cfg.format
    src = cfg.source.lower()
    if src.startswith("sklearn://"):
        return "sklearn"
    if "://" in src and src.split("://")[0].split("+")[0] in SQL_SCHEMES:
        return "sql"
    if src.rstrip("/").endswith(PARQUET_SUFFIXES) or src.endswith("/"):
        return "parquet"
    if src.endswith(CSV_SUFFIXES):
        return "csv"
    if _is_dir(cfg.source):
        return "parquet"
    raise DataError(
        f"cannot tell the format of data source {cfg.source!r}; set data.format to csv, "
        "parquet, sklearn or sql"
    )


def describe_source(source: str) -> str:
    """The source as it may be shown and recorded: passwords and secret query values masked
    (the whole password, up to the last ``@``: ``u:p@ss@db`` shows as ``u:***@db``)."""
    if "://" not in source:
        from pathlib import Path

        return str(Path(source).resolve())
    return mask_credentials(source)


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
        frame = load_sklearn(cfg.source.split("://", 1)[1].strip("/"))
    elif fmt == "sql":
        frame = read_sql(cfg.source, cfg.query, cfg.source_password_env)
    elif fmt == "csv":
        frame = read_csv(cfg.source, cfg.id_column)
    else:
        frame = read_parquet(cfg.source)
    return check_column_names(frame, describe_source(cfg.source))


def check_column_names(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """Column names as strings, each once; a repeated name is an error, not a silent rename."""
    frame.columns = check_unique_names(frame.columns, label)
    return frame


def check_unique_names(columns: Any, label: str) -> list[str]:
    names = [str(c) for c in columns]
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise DataError(f"{label} has duplicate column names: {', '.join(map(repr, dupes))}")
    return names


# ---- CSV --------------------------------------------------------------------------------------
def read_csv(source: str, id_column: str | None = None) -> pd.DataFrame:
    """A UTF-8 CSV with a header row (gzip/bz2/zstd by suffix), from a path or URL.

    The id column, when named, is read as text: ids are carried through as written ("007").
    """
    raw = _read_bytes(source, "CSV", compression="infer")
    if not raw.strip():
        raise DataError(f"CSV {source} is empty ({len(raw)} bytes, no header)")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        byte = raw[err.start : err.start + 1].hex()
        raise DataError(
            f"CSV {source} is not UTF-8: byte 0x{byte} at line {line} (offset {err.start}); "
            "re-save it as UTF-8"
        ) from None
    # pandas renames a repeated header name ("a", "a.1"): the header line, as pandas finds it
    # (after any blank lines), is checked first.
    try:
        header = pd.read_csv(
            io.StringIO(text), header=None, nrows=1, dtype=str, keep_default_na=False
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise DataError(f"CSV {source} has an unreadable header: {_first_line(err)}") from None
    check_unique_names(header.iloc[0].tolist() if len(header) else [], f"CSV {source}")
    try:
        # low_memory=False: one pass over the whole file, so that a column's type does not
        # depend on where chunks happen to end.
        dtype = {id_column: str} if id_column else {}
        frame = pd.read_csv(io.StringIO(text), low_memory=False, dtype=dtype or None)
        # A column pandas infers as float64 (numbers with a blank) is read again as float64:
        # inferred, an integer -2**63 next to a blank becomes NaN (pandas' integer null
        # marker); read as float64, it is -9.223372036854776e18, as the streamed reader has it.
        floats = {
            c: "float64"
            for c in frame.columns
            if frame[c].dtype == np.float64 and c not in dtype and frame[c].isna().any()
        }
        if floats:
            frame = pd.read_csv(io.StringIO(text), low_memory=False, dtype={**dtype, **floats})
        return frame
    except pd.errors.EmptyDataError:
        raise DataError(f"CSV {source} is empty (no header)") from None
    except (pd.errors.ParserError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"CSV {source} cannot be parsed: {reason}") from None


# ---- Parquet ----------------------------------------------------------------------------------
def read_parquet(source: str) -> pd.DataFrame:
    """One Parquet file, or a folder of shards (read in name order, same columns required),
    each shard cast to the folder's one schema (``_schema``) before they are joined."""
    fs, path = _fs(source)
    if not _exists(fs, path):
        raise DataError(f"data source not found: {source}")
    if not fs.isdir(path):
        return _read_parquet_file(fs, path, source)
    shards = data_files(fs, path, PARQUET_SUFFIXES)
    if not shards:
        raise DataError(f"Parquet folder {source} holds no .parquet files")
    frames = []
    for shard in shards:
        frame = _read_parquet_file(fs, shard, f"{source} (shard {_rel(shard, path)})")
        if frames and list(frame.columns) != list(frames[0].columns):
            raise DataError(
                f"Parquet shard {_rel(shard, path)} of {source} has columns "
                f"{_short(frame.columns)}, but shard {_rel(shards[0], path)} has "
                f"{_short(frames[0].columns)}"
            )
        frames.append(frame)
    dtypes = common_dtypes([dict(f.dtypes.items()) for f in frames])
    frames = [
        cast_frame(f, dtypes, f"Parquet shard {_rel(s, path)} of {source}")
        for f, s in zip(frames, shards, strict=True)
    ]
    return pd.concat(frames, ignore_index=True)


def _read_parquet_file(fs, path: str, label: str) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as fh:
        data = fh.read()
    if not data:
        raise DataError(f"Parquet file {label} is empty (0 bytes)")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        check_unique_names(pf.schema_arrow.names, f"Parquet file {label}")
        frame = table_to_frame(pf.read())
    except DataError:
        raise
    except (pa.ArrowException, *_CORRUPT) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"Parquet file {label} is corrupt or truncated: {reason}") from None
    # A named index (written by pandas) is data; the default range index is not.
    if isinstance(frame.index, pd.MultiIndex) or frame.index.name is not None:
        frame = frame.reset_index()
    return frame.reset_index(drop=True)


class ParquetStream:
    """A Parquet source (one file or a folder of shards) read one record batch at a time.

    Opening it reads only the files' footers: row count, columns (the same in every shard,
    each name once), and raises the same ``DataError`` as ``read_parquet`` for a missing,
    empty or corrupt source. ``chunks`` then yields ``(Arrow table, frame)`` pairs of at most
    ``chunk_rows`` rows, in file order, one row group at a time: memory is bounded by the
    source's largest row group (a 1M-row group of 64 float32 columns: about 0.5 GiB), not by
    its size.
    """

    def __init__(self, source: str, chunk_rows: int = 65_536):
        self.source, self.chunk_rows = source, chunk_rows
        self.fs, root = _fs(source)
        if not _exists(self.fs, root):
            raise DataError(f"data source not found: {source}")
        if self.fs.isdir(root):
            self.files = data_files(self.fs, root, PARQUET_SUFFIXES)
            if not self.files:
                raise DataError(f"Parquet folder {source} holds no .parquet files")
            self.labels = [f"{source} (shard {_rel(f, root)})" for f in self.files]
        else:
            self.files, self.labels = [root], [source]
        self.rows, names = 0, None
        self.file_rows: list[int] = []
        self.stamps: list[Any] = []
        per_file = []
        for f, label in zip(self.files, self.labels, strict=True):
            with self._open(f, label) as pf:
                found = check_unique_names(pf.schema_arrow.names, f"Parquet file {label}")
                if names is not None and found != names:
                    raise DataError(
                        f"Parquet shard {_rel(f, root)} of {source} has columns "
                        f"{_short(found)}, but shard {_rel(self.files[0], root)} has "
                        f"{_short(names)}"
                    )
                names = found
                per_file.append(file_dtypes(pf))
                self.file_rows.append(pf.metadata.num_rows)
                self.rows += pf.metadata.num_rows
            self.stamps.append(file_stamp(self.fs, f))
        # The source's one schema: every chunk is cast to it (see _schema).
        self.dtypes = common_dtypes(per_file)
        self.columns = list(self.dtypes)
        self.schema = arrow_schema(self.dtypes)

    @property
    def nbytes(self) -> int:
        """What the source takes in memory as a frame of float64s: rows x columns x 8."""
        return self.rows * len(self.columns or []) * 8

    @contextlib.contextmanager
    def _open(self, path: str, label: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.fs.size(path) == 0:
            raise DataError(f"Parquet file {label} is empty (0 bytes)")
        with self.fs.open(path, "rb") as fh:
            try:
                pf = pq.ParquetFile(fh)
            except (pa.ArrowException, *_CORRUPT) as err:
                raise DataError(
                    f"Parquet file {label} is corrupt or truncated: {_first_line(err)}"
                ) from None
            yield pf

    def chunks(self) -> Iterator[tuple[Any, pd.DataFrame]]:
        """(Arrow table, frame) of each chunk: the frame as ``read_parquet`` would read those
        rows (nullable integers exact, decimals as float64, a named index as a column, the
        source's one schema), the table as that frame is stored. Each file's rows are
        counted: a file that changed since the stream was opened fails, naming the file."""
        import pyarrow as pa

        for f, label, expected, stamp in zip(
            self.files, self.labels, self.file_rows, self.stamps, strict=True
        ):
            if file_stamp(self.fs, f) != stamp:
                raise DataError(f"Parquet file {label} changed after it was opened; read it again")
            seen = 0
            with self._open(f, label) as pf:
                # One row group at a time: across groups, Arrow reads the next ones ahead and
                # memory grows with the file; within one it is bounded by the group's size.
                groups = range(pf.metadata.num_row_groups)
                batches = (
                    rb
                    for g in groups
                    for rb in pf.iter_batches(batch_size=self.chunk_rows, row_groups=[g])
                )
                while True:
                    try:
                        rb = next(batches, None)
                    except (pa.ArrowException, *_CORRUPT) as err:
                        raise DataError(
                            f"Parquet file {label} is corrupt or truncated: {_first_line(err)}"
                        ) from None
                    if rb is None:
                        break
                    seen += rb.num_rows
                    table = pa.Table.from_batches([rb])
                    yield self._cast(table, label)
            if seen != expected:
                raise DataError(
                    f"Parquet file {label} changed while it was read ({expected} rows when "
                    f"opened, {seen} read)"
                )

    def _cast(self, table, label: str) -> tuple[Any, pd.DataFrame]:
        import pyarrow as pa

        frame = table_to_frame(table)
        reindexed = isinstance(frame.index, pd.MultiIndex) or frame.index.name is not None
        if reindexed:
            frame = frame.reset_index()
        frame = frame.reset_index(drop=True)
        cast = cast_frame(frame, self.dtypes, label)
        if cast is frame and not reindexed and table.column_names == self.columns:
            return table, frame
        frame = cast
        return pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False), frame


# ---- SQL --------------------------------------------------------------------------------------
def read_sql(url: str, query: str | None, password_env: str | None = None) -> pd.DataFrame:
    """The result of ``query`` on the database at the SQLAlchemy ``url``; its password from the
    environment variable ``password_env`` when given (it never enters the config)."""
    import os

    import sqlalchemy

    shown = describe_source(url)
    if not query:
        raise DataError(f"data.source {shown!r} is a database URL but data.query is empty")
    try:
        target: Any = url
        if password_env:
            password = os.environ.get(password_env)
            if not password:
                raise DataError(
                    f"data.source_password_env names {password_env!r}, which is not set in "
                    "this worker's environment"
                )
            target = sqlalchemy.make_url(url).set(password=password)
        engine = sqlalchemy.create_engine(target)
    except (sqlalchemy.exc.ArgumentError, ImportError, ValueError) as err:
        raise DataError(
            f"bad database URL {shown!r}: {mask_credentials(_first_line(err))}"
        ) from None
    try:
        with engine.connect() as conn:
            # coerce_float turns NUMERIC columns (Decimal objects) into floats; nullable types
            # keep an integer column with a NULL exact (not float64).
            frame = pd.read_sql_query(
                sqlalchemy.text(query), conn, coerce_float=True, dtype_backend="numpy_nullable"
            )
            return numpy_unless_nullable(frame)
    except sqlalchemy.exc.SQLAlchemyError as err:
        cause = getattr(err, "orig", None) or err
        raise DataError(
            f"SQL source {shown} failed: {mask_credentials(_first_line(cause))}"
        ) from None
    finally:
        engine.dispose()


# ---- helpers ----------------------------------------------------------------------------------
def _fs(source: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(source)
    except (ValueError, ImportError) as err:
        raise DataError(f"cannot open data source {source!r}: {_first_line(err)}") from None


def _exists(fs, path: str) -> bool:
    try:
        return bool(fs.exists(path))
    except OSError:
        return False


def _is_dir(source: str) -> bool:
    if "://" in source and not source.startswith("file://"):
        return False  # asking a remote store costs a round trip; name the format instead
    from pathlib import Path

    return Path(source.removeprefix("file://")).is_dir()


def _read_bytes(source: str, kind: str, compression: str | None = None) -> bytes:
    import fsspec

    fs, path = _fs(source)
    if not _exists(fs, path):
        raise DataError(f"data source not found: {source}")
    if fs.isdir(path):
        raise DataError(f"{kind} source {source} is a folder, not a file")
    try:
        with fsspec.open(source, "rb", compression=compression) as fh:
            return fh.read()
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"{kind} {source} cannot be read: {_first_line(err)}") from None


def _compression(source: str) -> str | None:
    from fsspec.utils import infer_compression

    return infer_compression(source)


def _rel(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1 :] if path.startswith(root.rstrip("/")) else path


def _short(columns: Any, limit: int = 6) -> str:
    names = [str(c) for c in columns]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return "[" + ", ".join(map(repr, names[:limit])) + more + "]"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
