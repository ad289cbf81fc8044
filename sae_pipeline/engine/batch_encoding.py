"""Batch encoding mechanics: Parquet in, Parquet out, streamed in fixed-size chunks.

A batch is planned into shards (runs of whole Parquet row groups, ``plan``); each shard is
streamed chunk by chunk (``encode_shard``): rows with a missing or non-finite feature go to a
quarantine file with the reason, the others are scaled, encoded and written with their row
number, id, codes and reconstruction error (the anomaly score). Memory stays flat whatever the
batch size: only ``chunk_rows`` rows are held at a time.

Output of one batch (a Parquet dataset readable by pandas/pyarrow/Spark as is)::

    <output>/part-00000.parquet ...              row, [id], code_0.., reconstruction_error
                                                 [, anomaly_score, is_anomaly]
    <output>/_quarantine/part-00000.parquet ...  rejected rows, _row, _quarantine_reason
    <output>/_manifest.json                       rows in/encoded/quarantined, model version

Writes are atomic. On a local store the shards write into a staging folder that ``commit``
renames into place, so readers see all of the output or none; on an object store the parts are
written under a prefix of their own (``<batch key>.v<version>/``, each PUT is atomic) and
``_manifest.json``, written last, publishes them: read such an output through its manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sae_pipeline import storage
from sae_pipeline.data import batches
from sae_pipeline.engine.encoder import ERROR_COLUMN, FLAG_COLUMN, SCORE_COLUMN, encode_rows
from sae_pipeline.errors import DataError

log = logging.getLogger(__name__)

CHUNK_ROWS = 65_536
SHARD_ROWS = 1_000_000
ROW_COLUMN = "row"
# The quarantine file's columns, as in a training snapshot's quarantine.
QUARANTINE_ROW, QUARANTINE_REASON = "_row", "_quarantine_reason"
MANIFEST = "_manifest.json"
QUARANTINE = "_quarantine"


# ---- output ----------------------------------------------------------------------------------
def output_schema(encoder, id_field=None):
    import pyarrow as pa

    fields = [pa.field(ROW_COLUMN, pa.int64())]
    if id_field is not None:
        fields.append(id_field)
    fields += [pa.field(c, pa.float32()) for c in encoder.code_columns]
    fields.append(pa.field(ERROR_COLUMN, pa.float32()))
    if encoder.anomaly is not None:  # the run fitted an anomaly detector
        fields += [pa.field(SCORE_COLUMN, pa.float64()), pa.field(FLAG_COLUMN, pa.bool_())]
    return pa.schema(fields)


# ---- planning ---------------------------------------------------------------------------------
def plan(
    files: Sequence[str], shard_rows: int = SHARD_ROWS, stamps: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Shards of about ``shard_rows`` rows: whole row groups of one file each, in order;
    each with its file's ``stamp`` when given (``batches.file_stamp`` at inspection)."""
    if shard_rows < 1:
        raise DataError(f"shard_rows must be positive, got {shard_rows}")
    shards: list[dict[str, Any]] = []
    first = 0

    def emit(f: str, groups: list[int], start: int, rows: int) -> None:
        shards.append(
            {
                "index": len(shards),
                "file": f,
                "row_groups": groups,
                "first_row": start,
                "rows": rows,
                "stamp": stamp,
            }
        )

    for k, f in enumerate(files):
        stamp = stamps[k] if stamps else None
        batches.check_unchanged(f, stamp, "after the batch was inspected")
        with batches.open_parquet(f) as pf:
            md = pf.metadata
            groups, start, rows = [], first, 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if groups and rows + n > shard_rows:
                    emit(f, groups, start, rows)
                    groups, start, rows = [], start + rows, 0
                groups.append(g)
                rows += n
            if rows:
                emit(f, groups, start, rows)
            first += md.num_rows
    return shards


