"""Retraining after a drift check: its data, the training conf the monitor queues, or a run
in-process.

The new training data is the champion's training snapshot plus the batch's valid rows, written
once to ``<root>/retraining/<run key>/training_data.parquet`` before the review asks anyone
(``prepare_data``): streamed chunk by chunk into a staging folder and moved into place when
complete, so that memory is bounded by a chunk (plus 8 bytes per batch row for its ids), not
the data, and a killed writer leaves no file behind. A batch row supersedes the champion's row
with the same id; ``training_data.parquet.json`` beside it records the rule and the counts.
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
from sae_pipeline.steps._drift_decisions import report_retraining, retraining_data_uri

log = logging.getLogger(__name__)

__all__ = ["prepare_data", "retrain", "training_conf", "write_training_data"]

CHUNK_ROWS = 65_536  # rows read, converted and written at a time: the writer's memory bound


def due(ctx: dict[str, Any], summary: dict[str, Any]) -> bool:
    """Whether retraining may follow the check: it asks for it, or a person may choose it."""
    from sae_pipeline.monitoring.drift import DriftPolicy

    if summary.get("already_decided_by"):
        return False
    review = DriftPolicy.model_validate(ctx["policy"]).review
    return bool(summary.get("retrain_triggered")) or review.required(summary.get("decision", ""))


def prepare_data(ctx: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Write and check the retraining data before anyone is asked; the summary, with its counts.

    A batch that cannot be retrained on (a missing column, ids of another kind) fails here,
    before a review, not in the training run after someone approved it.
    """
    if not due(ctx, summary):
        return summary
    out = retraining_data_uri(ctx["artifacts_root"], ctx["run_key"])
    if storage.exists(out + ".json"):  # a retry: written and checked already
        info = storage.read_json(out + ".json")
    else:
        info = write_training_data(out, ModelRef.from_dict(ctx["model"]), ctx["batch"])
    return {**summary, "retraining_data": {"uri": out, **info}}


def training_conf(ctx: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any] | None:
    """The training DAG's conf when the check (and its review) asks for retraining, else None.

    The new training data is the champion's training snapshot plus the batch's valid rows,
    written once to the store (``prepare_data``); the config is the champion's own (same
    architecture and settings), with only the data source replaced. ``monitor_run`` names this
    run: the training run finds the review's record from it (``review_tags_for``), and reports
    its end back there (``report_retraining``).
    """
    if not summary.get("retrain_triggered"):
        return None
    ref = ModelRef.from_dict(ctx["model"])
    out = retraining_data_uri(ctx["artifacts_root"], ctx["run_key"])
    if not storage.exists(out + ".json"):
        write_training_data(out, ref, ctx["batch"])
    conf: dict[str, Any] = {
        "data_source": out,
        "artifacts_root": ctx["artifacts_root"],
        "tracking_uri": ctx["tracking_uri"],
        "encoder_model_name": ref.name,
        "scaler_model_name": ctx["scaler_model_name"],
        "monitor_run": ctx["run_id"],
    }
    config = champion.config_uri(ref)
    if storage.is_local(config) and storage.exists(config):
        conf["config_path"] = str(storage.local_path(config))
    return conf


