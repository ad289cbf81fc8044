"""Ingest: a source read, validated and written as a snapshot, in memory or chunk by chunk.

Small data keeps the in-memory path (``snapshot.write_snapshot``). A Parquet or CSV source
larger than ``data.in_memory_max_bytes`` (rows x columns x 8 bytes, its size as a frame of
float64s; for a CSV estimated from its byte size, see ``csv_stream.CsvStream``) is streamed
instead: read one chunk at a time (``sources.ParquetStream``, ``csv_stream.CsvStream``), checked
chunk by chunk (``_stream_validation``), and written as row-group shards into a staging
folder that is committed only once every row has passed (``storage.commit``): a rejected
batch leaves nothing behind. The snapshot's content hash is computed as the shards are
written (``contract.ContentHasher``) and equals the in-memory path's hash of the same rows.
The decision goes to the log.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from sae_pipeline import storage
from sae_pipeline.config import DataConfig
from sae_pipeline.data import snapshot
from sae_pipeline.data._exact import table_to_frame
from sae_pipeline.data._stream_validation import StreamValidator
from sae_pipeline.data.contract import ContentHasher, Contract
from sae_pipeline.data.csv_stream import CsvStream
from sae_pipeline.data.sources import ParquetStream, describe_source, source_format
from sae_pipeline.data.validation import REASON_COLUMN, ROW_COLUMN
from sae_pipeline.errors import DataError

log = logging.getLogger(__name__)

ROW_GROUP = 65_536  # rows per Parquet row group: the unit streamed training shuffles by
CHUNK_ROWS = 65_536  # rows read, checked and written at a time


def open_stream(cfg: DataConfig, source: str | None = None) -> ParquetStream | CsvStream | None:
    """The source as a ``ParquetStream`` or ``CsvStream`` when it should be streamed, else None
    (in memory). ``source``, when given, is a Parquet file or folder read instead of
    ``cfg.source``.

    Only Parquet and CSV sources stream; SQL and scikit-learn sources are read whole.
    """
    fmt = "parquet" if source is not None else source_format(cfg)
    if fmt == "csv":
        return _open_csv(cfg)
    if fmt != "parquet":
        log.info("ingest: %s source: read in memory", fmt)
        return None
    stream = ParquetStream(source or cfg.source, CHUNK_ROWS)
    big = stream.nbytes > cfg.in_memory_max_bytes
    log.info(
        "ingest: %d rows x %d columns = %.1f MiB as float64 %s data.in_memory_max_bytes "
        "(%.1f MiB): %s",
        stream.rows,
        len(stream.columns or []),
        stream.nbytes / 2**20,
        ">" if big else "<=",
        cfg.in_memory_max_bytes / 2**20,
        f"streamed in chunks of {CHUNK_ROWS} rows" if big else "read in memory",
    )
    return stream if big else None


def _open_csv(cfg: DataConfig) -> CsvStream | None:
    """A CSV source is sized from its bytes and a sample (no full read before the decision)."""
    stream = CsvStream(cfg.source, CHUNK_ROWS, cfg.id_column)
    big = stream.nbytes > cfg.in_memory_max_bytes
    log.info(
        "ingest: CSV of %.1f MiB%s, about %d rows x %d columns = %.1f MiB as float64 %s "
        "data.in_memory_max_bytes (%.1f MiB): %s",
        stream.file_bytes / 2**20,
        " (compressed)" if stream.compressed else "",
        stream.estimated_rows,
        stream.estimated_columns,
        stream.nbytes / 2**20,
        ">" if big else "<=",
        cfg.in_memory_max_bytes / 2**20,
        f"streamed in chunks of {CHUNK_ROWS} rows" if big else "read in memory",
    )
    return stream if big else None


def ingest(cfg: DataConfig, out_dir: str) -> dict[str, Any]:
    """Read ``cfg.source``, validate it (against ``cfg.contract`` when set), write the snapshot."""
    from sae_pipeline.data.sources import read_source

    contract = snapshot.load_contract(cfg.contract) if cfg.contract else None
    where = {"source": describe_source(cfg.source), "source_format": source_format(cfg)}
    stream = open_stream(cfg)
    if stream is not None:
        return write_snapshot_stream(stream, cfg, out_dir, contract, **where)
    return snapshot.write_snapshot(read_source(cfg), cfg, out_dir, contract, **where)


class ShardWriter:
    """Arrow tables written as Parquet shards of ``shard_rows`` rows (row groups of 65,536,
    page checksums, as ``snapshot.parquet_bytes`` writes) into a staging folder."""

    def __init__(self, stage: str, prefix: str, shard_rows: int):
        self.stage, self.prefix, self.shard_rows = stage, prefix, shard_rows
        self.names: list[str] = []
        self.schema = None
        self._files = contextlib.ExitStack()
        self._writer = None
        self._in_shard = 0
        self._pending: list[Any] = []
        self._pending_rows = 0

    def write(self, table):
        """Append ``table``'s rows; return the table as written (cast to the first schema)."""
        import pyarrow as pa

        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema, check_metadata=False):
            try:
                table = table.cast(self.schema)
            except (pa.ArrowException, ValueError, TypeError) as err:
                raise DataError(
                    f"rows of one batch have different column types: {table.schema} vs "
                    f"{self.schema} ({str(err).splitlines()[0]})"
                ) from None
        rest = table
        while rest.num_rows:
            room = self.shard_rows - self._in_shard - self._pending_rows
            self._pending.append(rest.slice(0, room))
            self._pending_rows += self._pending[-1].num_rows
            rest = rest.slice(room)
            full = self._in_shard + self._pending_rows >= self.shard_rows
            if full or self._pending_rows >= ROW_GROUP:
                self._flush(everything=full)
        return table

    def _flush(self, everything: bool) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = pa.concat_tables(self._pending)
        n = buf.num_rows if everything else buf.num_rows // ROW_GROUP * ROW_GROUP
        if n:
            if self._writer is None:
                name = f"{self.prefix}-{len(self.names):05d}.parquet"
                self.names.append(name)
                fh = self._files.enter_context(storage.staged_writer(self.stage, name))
                self._writer = pq.ParquetWriter(fh, self.schema, write_page_checksum=True)
            self._writer.write_table(buf.slice(0, n), row_group_size=ROW_GROUP)
            self._in_shard += n
        rest = buf.slice(n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if everything:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._files.close()
            self._writer, self._in_shard = None, 0

    def close(self) -> list[str]:
        """Write what is pending; the staged names, in order."""
        if self._pending_rows:
            self._flush(everything=True)
        self._close_shard()
        return self.names

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
            self._files.close()


def write_snapshot_stream(
    stream: ParquetStream | CsvStream,
    cfg: DataConfig,
    out_dir: str,
    contract: Contract | None = None,
    *,
    source: str | None = None,
    source_format: str | None = None,
) -> dict[str, Any]:
    """``snapshot.write_snapshot`` chunk by chunk: the same files, manifest and errors."""
    import pyarrow as pa

    validator = StreamValidator(cfg, contract, stream.rows)
    stage = storage.new_stage(out_dir)
    accepted_w = ShardWriter(stage, "part", cfg.snapshot_shard_rows)
    quarantine_w = ShardWriter(stage, "quarantine", 2**62)
    hasher, columns = None, None
    try:
        offset = 0
        for table, frame in stream.chunks():
            accepted, bad, reasons = validator.check(frame, offset)
            if len(accepted):
                columns = columns or list(accepted.columns)
                written = accepted_w.write(
                    pa.Table.from_pandas(snapshot.parquet_safe(accepted), preserve_index=False)
                )
                # The hash of the rows as readers will decode them (see write_snapshot).
                hasher = hasher or ContentHasher(columns)
                hasher.update(table_to_frame(written))
            if len(bad):
                q = table.take(pa.array(bad))
                q = q.append_column(ROW_COLUMN, pa.array(bad + offset, pa.int64()))
                q = q.append_column(REASON_COLUMN, pa.array(reasons, pa.string()))
                quarantine_w.write(q)
            offset += len(frame)
        outcome = validator.finish()
        shards, quarantined = accepted_w.close(), quarantine_w.close()
    except BaseException:
        accepted_w.abort()
        quarantine_w.abort()
        storage.remove(stage)
        raise
    digest = hasher.hexdigest()
    manifest_uri = storage.join(out_dir, snapshot.MANIFEST)
    if storage.exists(manifest_uri):
        storage.remove(stage)
        existing = snapshot.read_manifest(out_dir)
        if existing.get("content_hash") == digest and all(
            existing.get(k) == v for k, v in outcome["counts"].items()
        ):
            return existing
        raise DataError(
            f"{out_dir} already holds snapshot {existing.get('content_hash')} of other data "
            f"(this batch is {digest}); write to a new folder"
        )
    if len(shards) == 1:
        names = {shards[0]: snapshot.SNAPSHOT_FILE}
    else:
        names = {s: f"{snapshot.SNAPSHOT_DIR}/part-{k:05d}.parquet" for k, s in enumerate(shards)}
    final = list(names.values())
    if quarantined:
        names[quarantined[0]] = snapshot.QUARANTINE_FILE
    storage.commit(stage, out_dir, names)
    manifest = {
        "format_version": snapshot.FORMAT_VERSION,
        "source": source,
        "source_format": source_format,
        **outcome["counts"],
        "snapshot": final[0] if len(final) == 1 else snapshot.SNAPSHOT_DIR,
        "snapshot_files": final,
        "quarantine": snapshot.QUARANTINE_FILE if quarantined else None,
        "content_hash": digest,
        "contract": outcome["contract"].to_dict(),
        "columns": columns,
        "problems": outcome["problems"],
        "warnings": outcome["warnings"],
        "dropped_columns": outcome["dropped_columns"],
        "validation": cfg.validation.model_dump(mode="json"),
        "streamed": True,
    }
    storage.write_json(manifest_uri, manifest)
    return manifest


def copy_raw(stream: ParquetStream | CsvStream, out_dir: str, shard_rows: int) -> dict[str, Any]:
    """The source copied as it is into ``out_dir`` (shards of ``shard_rows`` rows), chunk by
    chunk, committed at the end; its content hash computed on the way."""
    stage = storage.new_stage(out_dir)
    writer = ShardWriter(stage, "part", shard_rows)
    hasher = None
    try:
        for table, frame in stream.chunks():
            writer.write(table)
            hasher = hasher or ContentHasher(frame.columns)
            hasher.update(frame)
        shards = writer.close()
    except BaseException:
        writer.abort()
        storage.remove(stage)
        raise
    files = storage.commit(stage, out_dir, {s: s for s in shards})
    return {"files": files, "rows": stream.rows, "hash": hasher.hexdigest() if hasher else None}
