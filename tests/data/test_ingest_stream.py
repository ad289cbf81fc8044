"""Streamed ingest (chunk by chunk) against the in-memory path: same snapshot, same errors."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pandas as pd
import pytest

from sae_pipeline import storage
from sae_pipeline.config import DataConfig
from sae_pipeline.data import ingest, snapshot
from sae_pipeline.data.sources import ParquetStream
from sae_pipeline.errors import DataError


def _frame(n=300, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 4)), columns=list("abcd"))
    frame.loc[5, "a"] = np.nan
    frame.loc[77, "b"] = np.inf
    frame["id"] = np.arange(n, dtype=np.int64)
    frame.loc[[120, 250], "id"] = [3, 119]  # repeats of earlier ids, in other chunks
    frame["target"] = rng.integers(0, 3, n)
    return frame


def _both(tmp_path, frame, cfg, chunk_rows=16, contract=None):
    src = tmp_path / "src.parquet"
    frame.to_parquet(src, index=False, row_group_size=50)
    mem = snapshot.write_snapshot(pd.read_parquet(src), cfg, str(tmp_path / "mem"), contract)
    stream = ParquetStream(str(src), chunk_rows)
    streamed = ingest.write_snapshot_stream(stream, cfg, str(tmp_path / "stream"), contract)
    return mem, streamed


def test_a_streamed_snapshot_equals_the_in_memory_one(tmp_path):
    cfg = DataConfig(source="x.parquet", id_column="id", snapshot_shard_rows=100)
    mem, streamed = _both(tmp_path, _frame(), cfg)
    for key in ("rows_in", "rows_accepted", "rows_quarantined", "content_hash", "contract",
                "snapshot", "snapshot_files", "quarantine", "warnings", "columns"):  # fmt: skip
        assert streamed[key] == mem[key], key
    assert mem["rows_quarantined"] == 4
    assert [p["rows"] for p in streamed["problems"]] == [p["rows"] for p in mem["problems"]]
    assert [p["message"] for p in streamed["problems"]] == [p["message"] for p in mem["problems"]]
    a = snapshot.read_snapshot(str(tmp_path / "mem"), verify=True)
    b = snapshot.read_snapshot(str(tmp_path / "stream"), verify=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    qa = snapshot.read_quarantine(str(tmp_path / "mem"))
    qb = snapshot.read_quarantine(str(tmp_path / "stream"))
    assert qb["_row"].tolist() == qa["_row"].tolist() == [5, 77, 120, 250]
    assert qb["_quarantine_reason"].tolist() == qa["_quarantine_reason"].tolist()
    assert "(first at row 3)" in qb["_quarantine_reason"][2]
    # Row groups of 65,536 rows at most; shards of snapshot_shard_rows.
    assert len(streamed["snapshot_files"]) == 3


def test_a_rejected_streamed_batch_leaves_nothing_behind(tmp_path):
    frame = _frame()
    frame.loc[200:, "c"] = np.nan  # a third of the rows: over the 10% ceiling
    cfg = DataConfig(source="x.parquet", id_column="id")
    with pytest.raises(DataError) as mem_err:
        snapshot.write_snapshot(frame, cfg, str(tmp_path / "mem"))
    src = tmp_path / "src.parquet"
    frame.to_parquet(src, index=False)
    out = tmp_path / "stream"
    with pytest.raises(DataError) as err:
        ingest.write_snapshot_stream(ParquetStream(str(src), 32), cfg, str(out))
    assert str(err.value) == str(mem_err.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_reject_policy_and_empty_column_fail_with_a_clear_line(tmp_path):
    frame = _frame()
    cfg = DataConfig(source="x.parquet", id_column="id")
    cfg.validation.infinite_values = "reject"
    src = tmp_path / "src.parquet"
    frame.to_parquet(src, index=False)
    with pytest.raises(
        DataError, match=r"column 'b' has 1 infinite value\(s\), e.g. inf at row 77"
    ):
        ingest.write_snapshot_stream(ParquetStream(str(src), 32), cfg, str(tmp_path / "o1"))
    frame["d"] = np.nan
    frame.to_parquet(src, index=False)
    with pytest.raises(DataError, match=r"column 'd' has no values: all 300 row\(s\) are empty"):
        ingest.write_snapshot_stream(
            ParquetStream(str(src), 32), DataConfig(source="x"), str(tmp_path / "o2")
        )


def test_ingest_decides_by_size_and_says_so(tmp_path, caplog):
    src = tmp_path / "src.parquet"
    _frame().to_parquet(src, index=False)
    caplog.set_level(logging.INFO, logger="sae_pipeline.data.ingest")
    small = ingest.ingest(DataConfig(source=str(src), id_column="id"), str(tmp_path / "a"))
    assert "read in memory" in caplog.text and "streamed" not in small
    big = ingest.ingest(
        DataConfig(source=str(src), id_column="id", in_memory_max_bytes=0), str(tmp_path / "b")
    )
    assert "streamed in chunks" in caplog.text and big["streamed"] is True
    assert big["content_hash"] == small["content_hash"]
    # Same data into the same folder: nothing to do; other data: refused.
    again = ingest.ingest(
        DataConfig(source=str(src), id_column="id", in_memory_max_bytes=0), str(tmp_path / "b")
    )
    assert again["content_hash"] == big["content_hash"]
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith("_staging")]


def test_a_corrupt_shard_is_a_clear_error(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    _frame().to_parquet(folder / "part-0.parquet", index=False)
    (folder / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"part-1.parquet\) is corrupt or truncated"):
        ParquetStream(str(folder))


def test_the_content_hasher_is_chunk_independent():
    from sae_pipeline.data.contract import ContentHasher, content_hash

    frame = _frame()
    h = ContentHasher(frame.columns)
    for start in range(0, len(frame), 41):
        h.update(frame.iloc[start : start + 41])
    assert h.hexdigest() == content_hash(frame)


def test_a_failed_staged_write_is_removed(tmp_path):
    stage = storage.new_stage(str(tmp_path / "out"))
    with storage.staged_writer(stage, "x.bin") as fh:
        fh.write(b"partial")
    storage.remove(stage)
    assert list((tmp_path / "out").iterdir()) == []


def _bad_inputs():
    from tests.ingest_helpers import clean_frame

    empty = clean_frame(n=200)
    empty["pixel_3"] = np.nan
    many = clean_frame(n=200)
    many.loc[:60, "pixel_1"] = np.inf
    dates = clean_frame(n=200)
    dates["pixel_2"] = pd.Timestamp("2026-01-01")
    return {"empty column": empty, "too many quarantined": many, "a date column": dates}


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_the_ingest_command_fails_streamed_as_in_memory(tmp_path, case):
    """Bad input through ``sae-pipeline ingest`` streamed: exit 2, the in-memory path's one
    line, nothing written (no staging folder either)."""
    from tests.ingest_helpers import assert_one_line_error, run_ingest, write_parquet

    src = write_parquet(_bad_inputs()[case], tmp_path / "bad.parquet")
    in_memory = assert_one_line_error(run_ingest(src, tmp_path / "a"))
    streamed = run_ingest(src, tmp_path / "b", "--set", "data.in_memory_max_bytes=0")
    assert assert_one_line_error(streamed) == in_memory
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())


def test_the_ingest_command_streams_a_clean_batch(tmp_path):
    from tests.ingest_helpers import assert_accounted, clean_frame, run_ingest, write_parquet

    src = write_parquet(clean_frame(n=300), tmp_path / "ok.parquet")
    a = assert_accounted(run_ingest(src, tmp_path / "a"))
    b = assert_accounted(run_ingest(src, tmp_path / "b", "--set", "data.in_memory_max_bytes=0"))
    assert b["streamed"] and b["content_hash"] == a["content_hash"]


@pytest.mark.parametrize("rows_after", [450, 300])
def test_a_file_replaced_while_streamed_fails_naming_it_and_writes_nothing(tmp_path, rows_after):
    """Counts came from the footers read at open: a replaced file gave a manifest of 200 rows
    over a snapshot of 350 (issue 28 item 2); one of the same row count is caught too."""
    src = tmp_path / "src"
    src.mkdir()
    _frame(300, 0).to_parquet(src / "a.parquet", index=False)
    _frame(300, 1).to_parquet(src / "b.parquet", index=False)
    cfg = DataConfig(source=str(src), label_column="target")
    for make in (
        lambda s, out: ingest.write_snapshot_stream(s, cfg, out),
        lambda s, out: ingest.copy_raw(s, out, 50),
    ):
        stream = ParquetStream(str(src), 16)
        _frame(rows_after, 2).to_parquet(src / "b.parquet", index=False)
        out = tmp_path / f"out-{uuid.uuid4().hex[:6]}"
        with pytest.raises(DataError, match=r"b\.parquet\).* changed"):
            make(stream, str(out))
        assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
        _frame(300, 1).to_parquet(src / "b.parquet", index=False)
