"""Scaled training rows in memory and streamed, for the differential harness: the in-memory
scaler fitted on the training rows and applied (``scaling.fit_scaler``, ``apply_scaler``)
against the streamed one (``fit_scaler_stream`` over the part's chunks, the row cache written
scaled, and ``ShardStream`` with and without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sae_pipeline.data import parts, row_cache, snapshot
from sae_pipeline.data.scaling import apply_scaler, fit_scaler, fit_scaler_stream
from sae_pipeline.engine.streaming import ShardStream

SPLIT = parts.HashSplit(7, 0.2, 0.2)


def _sorted(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])] if len(x) else x


def assert_close_f32(got: np.ndarray, want: np.ndarray, slack: np.ndarray) -> None:
    """Equal within float32 rounding of the scaled value (a few units in the last place),
    plus ``slack``: per column, the float64 rounding of the raw values' magnitude, scaled
    (a column at 3e12 with a spread of 1e3 is only known to 5e-4, 7e-7 once scaled)."""
    assert got.shape == want.shape
    tol = 4 * np.finfo(np.float32).eps * np.maximum(1.0, np.abs(want.astype(np.float64)))
    bad = np.abs(got.astype(np.float64) - want.astype(np.float64)) > tol + slack
    assert not bad.any(), (got[bad][:5], want[bad][:5])


def memory_rows(frame: pd.DataFrame, features: list[str], kind: str):
    """(scaled training rows, per-column slack) of the in-memory path."""
    x = frame[features].to_numpy(dtype=np.float64)[SPLIT.mask("train", 0, len(frame))]
    if not len(x):
        return x, None
    scaler = fit_scaler(kind, x)
    mult = np.abs(
        scaler.transform(np.ones((1, x.shape[1]))) - scaler.transform(np.zeros((1, x.shape[1])))
    )[0]
    slack = 16 * np.finfo(np.float64).eps * np.abs(x).max(axis=0) * mult
    return apply_scaler(scaler, x), slack


def streamed_scaler(plan, features: list[str], kind: str, chunk: int):
    chunks = (x for x, _ in parts.iter_part(plan, features, SPLIT, "train", chunk))
    return fit_scaler_stream(
        kind, chunks, lambda: parts.sample_part(plan, features, SPLIT, "train", 10**6, 7)[0]
    )


def stream_rows(plan, features, rows: int, chunk: int, cache=None, scaler=None) -> np.ndarray:
    width = len(features)
    stream = ShardStream(
        plan, features, SPLIT, "train", rows, np.ones(width, np.float32),
        np.zeros(width, np.float32), 1, 0, torch.device("cpu"), buffer_rows=4,
        chunk_rows=chunk, slice_rows=2, readahead=1, cache=cache, scaler=scaler,
    )  # fmt: skip
    got = [b.numpy() for b in stream.epoch(0)]
    return np.concatenate(got) if got else np.zeros((0, width), np.float32)


def scaled_rows_both(
    snapshot_dir: Path, frame: pd.DataFrame, features: list[str], chunk: int, kind: str
) -> None:
    """The training part's scaled rows agree, in memory and by each streamed route."""
    want, slack = memory_rows(frame, features, kind)
    if not len(want):
        return
    manifest = snapshot.read_manifest(str(snapshot_dir))
    plan = parts.units(parts.snapshot_files(str(snapshot_dir), manifest))
    scaler = streamed_scaler(plan, features, kind, chunk)
    chunks = (x for x, _ in parts.iter_part(plan, features, SPLIT, "train", chunk))
    cache_dir = str(snapshot_dir.parent / f"cache-{snapshot_dir.name}")
    cache = row_cache.write(cache_dir, chunks, len(features), 3, scaler=scaler)
    assert cache.rows == len(want)
    want = _sorted(want)
    assert_close_f32(_sorted(np.concatenate(list(cache.iter_chunks()))), want, slack)
    assert_close_f32(
        _sorted(stream_rows(plan, features, len(want), chunk, cache=cache)), want, slack
    )
    assert_close_f32(
        _sorted(stream_rows(plan, features, len(want), chunk, scaler=scaler)), want, slack
    )
