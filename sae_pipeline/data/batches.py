"""New data batches: where they come from, what they hold, and their rows checked row by row.

A batch is one Parquet file, a folder of Parquet files, or a list of either (local paths or
fsspec URLs). It reaches a DAG as a run parameter or as the ``extra`` of an Airflow Asset event
(``{"path": ...}``); both DAGs of the loop turn that into the same small context dict with
``context``, pinning the champion version once for the whole run.

Rows are checked against the champion's data contract in two places: the schema and a sample
of rows up front (``validate_batch``: a wrong column fails the run before any work), and every
row while streaming (``finite_rows``: a row with a missing, NaN or infinite feature is
quarantined, not encoded), so that rows in = rows accepted + rows quarantined.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sae_pipeline import storage
from sae_pipeline.data._exact import decimal_to_float, decimals_as_floats
from sae_pipeline.data._paths import data_files, is_hidden
from sae_pipeline.errors import DataError

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")
# Parameters both DAGs share -> the config fields they override.


class NoBatch(DataError):
    """A run has no batch to process (a scheduled run before any batch was announced)."""


# ---- where a batch comes from -----------------------------------------------------------------
def sources_from_events(events: Mapping[Any, Sequence[Any]] | None) -> list[str]:
    """Batch paths from Asset events: each event's ``extra["path"]`` (a string or a list)."""
    out: list[str] = []
    for asset_events in (events or {}).values():
        for event in asset_events:
            extra = getattr(event, "extra", None) or {}
            path = extra.get("path") or extra.get("paths")
            if isinstance(path, str):
                out.append(path)
            elif isinstance(path, list):
                out.extend(str(p) for p in path)
            else:
                uri = getattr(getattr(event, "asset", None), "uri", "?")
                log.warning("asset event of %s has no extra['path']; ignored: %s", uri, extra)
    return out


def list_files(sources: str | Sequence[str]) -> list[str]:
    """The Parquet files of a batch, in a stable order; raise DataError naming a bad source."""
    if isinstance(sources, str):
        sources = [sources]
    files: list[str] = []
    for src in sources:
        if storage.is_local(src):
            path = storage.local_path(src)
            if path.is_dir():
                found = sorted(
                    str(p)
                    for p in path.rglob("*")
                    if p.suffix in PARQUET_SUFFIXES
                    and p.is_file()
                    and not is_hidden(p.relative_to(path).as_posix())
                )
                if not found:
                    raise DataError(f"batch folder {src} holds no Parquet files")
                files.extend(found)
                continue
            if not path.exists():
                raise DataError(f"batch not found: {src}")
            files.append(str(path))
        else:
            import fsspec

            fs, root = fsspec.core.url_to_fs(src)
            if fs.isdir(root):
                found = data_files(fs, root, PARQUET_SUFFIXES)
                if not found:
                    raise DataError(f"batch folder {src} holds no Parquet files")
                files.extend(fs.unstrip_protocol(p) for p in found)
                continue
            if not fs.exists(root):
                raise DataError(f"batch not found: {src}")
            files.append(src)
    for f in files:
        if not f.endswith(PARQUET_SUFFIXES):
            raise DataError(
                f"batch file {f} is not Parquet (.parquet or .pq): batches are streamed as "
                "Parquet; convert it first, e.g. pandas.read_csv(...).to_parquet(...)"
            )
    if not files:
        raise DataError("no batch given: pass a path or URL, or an Asset event with extra.path")
    return files


def _unreadable(uri: str, err: Exception) -> DataError:
    return DataError(f"Parquet {uri} cannot be read: {str(err).splitlines()[0]}")


@contextlib.contextmanager
def open_parquet(uri: str):
    """A ``pyarrow.parquet.ParquetFile`` for a local path or an fsspec URL."""
    import pyarrow.parquet as pq

    if storage.is_local(uri):
        try:
            pf = pq.ParquetFile(str(storage.local_path(uri)))
        except (OSError, ValueError) as err:  # pyarrow: ArrowIOError, ArrowInvalid
            raise _unreadable(uri, err) from None
        with contextlib.closing(pf):
            yield pf
    else:
        import fsspec

        with fsspec.open(uri, "rb") as fh:
            try:
                pf = pq.ParquetFile(fh)
            except (OSError, ValueError) as err:
                raise _unreadable(uri, err) from None
            yield pf


def batch_key(files: Sequence[str], rows: Sequence[int]) -> str:
    """A name for the batch that changes whenever its content does: ``<stem>-<hash>``.

    The hash covers each file's path, row count and content identity (``content_identity``),
    so a file overwritten with other rows of the same count gets a new key.
    """
    h = hashlib.sha256()
    for f, n in zip(files, rows, strict=True):
        h.update(f"{f}\x1f{n}\x1f{content_identity(f)}\x1e".encode())
    stem = Path(files[0].rstrip("/")).stem if len(files) == 1 else Path(files[0]).parent.name
    return f"{storage.run_key(stem)[:40]}-{h.hexdigest()[:10]}"


