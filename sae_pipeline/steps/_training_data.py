"""Training steps on data: ingest, validate (snapshot), split and fit the scaler."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sae_pipeline import storage
from sae_pipeline.config import PipelineConfig
from sae_pipeline.steps._run import _uri, config_of

log = logging.getLogger(__name__)


# ---- data -------------------------------------------------------------------------------------
def ingest(ctx: dict[str, Any]) -> dict[str, Any]:
    """Read the source once and keep it, as read, as the run's raw copy; the source is only read."""
    from sae_pipeline.data.contract import content_hash
    from sae_pipeline.data.ingest import copy_raw, open_stream
    from sae_pipeline.data.snapshot import parquet_bytes, parquet_safe
    from sae_pipeline.data.sources import describe_source, read_source, source_format

    cfg = config_of(ctx)
    out = _uri(ctx, "ingest", "raw.parquet")
    manifest_uri = _uri(ctx, "ingest", "manifest.json")
    if storage.exists(manifest_uri):
        return storage.read_json(manifest_uri)
    stream = open_stream(cfg.data)  # a large Parquet or CSV source: copied chunk by chunk
    if stream is not None:
        raw = copy_raw(stream, _uri(ctx, "ingest", "raw"), cfg.data.snapshot_shard_rows)
        manifest = {
            "raw": _uri(ctx, "ingest", "raw"),
            "mode": "stream",
            "rows_in": raw["rows"],
            "raw_hash": raw["hash"],
            "source": describe_source(cfg.data.source),
            "source_format": source_format(cfg.data),
        }
        storage.write_json(manifest_uri, manifest)
        log.info("ingested %d rows from %s (streamed)", raw["rows"], manifest["source"])
        return manifest
    frame = parquet_safe(read_source(cfg.data))
    storage.write_bytes(out, parquet_bytes(frame))
    manifest = {
        "raw": out,
        "rows_in": len(frame),
        "raw_hash": content_hash(frame),
        "source": describe_source(cfg.data.source),
        "source_format": source_format(cfg.data),
    }
    storage.write_json(manifest_uri, manifest)
    log.info("ingested %d rows from %s", len(frame), manifest["source"])
    return manifest


def validate(ctx: dict[str, Any]) -> dict[str, Any]:
    """Validate the raw copy against the data contract (the configured one, or one recorded now).

    Writes the snapshot folder ``validate/`` exactly as ``sae-pipeline ingest`` does: accepted
    rows, quarantined rows with their reasons, and ``manifest.json`` (counts, content hash,
    contract). Rows in, accepted and quarantined go to the log and to MLflow.
    """
    from sae_pipeline.data import snapshot

    cfg = config_of(ctx)
    out_dir = _uri(ctx, "validate")
    if storage.exists(storage.join(out_dir, snapshot.MANIFEST)):
        return snapshot.summary(snapshot.read_manifest(out_dir), out_dir)
    raw = storage.read_json(_uri(ctx, "ingest", "manifest.json"))
    contract = snapshot.load_contract(cfg.data.contract) if cfg.data.contract else None
    where = {"source": raw.get("source"), "source_format": raw.get("source_format")}
    if raw.get("mode") == "stream":
        from sae_pipeline.data.ingest import CHUNK_ROWS, write_snapshot_stream
        from sae_pipeline.data.sources import ParquetStream

        log.info("validate: the raw copy is checked in chunks of %d rows", CHUNK_ROWS)
        stream = ParquetStream(raw["raw"], CHUNK_ROWS)
        manifest = write_snapshot_stream(stream, cfg.data, out_dir, contract, **where)
    else:
        frame = storage.read_parquet(raw["raw"])
        manifest = snapshot.write_snapshot(frame, cfg.data, out_dir, contract, **where)
    result = snapshot.summary(manifest, out_dir)
    log.info(
        "validated %d rows in: %d accepted, %d quarantined; snapshot %s",
        result["rows_in"],
        result["rows_accepted"],
        result["rows_quarantined"],
        result["content_hash"],
    )
    if result["rows_quarantined"]:
        log.warning(
            "%d of %d rows quarantined (%s): %s",
            result["rows_quarantined"],
            result["rows_in"],
            result["quarantine"],
            "; ".join(p["message"] for p in manifest["problems"]),
        )
    for warning in manifest["warnings"]:
        log.warning("%s", warning)
    _track_snapshot(ctx, cfg, result)
    return result


