"""The batch-encoding DAG's steps: plan a batch into shards, encode each, commit the output.

The mechanics (shards, chunks, atomic parts) live in ``sae_pipeline.engine.batch_encoding``;
these steps add the run's context, the staging folder and the manifest that marks completion.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sae_pipeline import boundary, storage
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
from sae_pipeline.errors import ConfigError, DataError
from sae_pipeline.steps.batch_context import batch_context

__all__ = ["read_output", "read_quarantine"]

log = logging.getLogger(__name__)

# Batch encoding runs on CPU workers (the DAG's default queue), on their CPU: its time goes to
# Parquet and numpy work, a CPU worker runs 4 shards at once and a GPU worker 1, and the
# network is a few small matrix products per chunk. bench/cuda_check.py prints encoding rows/s
# on both; move it only when a GPU's number wins (docs/encoding-and-drift.md).
ENCODE_DEVICE = "cpu"


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
    """Add where the encoded batch goes (default: by model version and batch) to a context.

    Refuses, before any work, sizes that are not positive and an output folder that encode
    may not replace (``check_output``).
    """
    chunk_rows, shard_rows = check_sizes(chunk_rows, shard_rows)
    model, batch = ctx["model"], ctx["batch"]
    if output is None:
        output = storage.join(
            ctx["artifacts_root"], "encodings", model["name"], f"v{model['version']}", batch["key"]
        )
    # A place encode writes (and replaces): under $SAE_ALLOWED_ARTIFACT_ROOTS, normalised.
    output = storage.normalize_root(boundary.artifact_location(output, "output"))
    if storage.is_local(output):
        final = storage.local_path(output)
        staging = str(final.parent / f".{final.name}.{ctx['run_key']}.staging")
        prefix = ""
    else:
        # An object store has no atomic rename: the parts go under a prefix of their own (one
        # per batch content and model version) and the manifest, written last, publishes them.
        # A failed run leaves the last published output as it was.
        prefix = f"{batch['key']}.v{model['version']}"
        staging = storage.join(output, prefix)
    out = {
        **ctx,
        "output": output,
        "staging": staging,
        "part_prefix": prefix,
        "chunk_rows": chunk_rows,
        "shard_rows": shard_rows,
    }
    if committed(out) is None:
        check_output(output, batch["files"], prefix)
    return out


# A chunk is held in memory whole: its size is what bounds a worker's memory, so a trigger
# may not raise it without limit (16 times the default).
MAX_CHUNK_ROWS = 16 * CHUNK_ROWS


def check_sizes(chunk_rows: Any, shard_rows: Any) -> tuple[int, int]:
    """Chunk and shard sizes (defaults when not given); ConfigError unless positive integers
    (a chunk of at most ``MAX_CHUNK_ROWS`` rows)."""
    sizes = []
    for flag, value, default in (
        ("--chunk-rows", chunk_rows, CHUNK_ROWS),
        ("--shard-rows", shard_rows, SHARD_ROWS),
    ):
        if value is None:
            sizes.append(default)
            continue
        n = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            n = int(value)  # a DAG param typed in the form
        if n is None or n < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
        if flag == "--chunk-rows" and n > MAX_CHUNK_ROWS:
            raise ConfigError(f"{flag} must be at most {MAX_CHUNK_ROWS:,} (memory), got {value}")
        sizes.append(n)
    return sizes[0], sizes[1]


# A part or quarantine part, as encode names them (on an object store under a prefix).
_PART = r"(?:_quarantine/)?part-\d{5}\.parquet"
_PREFIXED_PART = re.compile(r"[^/]+/" + _PART)


def check_output(output: str, batch_files: Sequence[str], prefix: str = "") -> None:
    """Refuse an output whose replacement would remove what encode did not write.

    Encode publishes by replacing its output folder, so the folder must be new, empty, or one
    encode wrote (its ``_manifest.json``, parts and quarantine parts, nothing else); and it may
    not be the current folder or hold the input batch.
    """
    hint = "choose a new or empty folder, or one encode wrote"
    if storage.is_local(output):
        final = storage.local_path(output)
        try:
            cwd = Path.cwd().resolve()
        except FileNotFoundError:  # the current folder was deleted: nothing to protect
            cwd = None
        if cwd is not None and (final == cwd or final in cwd.parents):
            raise DataError(f"output {output} is the current folder or holds it; {hint}")
        inside = [f for f in batch_files if storage.is_local(f)
                  and final in storage.local_path(f).parents]  # fmt: skip
        if final.exists() and not final.is_dir():
            raise DataError(f"output {output} is a file, not a folder; {hint}")
        names = sorted(_local_entries(final)) if final.is_dir() else []
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(output)
        root = path.rstrip("/") + "/"
        inside = [f for f in batch_files if fsspec.core.url_to_fs(f)[1].startswith(root)]
        if fs.isfile(path):
            raise DataError(f"output {output} is a file, not a folder; {hint}")
        names = sorted(p[len(root) :] for p in fs.find(path) if p.startswith(root))
    if inside:
        raise DataError(f"output {output} holds the input batch ({inside[0]}); {hint}")
    foreign = _not_ours(output, names, prefix)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise DataError(
            f"output {output} holds {len(foreign)} file(s) encode did not write ({shown}); "
            f"encode replaces its output folder: {hint}"
        )


def _local_entries(folder: Path) -> list[str]:
    """Every file, link and folder under ``folder``, relative to it (folders end with /)."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        out.append(rel + "/" if p.is_dir() and not p.is_symlink() else rel)
    return out