# What object stores report that changes whenever an object's bytes do (S3/Azure, GCS).
_STORE_IDENTITIES = ("ETag", "etag", "md5Hash", "crc32c")


def content_identity(uri: str) -> str:
    """What identifies a file's content: the store's ETag or checksum, else a SHA-256 of it.

    A local file is hashed (a modification time may not change between two quick writes).
    """
    if storage.is_local(uri):
        with open(storage.local_path(uri), "rb") as fh:
            return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    info = fs.info(path)
    for name in _STORE_IDENTITIES:
        if info.get(name):
            return f"{name}:{info[name]}:{info.get('size')}"
    with fs.open(path, "rb") as fh:
        return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()


# ---- the contract -----------------------------------------------------------------------------
def check_schema(schema, contract, where: str) -> None:
    """Every feature column of the contract is present and numeric (Arrow types; decimals are
    numbers too, read as float64, as ingest and training read them)."""
    import pyarrow as pa

    names = set(schema.names)
    missing = [c for c in contract.feature_columns if c not in names]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise DataError(f"batch {where} lacks feature column(s) of the model's contract: {shown}")
    for col in contract.feature_columns:
        t = schema.field(col).type
        numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        if not (numeric or pa.types.is_boolean(t)):
            raise DataError(f"column {col!r} of batch {where} is {t}, not numeric")


def inspect_batch(files: Sequence[str], contract, sample_rows: int = 1000) -> dict[str, Any]:
    """Check every file's schema and a first sample of rows; return row counts and the key."""
    import pandas as pd

    from sae_pipeline.data.validation import validate_frame

    rows, stamps, id_types = [], [], []
    sample = None
    ident = getattr(contract, "id_column", None)
    for f in files:
        stamps.append(file_stamp(f))
        with open_parquet(f) as pf:
            check_schema(pf.schema_arrow, contract, f)
            rows.append(pf.metadata.num_rows)
            if ident is not None and ident in pf.schema_arrow.names:
                id_types.append(pf.schema_arrow.field(ident).type)
            if sample is None and pf.metadata.num_rows:
                head = next(
                    pf.iter_batches(batch_size=sample_rows, columns=contract.feature_columns)
                )
                sample = decimals_as_floats(head).to_pandas()
    total = int(sum(rows))
    if total == 0:
        raise DataError(f"batch {files[0]} has a header but no rows")
    # The contract's own check, on the rows the streaming check would accept.
    finite = sample[np.isfinite(sample.to_numpy(dtype=np.float64)).all(axis=1)]
    if len(finite):
        validate_frame(pd.DataFrame(finite), contract)
    key = batch_key(files, rows)
    for f, stamp in zip(files, stamps, strict=True):
        check_unchanged(f, stamp, "while the batch was inspected")
    return {
        "files": list(files),
        "rows": total,
        "file_rows": rows,
        "key": key,
        "stamps": stamps,  # each file as its key was computed: encode checks it is still so
        "id_type": str(common_id_type(id_types)) if id_types else None,
    }


def common_id_type(types: Sequence[Any]):
    """The one Arrow type of a batch's id column over its files, by pandas' rules: integers
    (any width) int64; integers and floats float64; anything else (text, or a mix with it)
    text, each id written as Arrow writes it (``7`` as ``"7"``)."""
    import pyarrow as pa

    if all(pa.types.is_integer(t) for t in types):
        return pa.int64()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        return pa.float64()
    return pa.string()


def file_stamp(uri: str) -> str:
    """What changes whenever a file is rewritten, cheaply (no read): size, modification time
    and inode of a local file; size, time and ETag or checksum of an object."""
    if storage.is_local(uri):
        st = os.stat(storage.local_path(uri))
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    info = fs.info(path)
    keys = ("size", "mtime", "LastModified", "last_modified", *_STORE_IDENTITIES)
    return ":".join(str(info.get(k)) for k in keys)


def check_unchanged(uri: str, stamp: str | None, when: str) -> None:
    """DataError naming ``uri`` when it is no longer the file ``stamp`` was taken of."""
    if stamp is not None and file_stamp(uri) != stamp:
        raise DataError(
            f"batch file {uri} changed {when}: its batch key no longer names its content; "
            "announce the new file as a new batch"
        )


