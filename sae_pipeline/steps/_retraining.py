"""Retraining after a drift check: the training conf the monitor queues, or a run in-process.

The new training data is the champion's training snapshot plus the batch's valid rows, written
once to ``<root>/retraining/<run key>/training_data.parquet``: streamed chunk by chunk into a
staging folder and moved into place when complete, so that memory is bounded by a chunk, not
the data, and a killed writer leaves no file behind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sae_pipeline import storage
from sae_pipeline.data import batches, parts
from sae_pipeline.errors import DataError
from sae_pipeline.registry import champion
from sae_pipeline.registry.champion import ModelRef

log = logging.getLogger(__name__)

__all__ = ["retrain", "training_conf", "write_training_data"]

CHUNK_ROWS = 65_536  # rows read, converted and written at a time: the writer's memory bound


def training_conf(ctx: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any] | None:
    """The training DAG's conf when the check asks for retraining, else None.

    The new training data is the champion's training snapshot plus the batch's valid rows,
    written once to the store; the config is the champion's own (same architecture and
    settings), with only the data source replaced.
    """
    if not summary.get("retrain_triggered"):
        return None
    ref = ModelRef.from_dict(ctx["model"])
    out = storage.join(ctx["artifacts_root"], "retraining", ctx["run_key"], "training_data.parquet")
    if not storage.exists(out):
        write_training_data(out, ref, ctx["batch"])
    conf: dict[str, Any] = {
        "data_source": out,
        "artifacts_root": ctx["artifacts_root"],
        "tracking_uri": ctx["tracking_uri"],
        "encoder_model_name": ref.name,
        "scaler_model_name": ctx["scaler_model_name"],
    }
    if summary.get("review"):  # who decided: tagged on the retrained version
        from sae_pipeline.monitoring.review import review_tags

        conf["review"] = review_tags(summary["review"])
    config = champion.config_uri(ref)
    if storage.is_local(config) and storage.exists(config):
        conf["config_path"] = str(storage.local_path(config))
    return conf


def retrain(ctx: dict[str, Any], summary: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """Run the training steps in this process on what the DAG would queue; None if not due."""
    from sae_pipeline.steps.training import run_training

    conf = training_conf(ctx, summary)
    if conf is None:
        return None
    overrides = {
        "data.source": conf["data_source"],
        "artifacts_root": conf["artifacts_root"],
        "registry.tracking_uri": conf["tracking_uri"],
        "registry.encoder_model_name": conf["encoder_model_name"],
        "registry.scaler_model_name": conf["scaler_model_name"],
    }
    result = run_training(run_id, conf.get("config_path"), overrides)
    return {k: result[k] for k in ("evaluate", "register", "promote")}


def write_training_data(out: str, ref: ModelRef, batch: dict[str, Any]) -> dict[str, int]:
    """Write the champion's snapshot rows, then the batch's finite rows, to ``out``.

    Chunk by chunk (``CHUNK_ROWS``), in snapshot order then batch order, the contract's
    features (float64), label and id column only. One schema for the whole file: the
    snapshot's types for label and id, to which each batch chunk is cast. The file is staged
    and moved into place when complete; an impossible cast raises ``DataError`` and leaves no
    file. Returns the row counts written from each side.
    """
    import pyarrow.parquet as pq

    manifest = champion.validate_manifest(ref)
    contract = manifest["contract"]
    features = contract["feature_columns"]
    label, id_col = contract.get("label_column"), contract.get("id_column")
    shards = parts.snapshot_files(champion.snapshot_dir(ref), manifest)
    with batches.open_parquet(shards[0]) as pf:
        snapshot_schema = pf.schema_arrow
    names = set()
    for f in batch["files"]:
        with batches.open_parquet(f) as pf:
            names |= set(pf.schema_arrow.names)
    missing = [c for c in features if c not in names]
    if missing:
        raise DataError(
            f"batch {batch['key']} lacks the champion's feature column(s) "
            f"{', '.join(map(repr, missing))}; cannot retrain on it"
        )
    if id_col and id_col not in names:
        raise DataError(
            f"the champion's data has the id column {id_col!r} but batch "
            f"{batch['key']} lacks it; cannot retrain on the two together"
        )
    if label and label not in names:
        log.warning("batch lacks the label %r: retraining without it (no probes)", label)
    extra = [c for c in (label, id_col) if c and c in names and c in snapshot_schema.names]
    schema = _schema(snapshot_schema, features, extra)

    out_dir, name = out.rsplit("/", 1)
    storage.remove_stages(out_dir)  # what a killed attempt left
    stage = storage.new_stage(out_dir)
    rows = {"champion": 0, "batch": 0}
    try:
        with (
            storage.staged_writer(stage, name) as fh,
            pq.ParquetWriter(fh, schema, write_page_checksum=True) as writer,
        ):
            for rb in batches.iter_chunks(shards, schema.names, CHUNK_ROWS):
                x = batches.feature_matrix(rb, features)  # (rows, features) float64
                writer.write_table(_conform(rb, x, schema, features, "the champion's snapshot"))
                rows["champion"] += rb.num_rows
            for rb in batches.iter_chunks(batch["files"], schema.names, CHUNK_ROWS):
                x = batches.feature_matrix(rb, features)
                ok, _ = batches.finite_rows(x, features)
                if not ok.all():
                    rb, x = rb.filter(ok), x[ok]
                writer.write_table(_conform(rb, x, schema, features, f"batch {batch['key']}"))
                rows["batch"] += rb.num_rows
    except BaseException:
        storage.remove(stage)
        raise
    storage.commit(stage, out_dir, {name: name})
    log.info(
        "retraining data %s: %d champion row(s) + %d batch row(s)",
        out,
        rows["champion"],
        rows["batch"],
    )
    return rows


def _schema(snapshot_schema, features: Sequence[str], extra: Sequence[str]):
    """Features as float64; label and id with the snapshot's types (decimals as float64, as
    the snapshot reader gives them)."""
    import pyarrow as pa

    fields = [pa.field(c, pa.float64()) for c in features]
    for c in extra:
        t = snapshot_schema.field(c).type
        fields.append(pa.field(c, pa.float64() if pa.types.is_decimal(t) else t))
    return pa.schema(fields)


def _conform(rb, x, schema, features: Sequence[str], where: str):
    """A chunk as a table of ``schema``: features from ``x``, other columns cast (safely)."""
    import numpy as np
    import pyarrow as pa

    from sae_pipeline.data._exact import decimal_to_float

    arrays = [pa.array(np.ascontiguousarray(x[:, j])) for j in range(len(features))]
    for field in schema:
        if field.name in features:
            continue
        column = rb.column(field.name)
        try:
            if pa.types.is_decimal(column.type) and pa.types.is_floating(field.type):
                column = decimal_to_float(column)
            arrays.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise DataError(
                f"column {field.name!r} of {where} cannot be cast from {column.type} to "
                f"{field.type} (the champion's training data): {str(err).splitlines()[0]}"
            ) from None
    return pa.Table.from_arrays(arrays, schema=schema)
