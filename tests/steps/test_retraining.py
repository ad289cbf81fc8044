"""The retraining data after drift: the champion's snapshot and the batch, streamed to one file.

The champion here is only what ``training_conf`` reads of it: a snapshot folder in its run's
``validate/`` (written by the snapshot writer, in several shards); no model is trained.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sae_pipeline import storage
from sae_pipeline.config import DataConfig
from sae_pipeline.data import snapshot
from sae_pipeline.errors import DataError
from sae_pipeline.registry import champion
from sae_pipeline.registry.champion import ModelRef
from sae_pipeline.steps import _retraining

FEATURES = ["f0", "f1", "f2"]


def rows(n: int, seed: int, first_id: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, len(FEATURES))), columns=FEATURES)
    frame["target"] = rng.integers(0, 3, n)
    frame["id"] = np.arange(first_id, first_id + n, dtype=np.int64)
    return frame


@pytest.fixture
def world(tmp_path):
    """A champion whose snapshot is 5 shards of 100 rows, and a batch with 2 non-finite rows."""
    root = str(tmp_path / "artifacts")
    ref = ModelRef("enc", "1", "mlflow-run", "champ", f"sqlite:///{tmp_path}/m.db", root)
    cfg = DataConfig(source="x.parquet", id_column="id", snapshot_shard_rows=100)
    manifest = snapshot.write_snapshot(rows(500, 0, 0), cfg, champion.snapshot_dir(ref))
    assert len(manifest["snapshot_files"]) == 5
    batch = rows(230, 1, 10_000)
    batch.loc[[3, 117], "f1"] = [np.nan, np.inf]
    path = tmp_path / "batch.parquet"
    batch.to_parquet(path, index=False, row_group_size=50)
    ctx = {
        "model": ref.to_dict(),
        "artifacts_root": root,
        "run_key": "drift__day1",
        "tracking_uri": ref.tracking_uri,
        "scaler_model_name": "scaler",
        "batch": {"files": [str(path)], "key": "batch-abc123"},
    }
    out = storage.join(root, "retraining", "drift__day1", "training_data.parquet")
    return {"ref": ref, "ctx": ctx, "batch": batch, "out": out, "tmp": tmp_path}


def in_memory(world) -> pd.DataFrame:
    """What the training data was before streaming: the snapshot read whole, concatenated."""
    whole = champion.training_snapshot(world["ref"])
    batch = world["batch"]
    ok = np.isfinite(batch[FEATURES].to_numpy()).all(axis=1)
    keep = [*FEATURES, "target", "id"]
    return pd.concat([whole[keep], batch[ok][keep]], ignore_index=True)


def test_the_streamed_file_holds_what_the_in_memory_concat_gave(world):
    expected = in_memory(world)
    conf = _retraining.training_conf(world["ctx"], {"retrain_triggered": True})
    assert conf["data_source"] == world["out"]
    got = pd.read_parquet(world["out"])
    assert len(got) == 500 + 228
    pd.testing.assert_frame_equal(got, expected)  # same rows, order and column types
    old = pq.read_schema(storage.local_path(world["out"]))
    buf = world["tmp"] / "old.parquet"
    storage.write_parquet(str(buf), expected)  # the old writer, for its Parquet types
    assert old.remove_metadata() == pq.read_schema(buf).remove_metadata()
    assert not list(storage.local_path(world["out"]).parent.glob("_staging-*"))


def test_the_snapshot_is_never_read_whole(world, monkeypatch):
    expected = in_memory(world)

    def whole(*_args, **_kwargs):
        raise AssertionError("the whole snapshot was read")

    monkeypatch.setattr(snapshot, "read_snapshot", whole)
    monkeypatch.setattr(champion, "training_snapshot", whole)
    monkeypatch.setattr(_retraining, "CHUNK_ROWS", 64)
    _retraining.training_conf(world["ctx"], {"retrain_triggered": True})
    md = pq.ParquetFile(storage.local_path(world["out"])).metadata
    sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    # Written chunk by chunk: 5 shards of 100 rows (64 + 36 each), then the batch's row
    # groups of 50 rows (two of them less the non-finite rows).
    assert max(sizes) <= 64 and len(sizes) == 10 + 5
    pd.testing.assert_frame_equal(pd.read_parquet(world["out"]), expected)


def test_an_uncastable_batch_column_fails_in_one_line_and_leaves_no_file(world):
    path = world["tmp"] / "text_ids.parquet"
    world["batch"].assign(id=[f"u{i}" for i in range(230)]).to_parquet(path, index=False)
    world["ctx"]["batch"]["files"] = [str(path)]
    with pytest.raises(DataError) as err:
        _retraining.training_conf(world["ctx"], {"retrain_triggered": True})
    message = str(err.value)
    assert "\n" not in message and "'id'" in message and "batch-abc123" in message
    folder = storage.local_path(world["out"]).parent
    assert not storage.exists(world["out"]) and not list(folder.glob("_staging-*"))


def test_a_retry_replaces_what_a_killed_writer_left(world):
    folder = storage.local_path(world["out"]).parent
    dead = folder / "_staging-deadbeef0000"
    dead.mkdir(parents=True)
    (dead / "training_data.parquet").write_bytes(b"PAR1 half a file")
    _retraining.training_conf(world["ctx"], {"retrain_triggered": True})
    assert not dead.exists() and len(pd.read_parquet(world["out"])) == 500 + 228