def _not_ours(output: str, names: Sequence[str], prefix: str) -> list[str]:
    """The entries of an output folder that encode did not write.

    Ours: the manifest and what it names; on an object store (``prefix``), also the parts of
    earlier attempts: under this run's prefix, or under any prefix beside our manifest.
    """
    manifest = _our_manifest(output) if MANIFEST in names else None
    ours = (
        {MANIFEST, QUARANTINE + "/", *manifest["parts"], *manifest["quarantine"]}
        if manifest
        else set()
    )

    def written_by_us(name: str) -> bool:
        if name in ours:
            return True
        if (
            prefix
            and name.startswith(prefix + "/")
            and re.fullmatch(_PART, name[len(prefix) + 1 :])
        ):
            return True
        return bool(prefix and manifest and _PREFIXED_PART.fullmatch(name))

    return [n for n in names if not written_by_us(n)]


def _our_manifest(output: str) -> dict[str, Any] | None:
    """The output's ``_manifest.json`` when encode wrote it (JSON with our keys), else None."""
    try:
        manifest = storage.read_json(storage.join(output, MANIFEST))
    except (OSError, ValueError):
        return None
    keys = {"batch_key", "model_version", "parts", "quarantine"}
    if not (isinstance(manifest, dict) and keys <= manifest.keys()):
        return None
    named = [*manifest["parts"], *manifest["quarantine"]]
    return (
        manifest
        if all(isinstance(n, str) and re.fullmatch(r"(?:[^/]+/)?" + _PART, n) for n in named)
        else None
    )


def committed(ctx: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier, complete encoding of this batch by this model version."""
    if not storage.exists(storage.join(ctx["output"], MANIFEST)):
        return None
    manifest = _our_manifest(ctx["output"])
    same = manifest is not None and (
        manifest.get("batch_key") == ctx["batch"]["key"]
        and manifest.get("model_version") == ctx["model"]["version"]
    )
    return manifest if same else None


def plan_step(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards to encode; none when this batch is already encoded by this version."""
    if committed(ctx) is not None:
        log.info("%s is already encoded by this model version; nothing to do", ctx["output"])
        return []
    if storage.is_local(ctx["staging"]):
        storage.remove(ctx["staging"])  # a new attempt: what an earlier one staged is stale
    shards = plan(ctx["batch"]["files"], ctx["shard_rows"], ctx["batch"].get("stamps"))
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
        device=trainer.resolve_device(ENCODE_DEVICE),
        on_rows=on_rows,
        id_type=ctx["batch"].get("id_type"),
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
    model, prefix = ctx["model"], ctx.get("part_prefix", "")
    manifest = {
        "output": ctx["output"],
        "batch_key": ctx["batch"]["key"],
        "batch_files": ctx["batch"]["files"],
        "model_name": model["name"],
        "model_version": model["version"],
        "model_uri": f"models:/{model['name']}/{model['version']}",
        **totals,
        "parts": [storage.join(prefix, _part_name(r["index"])) for r in results],
        "quarantine": [
            storage.join(prefix, QUARANTINE, _part_name(r["index"]))
            for r in results
            if r["quarantine"]
        ],
        "quarantine_reasons": dict(reasons.most_common(10)),
        "dag_run_id": ctx["run_id"],
        "chunk_rows": ctx["chunk_rows"],
    }
    if storage.is_local(ctx["output"]):
        staging, final = storage.local_path(ctx["staging"]), storage.local_path(ctx["output"])
        staging.mkdir(parents=True, exist_ok=True)
        _keep_only(staging, {*manifest["parts"], *manifest["quarantine"]})
        storage.write_json(str(staging / MANIFEST), manifest)
        if final.exists():  # an older encoding of another batch/version under this name
            check_output(ctx["output"], ctx["batch"]["files"])  # nothing new of the user's
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)
    else:
        previous = _our_manifest(ctx["output"])
        storage.write_json(storage.join(ctx["output"], MANIFEST), manifest)  # publishes
        if previous is not None:
            _remove_parts(ctx["output"], previous, manifest)
    log.info(
        "encoded %s: %d in = %d encoded + %d quarantined",
        ctx["output"],
        totals["rows_in"],
        totals["rows_encoded"],
        totals["rows_quarantined"],
    )
    return manifest


def _keep_only(staging: Path, names: set[str]) -> None:
    """Remove from a local staging folder what the manifest does not name (parts of an
    attempt with other shard sizes): the folder is published whole."""
    for p in sorted(staging.rglob("*"), reverse=True):
        rel = p.relative_to(staging).as_posix()
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
        elif rel not in names:
            p.unlink()


def _remove_parts(output: str, previous: dict[str, Any], current: dict[str, Any]) -> None:
    """Delete the parts the previous manifest named that the current one does not."""
    import fsspec

    keep = set(current["parts"]) | set(current["quarantine"])
    stale = (set(previous["parts"]) | set(previous.get("quarantine") or [])) - keep
    fs, _ = fsspec.core.url_to_fs(output)
    for name in sorted(stale):
        with contextlib.suppress(FileNotFoundError):
            fs.rm(fsspec.core.url_to_fs(storage.join(output, name))[1])


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
