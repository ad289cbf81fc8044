"""The streamed split and samples of a snapshot's parts, and the incrementally fitted scaler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sae_pipeline.data import parts
from sae_pipeline.data.scaling import affine, fit_scaler, fit_scaler_stream
from sae_pipeline.errors import DataError

COLUMNS = [f"f{i}" for i in range(5)]


@pytest.fixture
def shards(tmp_path):
    """3 shards of 1,000 rows, 4 row groups each; column ``i`` holds the row position."""
    rng = np.random.default_rng(0)
    files = []
    for s in range(3):
        frame = pd.DataFrame(rng.normal(3.0, 2.0, size=(1000, 5)), columns=COLUMNS)
        frame["i"] = np.arange(s * 1000, (s + 1) * 1000)
        path = tmp_path / f"part-{s}.parquet"
        frame.to_parquet(path, row_group_size=250)
        files.append(str(path))
    return parts.units(files)


def test_hash_split_is_deterministic_disjoint_and_near_the_fractions():
    split = parts.HashSplit(seed=7, val_fraction=0.15, test_fraction=0.25)
    rows = np.arange(200_000, dtype=np.uint64)
    a, b = split.parts_of(rows), split.parts_of(rows)
    np.testing.assert_array_equal(a, b)
    share = np.bincount(a, minlength=3) / len(rows)
    np.testing.assert_allclose(share, [0.60, 0.15, 0.25], atol=0.005)
    masks = [split.mask(p, 0, len(rows)) for p in parts.PARTS]
    assert (sum(m.astype(int) for m in masks) == 1).all()  # disjoint, and they cover every row
    assert split.counts(len(rows), chunk=30_000) == {
        p: int(m.sum()) for p, m in zip(parts.PARTS, masks, strict=True)
    }
    other = parts.HashSplit(seed=8, val_fraction=0.15, test_fraction=0.25).parts_of(rows)
    assert (other != a).mean() > 0.3  # the seed matters


def test_iter_part_streams_exactly_the_parts_rows(shards):
    split = parts.HashSplit(0, 0.2, 0.2)
    seen = {}
    for part in parts.PARTS:
        ids = [c["i"] for _, c in parts.iter_part(shards, COLUMNS, split, part, 100, 3, ["i"])]
        seen[part] = np.concatenate(ids)
        expected = np.flatnonzero(split.mask(part, 0, 3000))
        np.testing.assert_array_equal(np.sort(seen[part]), expected)
    assert sum(len(v) for v in seen.values()) == 3000
    assert not (np.diff(seen["train"]) > 0).all()  # row groups in a shuffled order


def test_sample_part_is_fixed_size_seeded_and_inside_the_part(shards):
    split = parts.HashSplit(0, 0.2, 0.2)
    x, cols = parts.sample_part(shards, COLUMNS, split, "test", 150, seed=1, extra=["i"])
    x2, cols2 = parts.sample_part(shards, COLUMNS, split, "test", 150, seed=1, extra=["i"])
    assert x.shape == (150, 5) and x.dtype == np.float64  # full precision until scaled
    np.testing.assert_array_equal(cols["i"], cols2["i"])
    np.testing.assert_array_equal(x, x2)
    assert split.mask("test", 0, 3000)[cols["i"]].all()
    assert (np.diff(cols["i"]) > 0).all()  # snapshot order
    other, _ = parts.sample_part(shards, COLUMNS, split, "test", 150, seed=2)
    assert not np.array_equal(other, x)
    everything, _ = parts.sample_part(shards, COLUMNS, split, "test", 10**6, seed=1)
    assert len(everything) == split.counts(3000)["test"]


@pytest.mark.parametrize("kind", ["standard", "minmax", "none"])
def test_incremental_scaler_equals_the_in_memory_one(kind, shards):
    split = parts.HashSplit(0, 0.2, 0.2)
    chunks = [x for x, _ in parts.iter_part(shards, COLUMNS, split, "train", 128, 5)]
    full = np.concatenate(chunks)
    streamed = fit_scaler_stream(kind, iter(chunks))
    in_memory = fit_scaler(kind, full)
    np.testing.assert_allclose(streamed.transform(full), in_memory.transform(full), atol=1e-9)
    mult, add = affine(streamed, full.shape[1])
    np.testing.assert_allclose(full * mult + add, in_memory.transform(full), rtol=1e-5, atol=1e-5)


def test_robust_scaler_is_fitted_on_a_sample():
    x = np.random.default_rng(0).normal(size=(20_000, 3))
    scaler = fit_scaler_stream("robust", iter(()), sample=lambda: x[:5000])
    np.testing.assert_allclose(scaler.center_, np.median(x, axis=0), atol=0.05)


def test_sample_positions_pick_the_rows_sample_part_picks_without_reading_them(shards):
    """The drift reference's sample: positions from the row numbers alone, then read."""
    positions = parts.sample_positions(3000, 200, seed=4, chunk=700)
    _, cols = parts.sample_part(shards, COLUMNS, None, "train", 200, seed=4, extra=["i"])
    np.testing.assert_array_equal(positions, cols["i"])
    x = parts.read_positions(shards, [*COLUMNS, "i"], positions)
    assert x.dtype == np.float64 and x.shape == (200, 6)
    np.testing.assert_array_equal(x[:, -1], positions)
    assert len(parts.sample_positions(3000, 10**6, seed=4)) == 3000


def test_a_snapshot_shard_replaced_after_planning_fails_naming_it(shards, tmp_path):
    """Every stream counts a file's rows against what it saw at open (issue 28 item 2)."""
    frame = pd.DataFrame(np.ones((900, 5)), columns=COLUMNS)
    frame["i"] = np.arange(900)
    frame.to_parquet(tmp_path / "part-1.parquet", row_group_size=225)
    with pytest.raises(DataError, match=r"part-1\.parquet changed while it was read"):
        for _ in parts.iter_part(shards, COLUMNS, None, "train", 100):
            pass