def _track_snapshot(ctx: dict[str, Any], cfg: PipelineConfig, result: dict[str, Any]) -> None:
    """Counts as metrics, the content hash as a tag, manifest and quarantine as artifacts."""
    import tempfile

    from sae_pipeline.registry import tracking

    counts = {k: result[k] for k in ("rows_in", "rows_accepted", "rows_quarantined")}
    tracking.log_metrics(cfg, ctx["mlflow_run_id"], counts)
    tracking.set_run_tags(cfg, ctx["mlflow_run_id"], {"sae.data_hash": result["content_hash"]})
    with tempfile.TemporaryDirectory() as tmp:
        for uri in (result["manifest"], result["quarantine"]):
            if uri:
                local = Path(tmp) / uri.rsplit("/", 1)[-1]
                local.write_bytes(storage.read_bytes(uri))
                tracking.log_artifact_file(cfg, ctx["mlflow_run_id"], str(local), "data")


def split(ctx: dict[str, Any]) -> dict[str, Any]:
    """Deterministic train/validation/test split of the accepted rows.

    Small data (``training.in_memory_max_bytes``): stored row indices, stratified by label.
    Larger data: a hash of each row's position decides its part (``data.parts.HashSplit``),
    with no per-row array and no stratification. The decision goes to the log and to
    ``split/plan.json``, which every later step follows.
    """
    from sae_pipeline.data.contract import split_indices
    from sae_pipeline.data.parts import HashSplit
    from sae_pipeline.data.snapshot import read_manifest
    from sae_pipeline.steps import _training_stream as ts

    cfg = config_of(ctx)
    plan_uri = _uri(ctx, "split", "plan.json")
    if storage.exists(plan_uri):
        return {"indices": _uri(ctx, "split", "indices.npz"), **_split_summary(ts.plan(ctx))}
    manifest = read_manifest(_uri(ctx, "validate"))
    rows, features = manifest["rows_accepted"], len(manifest["contract"]["feature_columns"])
    mode = ts.decide(cfg, rows, features)
    log.info(
        "split: %d rows x %d features = %.1f MiB as float32 %s training.in_memory_max_bytes "
        "(%.1f MiB): training %s",
        rows,
        features,
        rows * features * 4 / 2**20,
        "<=" if mode == ts.MEMORY else ">",
        cfg.training.in_memory_max_bytes / 2**20,
        "in memory" if mode == ts.MEMORY else "streamed from the snapshot's shards",
    )
    if mode == ts.MEMORY:
        from sae_pipeline.data.snapshot import read_snapshot

        frame = read_snapshot(_uri(ctx, "validate"), verify=True)
        label = manifest["contract"]["label_column"]
        labels = frame[label].to_numpy() if label else None
        idx = split_indices(len(frame), labels, cfg.split)
        storage.write_arrays(_uri(ctx, "split", "indices.npz"), **idx)
        info = {"mode": mode, "rows": {k: len(v) for k, v in idx.items()}}
    else:
        s = HashSplit(cfg.split.seed, cfg.split.val_fraction, cfg.split.test_fraction)
        info = {"mode": mode, "split": s.to_dict(), "rows": s.counts(rows)}
    storage.write_json(plan_uri, info)
    return {"indices": _uri(ctx, "split", "indices.npz"), **_split_summary(info)}


def _split_summary(info: dict[str, Any]) -> dict[str, Any]:
    return {"mode": info["mode"], **{f"rows_{k}": v for k, v in info["rows"].items()}}


