"""How a training run holds its rows: in memory (small data) or streamed from the snapshot.

``split`` decides once per run, by size (rows x features x 4 bytes against
``training.in_memory_max_bytes``), and records the decision in ``split/plan.json``; every later
step reads it from there, so all of them agree. Streamed, the split is ``parts.HashSplit`` (a
hash of the row position); ``fit_scaler`` fits the scaler chunk by chunk on the float64 rows
and stores the training part once, scaled (float64, then float32), as row-major float32 files;
training reads shuffled batches from those files (or from the snapshot's shards, scaled chunk
by chunk the same way, with ``training.row_cache: false``; ``engine.streaming``); and
the steps that measure (evaluation, probes, the gate, registration's example) use fixed-size
seeded samples of the parts they need (``evaluation.sample_rows`` rows of train and of test;
``training.val_sample_rows`` of validation for early stopping).
"""

from __future__ import annotations

import logging
from typing import Any

from sae_pipeline import storage
from sae_pipeline.config import PipelineConfig
from sae_pipeline.steps._run import _uri

log = logging.getLogger(__name__)

MEMORY, STREAM = "memory", "stream"


def decide(cfg: PipelineConfig, rows: int, features: int) -> str:
    """``memory`` when the float32 features fit ``training.in_memory_max_bytes``."""
    return MEMORY if rows * features * 4 <= cfg.training.in_memory_max_bytes else STREAM


def plan(ctx: dict[str, Any]) -> dict[str, Any]:
    """The run's ``split/plan.json`` (mode, split, part sizes); memory mode for older runs."""
    uri = _uri(ctx, "split", "plan.json")
    return storage.read_json(uri) if storage.exists(uri) else {"mode": MEMORY}


def streamed(ctx: dict[str, Any]) -> bool:
    return plan(ctx)["mode"] == STREAM


def _snapshot(ctx: dict[str, Any]):
    """(row-group plan, contract, HashSplit) of the run's snapshot."""
    from sae_pipeline.data import parts
    from sae_pipeline.data.snapshot import read_manifest

    snap = _uri(ctx, "validate")
    manifest = read_manifest(snap)
    split = parts.HashSplit(**{k: v for k, v in plan(ctx)["split"].items() if k != "method"})
    return parts.units(parts.snapshot_files(snap, manifest)), manifest["contract"], split


def part_chunks(ctx: dict[str, Any], part: str):
    """Unscaled float64 chunks of one part, in snapshot order."""
    from sae_pipeline.data import parts

    units, contract, split = _snapshot(ctx)
    return (x for x, _ in parts.iter_part(units, contract["feature_columns"], split, part))


def sample(ctx: dict[str, Any], part: str, n: int, seed: int, labels: bool = True):
    """(float64 features, labels or None) of a fixed-size seeded sample of one part."""
    from sae_pipeline.data import parts

    units, contract, split = _snapshot(ctx)
    label = contract["label_column"] if labels else None
    extra = [label] if label else []
    x, cols = parts.sample_part(units, contract["feature_columns"], split, part, n, seed, extra)
    return x, (cols[label] if label else None)


def dataset(ctx: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """What ``_dataset`` gives in memory, from samples: raw features and labels of each part
    (``evaluation.sample_rows`` rows each) and the snapshot's first rows as ``frame``."""
    import numpy as np
    import pandas as pd

    from sae_pipeline.data import batches
    from sae_pipeline.data.snapshot import read_manifest

    units, contract, _ = _snapshot(ctx)
    columns = read_manifest(_uri(ctx, "validate"))["columns"]
    n, seed = cfg.evaluation.sample_rows, cfg.split.seed
    data: dict[str, Any] = {"contract": contract}
    for part in ("train", "val", "test"):
        x, y = sample(ctx, part, n, seed)
        data[f"x_{part}"], data[f"y_{part}"] = x.astype(np.float64), y
    head = next(batches.iter_chunks([units[0].file], columns, 100, None), None)
    data["frame"] = head.to_pandas() if head is not None else pd.DataFrame()
    return data


def train_cache(ctx: dict[str, Any], cfg: PipelineConfig, scaler=None):
    """The training part's row cache (``data.row_cache``), scaled by ``scaler``: written on
    first use when ``training.row_cache`` is on and a scaler is given; None when off or (no
    scaler) absent."""
    from sae_pipeline.data import row_cache

    if not cfg.training.row_cache:
        return None
    uri = _uri(ctx, "scaler", "train_rows")
    cache = row_cache.RowCache.open(uri)
    if cache is None and scaler is not None:
        features = len(_snapshot(ctx)[1]["feature_columns"])
        cache = row_cache.write(uri, part_chunks(ctx, "train"), features, scaler=scaler)
    return cache


def train_stream(ctx: dict[str, Any], cfg: PipelineConfig, batch_size: int, seed: int, device):
    """(``ShardStream`` of the training part, scaled validation sample as a tensor)."""
    from sae_pipeline.data.scaling import affine, apply_scaler, from_state
    from sae_pipeline.engine import trainer
    from sae_pipeline.engine.streaming import ShardStream

    units, contract, split = _snapshot(ctx)
    columns = contract["feature_columns"]
    scaler = from_state(storage.read_json(_uri(ctx, "scaler", "scaler.json")))
    mult, add = affine(scaler, len(columns))
    stream = ShardStream(
        units,
        columns,
        split,
        "train",
        plan(ctx)["rows"]["train"],
        mult,
        add,
        batch_size,
        seed,
        device,
        buffer_rows=cfg.training.shuffle_buffer_rows,
        cache=train_cache(ctx, cfg),
        scaler=scaler,
    )
    x_val, _ = sample(ctx, "val", cfg.training.val_sample_rows, cfg.split.seed, labels=False)
    return stream, trainer.as_tensor(apply_scaler(scaler, x_val), device)