def retrain(ctx: dict[str, Any], summary: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """Run the training steps in this process on what the DAG would queue; None if not due.

    Success or failure is written back to the monitor run's record and MLflow run.
    """
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
    try:
        result = run_training(
            run_id, conf.get("config_path"), overrides, monitor_run=conf["monitor_run"]
        )
    except Exception as err:
        report_retraining(ctx["artifacts_root"], ctx["run_id"], run_id, False, f"{err}")
        raise
    out = {k: result[k] for k in ("evaluate", "register", "promote")}
    reg, gate = out["register"], out["promote"]
    done = (
        f"{reg['encoder_model_name']} v{reg['encoder_version']} registered; "
        f"{'promoted' if gate['promoted'] else 'not promoted'}: {gate['reason']}"
    )
    report_retraining(ctx["artifacts_root"], ctx["run_id"], run_id, True, done)
    return out


def write_training_data(out: str, ref: ModelRef, batch: dict[str, Any]) -> dict[str, Any]:
    """Write the champion's snapshot rows, then the batch's finite rows, to ``out``.

    Chunk by chunk (``CHUNK_ROWS``), in snapshot order then batch order, the contract's
    features (float64), label and id column only. One schema for the whole file: the
    snapshot's types for label and id, to which each batch chunk is cast; every batch file is
    checked for those columns and for the id's kind (text against text, numbers against
    numbers) before anything is written. A batch row supersedes the champion's row with the
    same id (``superseded``): entities scored again carry their newer values, and the training
    run's validation sees each id once. The file is staged and moved into place when
    complete, with ``<out>.json`` beside it (the counts and the rule); a bad batch raises
    ``DataError`` and leaves no file. Returns that manifest.
    """
    import pyarrow.parquet as pq

    manifest = champion.validate_manifest(ref)
    contract = manifest["contract"]
    features = contract["feature_columns"]
    label, id_col = contract.get("label_column"), contract.get("id_column")
    shards = parts.snapshot_files(champion.snapshot_dir(ref), manifest)
    with batches.open_parquet(shards[0]) as pf:
        snapshot_schema = pf.schema_arrow
    if id_col not in snapshot_schema.names:
        id_col = None
    label_in = _check_batch_files(batch, snapshot_schema, features, label, id_col)
    extra = [c for c in (label if label_in else None, id_col) if c and c in snapshot_schema.names]
    schema = _schema(snapshot_schema, features, extra)
    where = f"batch {batch['key']}"
    dropped = _superseded_ids(shards, batch, schema, features, id_col, where) if id_col else None

    out_dir, name = out.rsplit("/", 1)
    storage.remove_stages(out_dir)  # what a killed attempt left
    stage = storage.new_stage(out_dir)
    rows = {"champion": 0, "superseded": 0, "batch": 0, "batch_non_finite": 0}
    try:
        with (
            storage.staged_writer(stage, name) as fh,
            pq.ParquetWriter(fh, schema, write_page_checksum=True) as writer,
        ):
            for rb in batches.iter_chunks(shards, schema.names, CHUNK_ROWS):
                if dropped is not None:
                    gone = dropped.members(rb.column(id_col))
                    if gone.any():
                        rows["superseded"] += int(gone.sum())
                        rb = rb.filter(~gone)
                x = batches.feature_matrix(rb, features)  # (rows, features) float64
                writer.write_table(_conform(rb, x, schema, features, "the champion's snapshot"))
                rows["champion"] += rb.num_rows
            for rb, x in _finite_batch_chunks(batch, schema, features, rows):
                writer.write_table(_conform(rb, x, schema, features, where))
                rows["batch"] += rb.num_rows
    except BaseException:
        storage.remove(stage)
        raise
    storage.commit(stage, out_dir, {name: name})
    info = {
        "rows": rows,
        "id_column": id_col,
        "label_column": label if label_in else None,
        "rule": SUPERSEDE_RULE if id_col else "no id column: every row kept",
        "batch": batch["key"],
        "champion": f"{ref.name} v{ref.version}",
    }
    storage.write_json(out + ".json", info)
    log.info("retraining data %s: %s", out, rows)
    return info


SUPERSEDE_RULE = "a batch row supersedes the champion snapshot's row with the same id"


def _finite_batch_chunks(batch, schema, features, rows):
    """(chunk, features) of the batch's rows whose features are all finite."""
    for rb in batches.iter_chunks(batch["files"], schema.names, CHUNK_ROWS):
        x = batches.feature_matrix(rb, features)
        ok, _ = batches.finite_rows(x, features)
        if not ok.all():
            rows["batch_non_finite"] += int((~ok).sum())
            rb, x = rb.filter(ok), x[ok]
        yield rb, x


def _kind(t) -> str:
    """An id type's kind: values of two kinds are never the same id (7 is not "0007")."""
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "text"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    return str(t)


def _check_batch_files(batch, snapshot_schema, features, label, id_col) -> bool:
    """Each batch file holds the features, the id (of the champion's kind) and, when any file
    does, the label; whether the label is in. ``DataError`` names the file otherwise."""
    files, has_label = batch["files"], []
    for f in files:
        with batches.open_parquet(f) as pf:
            file_schema = pf.schema_arrow
        names = set(file_schema.names)
        missing = [c for c in features if c not in names]
        if missing:
            raise DataError(
                f"batch {batch['key']}: file {f} lacks the champion's feature column(s) "
                f"{', '.join(map(repr, missing))}; cannot retrain on it"
            )
        if id_col and id_col not in names:
            raise DataError(
                f"the champion's data has the id column {id_col!r} but file {f} of batch "
                f"{batch['key']} lacks it; cannot retrain on the two together"
            )
        if id_col:
            want, got = snapshot_schema.field(id_col).type, file_schema.field(id_col).type
            if _kind(want) != _kind(got):
                raise DataError(
                    f"batch {batch['key']}: file {f} holds the id column {id_col!r} as {got} "
                    f"({_kind(got)}) but the champion's ids are {want} ({_kind(want)}): ids of "
                    "two kinds never match (7 is not '0007'); write the batch's ids as the "
                    "champion's"
                )
        has_label.append(bool(label) and label in names)
    if any(has_label) and not all(has_label):
        lacking = [f for f, h in zip(files, has_label, strict=True) if not h]
        raise DataError(
            f"the label column {label!r} is in some files of batch {batch['key']} but not in "
            f"{', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}: give it in every "
            "file or in none"
        )
    if label and not any(has_label):
        log.warning("batch lacks the label %r: retraining without it (no probes)", label)
    return all(has_label) and bool(label) and label in snapshot_schema.names


class _IdSet:
    """Ids to drop, as sorted 64-bit hashes confirmed by value: 8 bytes per batch row."""

    def __init__(self, hashes, values, id_type):
        import numpy as np

        self.hashes = np.unique(hashes)
        self.values, self.id_type = values, id_type

    @staticmethod
    def hash(column):
        """(hashes, valid mask) of an Arrow id column; nulls are never ids."""
        import numpy as np
        import pandas as pd
        import pyarrow as pa
        import pyarrow.compute as pc

        valid = column.is_valid().to_numpy(zero_copy_only=False)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            values = pc.fill_null(column, 0).to_numpy(zero_copy_only=False)
        else:
            values = np.array(["" if v is None else v for v in column.to_pylist()], dtype=object)
        return np.asarray(pd.util.hash_array(values, categorize=False), dtype=np.uint64), valid

    def candidates(self, column):
        import numpy as np

        h, valid = self.hash(column)
        pos = np.clip(np.searchsorted(self.hashes, h), 0, max(len(self.hashes) - 1, 0))
        return valid & (self.hashes[pos] == h) if len(self.hashes) else np.zeros(len(h), bool)

    def members(self, column):
        """Mask of the rows of ``column`` whose id is in the set (by hash, then by value)."""
        import numpy as np

        hit = self.candidates(column)
        if hit.any():
            values = column.filter(hit).to_pylist()
            hit[hit] = np.fromiter((v in self.values for v in values), bool, len(values))
        return hit


def _superseded_ids(shards, batch, schema, features, id_col, where) -> _IdSet:
    """The champion's ids that a finite batch row carries again (three passes, ids only)."""
    import numpy as np

    id_type = schema.field(id_col).type
    hashes = []
    for rb, _x in _finite_batch_chunks(batch, schema, features, {"batch_non_finite": 0}):
        column = _conform_id(rb.column(id_col), id_type, where, id_col)
        h, valid = _IdSet.hash(column)
        hashes.append(h[valid])
    ids = _IdSet(np.concatenate(hashes) if hashes else np.empty(0, np.uint64), set(), id_type)
    # Champion ids whose hash a batch id has, then those the batch holds by value.
    wanted = set()
    for rb in batches.iter_chunks(shards, [id_col], CHUNK_ROWS):
        column = rb.column(id_col)
        hit = ids.candidates(column)
        wanted.update(column.filter(hit).to_pylist())
    if wanted:
        found = set()
        for rb, _x in _finite_batch_chunks(batch, schema, features, {"batch_non_finite": 0}):
            column = _conform_id(rb.column(id_col), id_type, where, id_col)
            found.update(v for v in column.to_pylist() if v in wanted)
        ids.values = found
    return ids


def _conform_id(column, id_type, where: str, name: str):
    import pyarrow as pa

    try:
        return column.cast(id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DataError(
            f"column {name!r} of {where} cannot be cast from {column.type} to {id_type} "
            f"(the champion's training data): {str(err).splitlines()[0]}"
        ) from None


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
