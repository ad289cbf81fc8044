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
        "run_id": "drift__day1",
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


# ---- repeated ids: the batch's row supersedes the champion's (issues 23 item 5, 28 item 5) ----
def test_a_batch_row_supersedes_the_champions_row_with_the_same_id(world):
    """Before: the retraining data held both rows of ids 100-149 (the old first), so the
    training run's validation quarantined the new rows or failed over its limit."""
    again = rows(50, 5, 100)  # ids 100-149 scored again, with new values
    fresh = rows(30, 6, 20_000)
    batch = pd.concat([again, fresh], ignore_index=True)
    path = world["tmp"] / "again.parquet"
    batch.to_parquet(path, index=False, row_group_size=17)
    world["ctx"]["batch"]["files"] = [str(path)]
    _retraining.training_conf(world["ctx"], {"retrain_triggered": True})
    got = pd.read_parquet(world["out"])
    assert len(got) == 500 - 50 + 80 and got["id"].is_unique
    newer = got.set_index("id").loc[100:149, FEATURES].sort_index()
    expected = again.set_index("id")[FEATURES].sort_index()
    pd.testing.assert_frame_equal(newer, expected)  # the batch's values, not the champion's
    champion_part = got.iloc[: 500 - 50]
    assert not champion_part["id"].between(100, 149).any()
    info = storage.read_json(world["out"] + ".json")  # the retraining snapshot's manifest
    assert info["rows"] == {"champion": 450, "superseded": 50, "batch": 80, "batch_non_finite": 0}
    assert "supersedes" in info["rule"] and info["id_column"] == "id"


def test_a_non_finite_batch_row_supersedes_nothing(world):
    batch = rows(3, 7, 10)
    batch.loc[0, "f0"] = np.nan  # id 10: dropped, so the champion's row 10 stays
    path = world["tmp"] / "nan.parquet"
    batch.to_parquet(path, index=False)
    world["ctx"]["batch"]["files"] = [str(path)]
    _retraining.training_conf(world["ctx"], {"retrain_triggered": True})
    got = pd.read_parquet(world["out"])
    assert got["id"].is_unique and len(got) == 500 - 2 + 2
    assert got.loc[got["id"] == 10, "f0"].notna().all()


def _two_files(world, second: pd.DataFrame) -> None:
    first = world["tmp"] / "b1.parquet"
    other = world["tmp"] / "b2.parquet"
    rows(20, 8, 30_000).to_parquet(first, index=False)
    second.to_parquet(other, index=False)
    world["ctx"]["batch"]["files"] = [str(first), str(other)]


@pytest.mark.parametrize("column", ["target", "id"])
def test_a_label_or_id_in_only_some_batch_files_is_named_and_nothing_is_written(world, column):
    """Before: a bare KeyError from the writer, after part of the file was staged."""
    _two_files(world, rows(20, 9, 40_000).drop(columns=[column]))
    with pytest.raises(DataError) as err:
        _retraining.training_conf(world["ctx"], {"retrain_triggered": True})
    message = str(err.value)
    assert "\n" not in message and f"'{column}'" in message and "b2.parquet" in message
    folder = storage.local_path(world["out"]).parent
    assert not folder.exists() or not any(folder.iterdir())


def test_integer_batch_ids_against_the_champions_text_ids_are_refused(tmp_path):
    """Before: batch id 7 became "7" and sat beside the champion's "0007" as another id."""
    root = str(tmp_path / "artifacts")
    ref = ModelRef("enc", "1", "mlflow-run", "champ", f"sqlite:///{tmp_path}/m.db", root)
    cfg = DataConfig(source="x.parquet", id_column="id", snapshot_shard_rows=100)
    champ = rows(200, 0, 0).assign(id=[f"{i:04d}" for i in range(200)])
    snapshot.write_snapshot(champ, cfg, champion.snapshot_dir(ref))
    path = tmp_path / "int_ids.parquet"
    rows(10, 1, 7).to_parquet(path, index=False)  # ids 7..16 as integers
    out = storage.join(root, "retraining", "r", "training_data.parquet")
    with pytest.raises(DataError) as err:
        _retraining.write_training_data(out, ref, {"files": [str(path)], "key": "b-1"})
    message = str(err.value)
    assert "\n" not in message and "int_ids.parquet" in message
    assert "int64 (number)" in message and "(text)" in message
    assert not storage.exists(out) and not storage.exists(out + ".json")
    # Text ids match text ids: "0007" in the batch supersedes the champion's "0007".
    text = tmp_path / "text_ids.parquet"
    rows(10, 1, 7).assign(id=[f"{i:04d}" for i in range(7, 17)]).to_parquet(text, index=False)
    info = _retraining.write_training_data(out, ref, {"files": [str(text)], "key": "b-2"})
    assert info["rows"]["superseded"] == 10
    got = pd.read_parquet(out)
    assert got["id"].is_unique and len(got) == 200


def test_superseding_reads_the_snapshot_chunk_by_chunk(world, monkeypatch):
    """The rule costs passes over the ids, never the whole snapshot in memory."""

    def whole(*_args, **_kwargs):
        raise AssertionError("the whole snapshot was read")

    monkeypatch.setattr(snapshot, "read_snapshot", whole)
    monkeypatch.setattr(champion, "training_snapshot", whole)
    monkeypatch.setattr(_retraining, "CHUNK_ROWS", 64)
    reads = []
    real = _retraining.batches.iter_chunks

    def counted(files, columns, chunk_rows, *args, **kwargs):
        for rb in real(files, columns, chunk_rows, *args, **kwargs):
            reads.append(rb.num_rows)
            yield rb

    monkeypatch.setattr(_retraining.batches, "iter_chunks", counted)
    path = world["tmp"] / "overlap.parquet"
    rows(200, 3, 250).to_parquet(path, index=False, row_group_size=40)  # ids 250-449 again
    world["ctx"]["batch"]["files"] = [str(path)]
    _retraining.training_conf(world["ctx"], {"retrain_triggered": True})
    assert max(reads) <= 64
    got = pd.read_parquet(world["out"])
    assert len(got) == 500 - 200 + 200 and got["id"].is_unique
