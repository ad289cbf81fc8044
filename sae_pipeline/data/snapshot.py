"""Versioned data snapshots: a batch is validated once, written once, and read back by manifest.

A snapshot folder (``sae-pipeline ingest --output <dir>`` through ``data.ingest``, or
``<run>/validate/`` in a training run) holds:

- ``snapshot.parquet``: the accepted rows; a larger snapshot is a folder of shards,
  ``snapshot/part-00000.parquet``, ... (``data.snapshot_shard_rows`` rows each);
- ``quarantine.parquet``: the quarantined rows as given, with ``_row`` (their row number in
  the input, from 0) and ``_quarantine_reason``; only when some rows were quarantined;
- ``manifest.json``: rows in, accepted and quarantined, the paths above (relative to the
  folder), the content hash of the accepted rows, the data contract, the policies applied.

Each file is written atomically, and the manifest last: it marks the snapshot complete, and
readers go through it. The source itself is only ever read.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pandas as pd

from sae_pipeline import storage
from sae_pipeline.config import DataConfig
from sae_pipeline.data.contract import Contract, content_hash
from sae_pipeline.data.validation import ValidationResult, validate_batch
from sae_pipeline.errors import DataError

MANIFEST = "manifest.json"
SNAPSHOT_FILE, SNAPSHOT_DIR, QUARANTINE_FILE = "snapshot.parquet", "snapshot", "quarantine.parquet"
FORMAT_VERSION = 1


def write_snapshot(
    frame: pd.DataFrame,
    cfg: DataConfig,
    out_dir: str,
    contract: Contract | None = None,
    *,
    source: str | None = None,
    source_format: str | None = None,
) -> dict[str, Any]:
    """Validate ``frame`` and write snapshot, quarantine and manifest under ``out_dir``.

    Nothing is written when the batch is rejected. A folder already holding a snapshot of the
    same content is left as it is; one holding other content is an error (snapshots are
    written once).
    """
    result = validate_batch(frame, cfg, contract)
    files = _accepted_files(parquet_safe(result.accepted), cfg.snapshot_shard_rows)
    # The hash of what is written, read back as readers will (a boolean or id column can come
    # back with another pandas type than it was given in).
    parts = [_decode(data, name) for name, data in files]
    digest = content_hash(parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True))
    manifest_uri = storage.join(out_dir, MANIFEST)
    if storage.exists(manifest_uri):
        existing = read_manifest(out_dir)
        if existing.get("content_hash") == digest and _counts(existing) == result.counts():
            return existing
        raise DataError(
            f"{out_dir} already holds snapshot {existing.get('content_hash')} of other data "
            f"(this batch is {digest}); write to a new folder"
        )
    for name, data in files:
        storage.write_bytes(storage.join(out_dir, name), data)
    shards = [name for name, _ in files]
    quarantine = None
    if result.rows_quarantined:
        quarantine = QUARANTINE_FILE
        storage.write_bytes(
            storage.join(out_dir, quarantine), parquet_bytes(parquet_safe(result.quarantined))
        )
    manifest = _manifest(result, digest, shards, quarantine, cfg, source, source_format)
    storage.write_json(manifest_uri, manifest)
    return manifest


def _manifest(
    result: ValidationResult,
    digest: str,
    shards: list[str],
    quarantine: str | None,
    cfg: DataConfig,
    source: str | None,
    source_format: str | None,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "source_format": source_format,
        **result.counts(),
        "snapshot": shards[0] if len(shards) == 1 else SNAPSHOT_DIR,
        "snapshot_files": shards,
        "quarantine": quarantine,
        "content_hash": digest,
        "contract": result.contract.to_dict(),
        "columns": list(result.accepted.columns),
        "problems": result.problems,
        "warnings": result.warnings,
        "dropped_columns": result.dropped_columns,
        "validation": cfg.validation.model_dump(mode="json"),
    }


def summary(manifest: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """What a step or the CLI reports: counts, hash, and the files as full URIs."""
    quarantine = manifest.get("quarantine")
    return {
        "rows_in": manifest["rows_in"],
        "rows_accepted": manifest["rows_accepted"],
        "rows_quarantined": manifest["rows_quarantined"],
        "content_hash": manifest["content_hash"],
        "snapshot": _resolve(out_dir, manifest["snapshot"]),
        "quarantine": _resolve(out_dir, quarantine) if quarantine else None,
        "manifest": storage.join(out_dir, MANIFEST),
        "warnings": list(manifest.get("warnings", [])),
    }


# ---- reading back -----------------------------------------------------------------------------
def read_manifest(location: str) -> dict[str, Any]:
    """The manifest of a snapshot folder (or the manifest file itself)."""
    uri = location if location.endswith(".json") else storage.join(location, MANIFEST)
    if not storage.exists(uri):
        raise DataError(f"no snapshot manifest at {uri}")
    try:
        manifest = storage.read_json(uri)
    except ValueError as err:
        raise DataError(f"snapshot manifest {uri} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or "snapshot" not in manifest:
        raise DataError(f"{uri} is not a snapshot manifest (no 'snapshot' key)")
    return manifest


def read_snapshot(location: str, verify: bool = False) -> pd.DataFrame:
    """The accepted rows of a snapshot folder; ``verify`` checks them against the hash."""
    manifest = read_manifest(location)
    base = _folder(location)
    files = manifest.get("snapshot_files") or [manifest["snapshot"]]
    frames = [_read_parquet(_resolve(base, f)) for f in files]
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    if verify and content_hash(frame) != manifest["content_hash"]:
        raise DataError(
            f"snapshot {base} does not match its content hash {manifest['content_hash']}: "
            "it was changed or damaged after it was written"
        )
    return frame


def read_quarantine(location: str) -> pd.DataFrame | None:
    """The quarantined rows of a snapshot folder, or None when there were none."""
    manifest = read_manifest(location)
    if not manifest.get("quarantine"):
        return None
    return _read_parquet(_resolve(_folder(location), manifest["quarantine"]))


def load_contract(uri: str) -> Contract:
    """A data contract from a contract.json, or from a snapshot's manifest.json."""
    if not storage.exists(uri):
        raise DataError(f"data contract not found: {uri}")
    try:
        data = storage.read_json(uri)
    except ValueError as err:
        raise DataError(f"data contract {uri} is not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("contract"), dict):
        data = data["contract"]
    try:
        return Contract.from_dict(data)
    except DataError:
        raise DataError(f"{uri} is not a data contract: it has no 'feature_columns' list") from None
    except TypeError as err:
        raise DataError(f"{uri} is not a data contract: {err}") from None


# ---- Parquet ----------------------------------------------------------------------------------
def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """A frame as Parquet, with page checksums so that damage is detected on reading."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    # Row groups of 64Ki rows: the unit a streamed reader shuffles and skips by.
    pq.write_table(table, buf, row_group_size=65_536, write_page_checksum=True)
    return buf.getvalue()


def parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns Parquet cannot store as they are (mixed types) become text, nulls kept."""
    import pyarrow as pa

    out = frame
    for col in frame.columns:
        if frame[col].dtype != object:
            continue
        try:
            pa.array(frame[col], from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):
            if out is frame:
                out = frame.copy()
            out[col] = [None if _is_null(v) else str(v) for v in frame[col]]
    return out


def _read_parquet(uri: str) -> pd.DataFrame:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise DataError(f"snapshot file missing: {uri}") from None
    return _decode(data, uri)


def _decode(data: bytes, label: str) -> pd.DataFrame:
    """A snapshot file's rows, checksums verified; nullable integers and booleans exact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sae_pipeline.data._exact import table_to_frame

    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"snapshot file {label} is damaged: {str(err).splitlines()[0]}") from None
    return table_to_frame(table)


def _accepted_files(accepted: pd.DataFrame, shard_rows: int) -> list[tuple[str, bytes]]:
    """(name, Parquet bytes) of the snapshot: one file, or shards of ``shard_rows`` rows."""
    if len(accepted) <= shard_rows:
        return [(SNAPSHOT_FILE, parquet_bytes(accepted))]
    return [
        (
            f"{SNAPSHOT_DIR}/part-{k:05d}.parquet",
            parquet_bytes(accepted.iloc[start : start + shard_rows].reset_index(drop=True)),
        )
        for k, start in enumerate(range(0, len(accepted), shard_rows))
    ]


# ---- helpers ----------------------------------------------------------------------------------
def _counts(manifest: dict[str, Any]) -> dict[str, int]:
    return {k: manifest.get(k) for k in ("rows_in", "rows_accepted", "rows_quarantined")}


def _folder(location: str) -> str:
    return location.rsplit("/", 1)[0] if location.endswith(".json") else location


def _resolve(base: str, path: str) -> str:
    """A manifest path relative to its folder (absolute ones, from older manifests, as they are)."""
    if path.startswith("/") or "://" in path:
        return path
    return storage.join(base, path)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