def finite_rows(x: np.ndarray, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mask of rows whose features are all finite, reason for each rejected row).

    Nulls arrive here as NaN. The reason names the first offending column of the row.
    """
    finite = np.isfinite(x)
    ok = finite.all(axis=1)
    if ok.all():
        return ok, np.empty(0, dtype=object)
    bad = ~finite[~ok]  # (rejected rows, columns)
    first = bad.argmax(axis=1)
    values = x[~ok][np.arange(len(first)), first]
    # Worded like the training snapshot's quarantine (sae_pipeline.validation).
    reasons = [
        f"column {columns[j]!r}: " + ("missing value" if np.isnan(v) else f"infinite value {v}")
        for j, v in zip(first.tolist(), values.tolist(), strict=True)
    ]
    return ok, np.asarray(reasons, dtype=object)


def feature_matrix(batch, columns: Sequence[str]) -> np.ndarray:
    """(rows, features) float64 from an Arrow record batch; nulls become NaN.

    Column-major, like the matrix of a pandas frame: each Arrow column lands in contiguous
    memory, which makes this copy and the scaler's pass several times faster than row-major.
    """
    import pyarrow as pa

    x = np.empty((batch.num_rows, len(columns)), dtype=np.float64, order="F")
    for j, col in enumerate(columns):
        arr = batch.column(col)
        if pa.types.is_decimal(arr.type):
            arr = decimal_to_float(arr)
        elif arr.null_count:
            arr = arr.cast("float64")
        x[:, j] = arr.to_numpy(zero_copy_only=False)
    return x


def prefetch(
    items: Iterable[Any], depth: int = 2, setup: Callable[[], Any] | None = None
) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` ahead: I/O overlaps compute.

    Memory stays bounded: at most ``depth`` items wait in the queue. ``setup`` runs first in
    the thread (per-thread settings, such as torch's intra-op thread count).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            if setup is not None:
                setup()
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # re-raised in the consumer
            errors.append(err)
        finally:
            q.put(done)

    thread = threading.Thread(target=produce, name="sae-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # drain, so that a put waiting for room returns
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
            thread.join(timeout=0.005)  # not a 0.1 s wait on an empty queue at each end
        thread.join()
    if errors:
        raise errors[0]


def iter_chunks(
    files: Sequence[str], columns: Sequence[str], chunk_rows: int, row_groups=None
) -> Iterator[Any]:
    """Arrow record batches of at most ``chunk_rows`` rows, row group after row group.

    ``row_groups`` maps a file to the row groups to read (default: all of them). Columns are
    decoded on Arrow's thread pool. For a local file the OS is asked to read the next row
    group from disk while this one is decoded and used (no CPU spent, nothing held here).
    """
    for f in files:
        with open_parquet(f) as pf:
            names = set(pf.schema_arrow.names)
            wanted = [c for c in columns if c in names]
            groups = range(pf.metadata.num_row_groups) if row_groups is None else row_groups[f]
            ahead = _readahead(f, pf.metadata, wanted)
            try:
                for i, g in enumerate(groups):
                    if i + 1 < len(groups):
                        ahead(groups[i + 1])
                    yield from pf.iter_batches(
                        batch_size=chunk_rows, row_groups=[g], columns=wanted, use_threads=True
                    )
            except (OSError, ValueError) as err:  # a damaged page or row group
                raise _unreadable(f, err) from None
            finally:
                ahead(None)


def _readahead(uri: str, metadata, columns: Sequence[str]) -> Callable[[int | None], None]:
    """``ahead(g)`` hints the kernel to fetch row group ``g`` of a local file; ``ahead(None)``
    closes the file. A no-op elsewhere (object stores, systems without posix_fadvise)."""
    if not storage.is_local(uri) or not hasattr(os, "posix_fadvise"):
        return lambda g: None
    fd = os.open(storage.local_path(uri), os.O_RDONLY)
    wanted = set(columns)

    def ahead(g: int | None) -> None:
        nonlocal fd
        if g is None:
            if fd >= 0:
                os.close(fd)
                fd = -1
            return
        rg = metadata.row_group(g)
        spans = [
            (c.dictionary_page_offset or c.data_page_offset, c.total_compressed_size)
            for c in (rg.column(j) for j in range(rg.num_columns))
            if c.path_in_schema in wanted
        ]
        if spans:
            start = min(o for o, _ in spans)
            end = max(o + n for o, n in spans)
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)

    return ahead


# ---- a sample of a batch -----------------------------------------------------------------------
def read_batch_sample(ctx: dict[str, Any], columns: list[str], sample_rows: int, seed: int):
    """A seeded uniform sample of the batch's valid rows, and the row counts of the batch.

    The batch is streamed chunk by chunk; only the sampled rows are kept.
    """
    import pandas as pd

    info = ctx["batch"]
    rows_in = info["rows"]
    take = None
    if sample_rows and rows_in > sample_rows:
        rng = np.random.default_rng([seed, int(info["key"].rsplit("-", 1)[-1], 16)])
        take = np.sort(rng.choice(rows_in, sample_rows, replace=False))
    frames, start, valid = [], 0, 0
    for rb in iter_chunks(info["files"], columns, 65_536):
        x = feature_matrix(rb, columns)
        ok, _ = finite_rows(x, columns)
        valid += int(ok.sum())
        if take is not None:
            lo, hi = np.searchsorted(take, [start, start + len(x)])
            picked = np.zeros(len(x), dtype=bool)
            picked[take[lo:hi] - start] = True
            ok &= picked
        frames.append(pd.DataFrame(x[ok], columns=columns))
        start += len(x)
    if start != rows_in:
        raise DataError(f"batch {info['key']} changed while it was read: {rows_in} rows when "
                        f"inspected, {start} read")  # fmt: skip
    frame = pd.concat(frames, ignore_index=True)
    return frame, {"rows_in": start, "rows_valid": valid, "rows_quarantined": start - valid}
