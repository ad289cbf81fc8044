"""The batch-encoding DAG's steps: plan a batch into shards, encode each, commit the output.

The mechanics (shards, chunks, atomic parts) live in ``sae_pipeline.engine.batch_encoding``;
these steps add the run's context, the staging folder and the manifest that marks completion.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sae_pipeline import storage
from sae_pipeline.engine.batch_encoding import (
    CHUNK_ROWS,
    MANIFEST,
    QUARANTINE,
    SHARD_ROWS,
    encode_shard,
    plan,
    read_output,
    read_quarantine,
)
from sae_pipeline.errors import DataError
from sae_pipeline.steps.batch_context import batch_context

__all__ = ["read_output", "read_quarantine"]

log = logging.getLogger(__name__)


# ---- the DAG's steps --------------------------------------------------------------------------
def _part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def context(run_id: str, params: dict[str, Any], events=None) -> dict[str, Any]:
    """The encoding DAG's context from its params (or Asset events): ``batch_context`` +
    where the output goes and the chunk and shard sizes."""
    return prepare(
        batch_context(run_id, params, events),
        params.get("output"),
        params.get("chunk_rows"),
        params.get("shard_rows"),
    )


def asset_extra(manifest: dict[str, Any]) -> dict[str, Any]:
    """What downstream consumers learn from the encoded-batch Asset event."""
    keep = ("output", "batch_key", "model_name", "model_version", "model_uri", "rows_in",
            "rows_encoded", "rows_quarantined")  # fmt: skip
    return {"path": manifest["output"], **{k: manifest[k] for k in keep}}


def prepare(
    ctx: dict[str, Any],
    output: str | None = None,
    chunk_rows: int | None = None,
    shard_rows: int | None = None,
) -> dict[str, Any]:
    """Add where the encoded batch goes (default: by model version and batch) to a context."""
    model, batch = ctx["model"], ctx["batch"]
    if output is None:
        output = storage.join(
            ctx["artifacts_root"], "encodings", model["name"], f"v{model['version']}", batch["key"]
        )
    output = storage.normalize_root(output)
    if storage.is_local(output):
        final = storage.local_path(output)
        staging = str(final.parent / f".{final.name}.{ctx['run_key']}.staging")
    else:
        staging = output
    return {
        **ctx,
        "output": output,
        "staging": staging,
        "chunk_rows": int(chunk_rows or CHUNK_ROWS),
        "shard_rows": int(shard_rows or SHARD_ROWS),
    }


def committed(ctx: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier, complete encoding of this batch by this model version."""
    uri = storage.join(ctx["output"], MANIFEST)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    same = (
        manifest.get("batch_key") == ctx["batch"]["key"]
        and manifest.get("model_version") == ctx["model"]["version"]
    )
    return manifest if same else None


def plan_step(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards to encode; none when this batch is already encoded by this version."""
    if committed(ctx) is not None:
        log.info("%s is already encoded by this model version; nothing to do", ctx["output"])
        return []
    shards = plan(ctx["batch"]["files"], ctx["shard_rows"])
    log.info("%d row(s) in %d shard(s)", ctx["batch"]["rows"], len(shards))
    return shards


def encode_shard_step(
    ctx: dict[str, Any], shard: dict[str, Any], on_rows: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Encode one shard with the pinned model version into the staging folder."""
    from sae_pipeline.engine import trainer
    from sae_pipeline.registry import champion
    from sae_pipeline.registry.champion import ModelRef

    encoder = champion.load_encoder(ModelRef.from_dict(ctx["model"]))
    part = storage.join(ctx["staging"], _part_name(shard["index"]))
    quarantine = storage.join(ctx["staging"], QUARANTINE, _part_name(shard["index"]))
    result = encode_shard(
        encoder,
        shard,
        part,
        quarantine,
        id_column=encoder.contract.id_column,
        chunk_rows=ctx["chunk_rows"],
        device=trainer.resolve_device("auto"),
        on_rows=on_rows,
    )
    log.info(
        "shard %d: %d in, %d encoded, %d quarantined %s",
        shard["index"],
        result["rows_in"],
        result["rows_encoded"],
        result["rows_quarantined"],
        result["reasons"] or "",
    )
    return result


def commit_step(ctx: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Check the row counts, publish the output at once, and return its manifest."""
    existing = committed(ctx)
    if existing is not None:
        return existing
    # Airflow passes mapped results as a lazy sequence: index it within its length (plain
    # iteration asks for one item past the end, which the task log shows as an error).
    results = sorted((results[i] for i in range(len(results))), key=lambda r: r["index"])
    totals = {
        k: sum(r[k] for r in results) for k in ("rows_in", "rows_encoded", "rows_quarantined")
    }
    if totals["rows_in"] != ctx["batch"]["rows"]:
        raise DataError(
            f"batch {ctx['batch']['key']}: {totals['rows_in']} row(s) encoded or quarantined "
            f"but the batch has {ctx['batch']['rows']}"
        )
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r["reasons"])
    model = ctx["model"]
    manifest = {
        "output": ctx["output"],
        "batch_key": ctx["batch"]["key"],
        "batch_files": ctx["batch"]["files"],
        "model_name": model["name"],
        "model_version": model["version"],
        "model_uri": f"models:/{model['name']}/{model['version']}",
        **totals,
        "parts": [_part_name(r["index"]) for r in results],
        "quarantine": [
            f"{QUARANTINE}/{_part_name(r['index'])}" for r in results if r["quarantine"]
        ],
        "quarantine_reasons": dict(reasons.most_common(10)),
        "dag_run_id": ctx["run_id"],
        "chunk_rows": ctx["chunk_rows"],
    }
    if storage.is_local(ctx["output"]):
        staging, final = storage.local_path(ctx["staging"]), storage.local_path(ctx["output"])
        staging.mkdir(parents=True, exist_ok=True)
        storage.write_json(str(staging / MANIFEST), manifest)
        if final.exists():  # an older encoding of another batch/version under this name
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)
    else:
        storage.write_json(storage.join(ctx["output"], MANIFEST), manifest)
    log.info(
        "encoded %s: %d in = %d encoded + %d quarantined",
        ctx["output"],
        totals["rows_in"],
        totals["rows_encoded"],
        totals["rows_quarantined"],
    )
    return manifest


def encode_batch(ctx: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Every step in this process, shard after shard (the CLI's ``encode``)."""
    shards = plan_step(ctx)
    bar = None
    if progress and shards:
        from tqdm import tqdm

        bar = tqdm(total=ctx["batch"]["rows"], unit="row", unit_scale=True, desc="encode")
    try:
        results = [
            encode_shard_step(ctx, s, on_rows=bar.update if bar is not None else None)
            for s in shards
        ]
    finally:
        if bar is not None:
            bar.close()
    return commit_step(ctx, results)