# ---- one shard --------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_file(uri: str):
    """A local path to write; on success it becomes ``uri`` at once (rename or one upload)."""
    if storage.is_local(uri):
        final = storage.local_path(uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            yield str(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        import fsspec

        with tempfile.TemporaryDirectory() as d:
            tmp = os.path.join(d, "part.parquet")
            yield tmp
            fs, path = fsspec.core.url_to_fs(uri)
            fs.put_file(tmp, path)


def encode_shard(
    encoder,
    shard: dict[str, Any],
    part_uri: str,
    quarantine_uri: str,
    *,
    id_column: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    device=None,
    on_rows: Callable[[int], None] | None = None,
    id_type: str | None = None,
) -> dict[str, Any]:
    """Stream one shard through the encoder; write its part (and quarantine) atomically.

    ``id_type``: the id column's one Arrow type over the whole batch
    (``batches.common_id_type``): every part's ids are cast to it, and a file without the
    column gets null ids of it, so that the parts read as one table. The shard's file must
    be the one inspected (its ``stamp``) before and after it is read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    features = encoder.contract.feature_columns
    f = shard["file"]
    batches.check_unchanged(f, shard.get("stamp"), "after the batch was inspected")
    with batches.open_parquet(f) as pf:
        batches.check_schema(pf.schema_arrow, encoder.contract, f)
        in_schema = pf.schema_arrow
    has_id = bool(id_column) and id_column in in_schema.names
    id_field = in_schema.field(id_column) if has_id else None
    if id_column and id_type is not None:
        id_field = pa.field(id_column, pa.type_for_alias(id_type))
    schema = output_schema(encoder, id_field)
    columns = [*features, *([id_column] if has_id else [])]

    def read():
        for rb in batches.iter_chunks([f], columns, chunk_rows, {f: shard["row_groups"]}):
            yield rb, batches.feature_matrix(rb, features)

    # Read ahead in a thread when the CPU waits anyway: on a GPU, or on a network store. On
    # CPU the network keeps every core busy, and a reader thread competing with it costs more
    # than it hides (the OS already reads the next row group from disk, see iter_chunks).
    gpu = device is not None and torch.device(device).type == "cuda"
    chunks = batches.prefetch(read()) if gpu or not storage.is_local(f) else read()

    counts = {"rows_in": 0, "rows_encoded": 0, "rows_quarantined": 0}
    reasons: Counter[str] = Counter()
    with contextlib.ExitStack() as stack:
        path = stack.enter_context(_atomic_file(part_uri))
        # Codes and errors are high-entropy floats: dictionary encoding only costs time (4x).
        writer = stack.enter_context(
            pq.ParquetWriter(path, schema, compression="snappy", use_dictionary=False)
        )
        qwriter = None
        start = shard["first_row"]
        for rb, x in chunks:
            n = len(x)
            rows = np.arange(start, start + n, dtype=np.int64)
            ok, why = batches.finite_rows(x, features)
            if not ok.all():
                bad = ~ok
                rejected = rb.filter(pa.array(bad))
                rejected = rejected.add_column(0, QUARANTINE_ROW, pa.array(rows[bad]))
                rejected = rejected.append_column(QUARANTINE_REASON, pa.array(why, pa.string()))
                if qwriter is None:
                    qpath = stack.enter_context(_atomic_file(quarantine_uri))
                    qwriter = stack.enter_context(pq.ParquetWriter(qpath, rejected.schema))
                qwriter.write_batch(rejected)
                reasons.update(why.tolist())
                x, rows = x[ok], rows[ok]
                rb = rb.filter(pa.array(ok))
            if len(x):
                codes, err = encode_rows(encoder, x, device)
                arrays = [pa.array(rows)]
                if id_field is not None and has_id:
                    arrays.append(rb.column(id_column).cast(id_field.type))
                elif id_field is not None:
                    arrays.append(pa.nulls(len(x), id_field.type))
                arrays += [pa.array(codes[:, j]) for j in range(codes.shape[1])]
                arrays.append(pa.array(err))
                if encoder.anomaly is not None:
                    arrays += map(pa.array, encoder.anomaly_columns(x))
                writer.write_batch(pa.record_batch(arrays, schema=schema))
            counts["rows_in"] += n
            counts["rows_encoded"] += len(x)
            counts["rows_quarantined"] += n - len(x)
            start += n
            if on_rows is not None:
                on_rows(n)
        if counts["rows_in"] != shard["rows"]:  # before the part is published
            raise DataError(f"shard {shard['index']} of {f}: read {counts['rows_in']} rows, "
                            f"planned {shard['rows']}")  # fmt: skip
        batches.check_unchanged(f, shard.get("stamp"), "while it was encoded")
    return {
        "index": shard["index"],
        **counts,
        "part": part_uri,
        "quarantine": quarantine_uri if counts["rows_quarantined"] else None,
        "reasons": dict(reasons.most_common(5)),
    }


def read_output(output: str):
    """The encoded rows of a committed output as one frame (sorted by row number)."""
    import pandas as pd

    manifest = storage.read_json(storage.join(output, MANIFEST))
    frames = [storage.read_parquet(storage.join(output, p)) for p in manifest["parts"]]
    return pd.concat(frames, ignore_index=True).sort_values(ROW_COLUMN, ignore_index=True)


def read_quarantine(output: str):
    """The quarantined rows of a committed output (empty frame when none)."""
    import pandas as pd

    manifest = storage.read_json(storage.join(output, MANIFEST))
    frames = [storage.read_parquet(storage.join(output, p)) for p in manifest["quarantine"]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