def _dataset(ctx: dict[str, Any]) -> dict[str, Any]:
    """Features and labels of each part, unscaled, from the snapshot and the split (streamed
    runs: fixed-size seeded samples of each part, ``_training_stream.dataset``)."""
    import numpy as np

    from sae_pipeline.data.snapshot import read_manifest, read_snapshot
    from sae_pipeline.steps import _training_stream as ts

    if ts.streamed(ctx):
        return ts.dataset(ctx, config_of(ctx))
    manifest = read_manifest(_uri(ctx, "validate"))
    contract = manifest["contract"]
    frame = read_snapshot(_uri(ctx, "validate"))
    idx = storage.read_arrays(_uri(ctx, "split", "indices.npz"))
    x = frame[contract["feature_columns"]].to_numpy(dtype=np.float64)
    y = frame[contract["label_column"]].to_numpy() if contract["label_column"] else None
    data: dict[str, Any] = {"frame": frame, "contract": contract}
    for part, ix in idx.items():
        data[f"x_{part}"] = x[ix]
        data[f"y_{part}"] = y[ix] if y is not None else None
    return data


def _scaled(ctx: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The scaled parts: stored in memory mode, the scaled samples of ``data`` when streamed."""
    from sae_pipeline.data.scaling import apply_scaler, from_state
    from sae_pipeline.steps import _training_stream as ts

    if not ts.streamed(ctx):
        return storage.read_arrays(_uri(ctx, "scaler", "scaled.npz"))
    scaler = from_state(storage.read_json(_uri(ctx, "scaler", "scaler.json")))
    return {p: apply_scaler(scaler, data[f"x_{p}"]) for p in ("train", "val", "test")}


def fit_scaler(ctx: dict[str, Any]) -> dict[str, Any]:
    """Fit the scaler on the training part only; in memory, store the scaled parts with it.

    Streamed: the scaler is fitted by ``partial_fit`` over the training part's float64
    chunks (robust: on a fixed-size seeded sample), then the part is stored once, scaled, as
    a row cache (``data.row_cache``, unless ``training.row_cache`` is off; without one,
    training scales each chunk on the fly the same way).
    """
    from sae_pipeline.data.scaling import (
        ROBUST_SAMPLE_ROWS,
        apply_scaler,
        fit_scaler_stream,
        from_state,
        to_state,
    )
    from sae_pipeline.data.scaling import fit_scaler as fit
    from sae_pipeline.steps import _training_stream as ts

    cfg = config_of(ctx)
    # The fitted state as JSON (no pickle): data.scaling.from_state rebuilds the scaler.
    scaler_uri, scaled_uri = _uri(ctx, "scaler", "scaler.json"), _uri(ctx, "scaler", "scaled.npz")
    mode = ts.plan(ctx)["mode"]
    if mode == ts.STREAM:
        if storage.exists(scaler_uri):
            scaler = from_state(storage.read_json(scaler_uri))
        else:
            scaler = fit_scaler_stream(
                cfg.scaler.kind,
                ts.part_chunks(ctx, "train"),
                lambda: ts.sample(ctx, "train", ROBUST_SAMPLE_ROWS, cfg.split.seed, False)[0],
            )
            storage.write_json(scaler_uri, to_state(scaler))
        ts.train_cache(ctx, cfg, scaler)  # written here, once, scaled: a second pass
        return {"scaler": scaler_uri, "scaled": None, "kind": cfg.scaler.kind, "mode": mode}
    if not storage.exists(scaled_uri):
        data = _dataset(ctx)
        scaler = fit(cfg.scaler.kind, data["x_train"])
        storage.write_json(scaler_uri, to_state(scaler))
        storage.write_arrays(
            scaled_uri,
            **{p: apply_scaler(scaler, data[f"x_{p}"]) for p in ("train", "val", "test")},
        )
    return {"scaler": scaler_uri, "scaled": scaled_uri, "kind": cfg.scaler.kind, "mode": mode}
