"""The differential harness: generated sources read in memory and streamed give the same
counts, quarantine, contract, snapshot (hash and frame), split membership and scaled training
rows (within float32 rounding). The defects of issue 28 are fixed examples here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings

from sae_pipeline.data import parts, snapshot
from tests.data.differential import Source, ingest_both, ingest_via_raw, sources
from tests.data.training_rows import scaled_rows_both

SAME = ("rows_in", "rows_accepted", "rows_quarantined", "content_hash", "contract", "columns",
        "problems", "warnings", "dropped_columns", "snapshot", "quarantine")  # fmt: skip


def assert_same_outcome(memory, stream) -> None:
    """Both paths fail with the same message, or give the same manifest."""
    if isinstance(memory, str) or isinstance(stream, str):
        assert memory == stream
        return
    for key in SAME:
        assert stream[key] == memory[key], key


def assert_same_snapshot(folder: Path, a: str, b: str) -> pd.DataFrame:
    x = snapshot.read_snapshot(str(folder / a), verify=True)
    y = snapshot.read_snapshot(str(folder / b), verify=True)
    pd.testing.assert_frame_equal(x, y)
    qa, qb = snapshot.read_quarantine(str(folder / a)), snapshot.read_quarantine(str(folder / b))
    assert (qa is None) == (qb is None)
    if qa is not None:
        pd.testing.assert_frame_equal(qa, qb, check_dtype=False)
    return x


def assert_same_split(folder: Path, frame: pd.DataFrame, features: list[str], chunk: int) -> None:
    """The hash split's parts hold the same rows read from either snapshot."""
    manifest = snapshot.read_manifest(str(folder / "stream"))
    plan = parts.units(parts.snapshot_files(str(folder / "stream"), manifest))
    split = parts.HashSplit(7, 0.2, 0.2)
    x = frame[features].to_numpy(dtype=np.float64)
    for part in parts.PARTS:
        mask = split.mask(part, 0, len(frame))
        got = [c for c, _ in parts.iter_part(plan, features, split, part, chunk)]
        got = np.concatenate(got) if got else np.zeros((0, len(features)))
        np.testing.assert_array_equal(got, x[mask])


def check(src: Source) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = ingest_both(src, folder)
        assert_same_outcome(out["memory"], out["stream"])
        raw = ingest_via_raw(src, out["source"], folder)
        assert_same_outcome(out["memory"], raw["memory"])
        assert_same_outcome(out["memory"], raw["stream"])
        if isinstance(out["memory"], str):
            return
        assert raw["copied_rows"] == out["memory"]["rows_in"]
        frame = assert_same_snapshot(folder, "memory", "stream")
        assert_same_snapshot(folder, "memory", "raw_streamed")
        features = out["memory"]["contract"]["feature_columns"]
        assert_same_split(folder, frame, features, src.chunk_rows)
        scaled_rows_both(folder / "stream", frame, features, src.chunk_rows, src.scaler)


@settings(
    max_examples=int(os.environ.get("DIFF_EXAMPLES", 400)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False,
)
@given(sources())
def test_memory_and_stream_agree(src):
    check(src)
