"""A CSV source streamed (``csv_stream.CsvStream``) against the in-memory path (``read_csv``):
the same rows and types whatever the chunk size, the same snapshot, the same errors."""

from __future__ import annotations

import gzip
import logging
import time

import numpy as np
import pandas as pd
import pytest

from sae_pipeline.config import DataConfig
from sae_pipeline.data import csv_stream, ingest, snapshot
from sae_pipeline.data.csv_stream import CsvStream
from sae_pipeline.data.sources import read_csv, read_source
from sae_pipeline.errors import DataError


def _frame(n=300, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 3)).round(6), columns=list("abd"))
    frame["c"] = rng.integers(0, 100, n)  # an integer feature
    frame.loc[5, "a"] = np.nan
    frame.loc[77, "b"] = np.inf
    frame["id"] = [f"{i:04d}" for i in range(n)]
    frame.loc[[120, 250], "id"] = ["0003", "0119"]  # repeats of earlier ids, in other chunks
    frame["target"] = rng.integers(0, 3, n)
    return frame


def _write(frame, path):
    text = frame.to_csv(index=False).encode()
    path.write_bytes(gzip.compress(text) if path.name.endswith(".gz") else text)
    return str(path)


def _ingest_both(tmp_path, monkeypatch, src, chunk_rows=16, **cfg):
    """The source ingested in memory and streamed in chunks of ``chunk_rows`` rows."""
    monkeypatch.setattr(ingest, "CHUNK_ROWS", chunk_rows)
    mem = ingest.ingest(DataConfig(source=src, **cfg), str(tmp_path / "mem"))
    streamed = ingest.ingest(
        DataConfig(source=src, in_memory_max_bytes=0, **cfg), str(tmp_path / "stream")
    )
    assert "streamed" not in mem and streamed["streamed"] is True
    return mem, streamed


def _assert_same_snapshot(tmp_path, mem, streamed):
    for key in ("rows_in", "rows_accepted", "rows_quarantined", "content_hash", "contract",
                "columns", "snapshot", "snapshot_files", "quarantine", "warnings",
                "dropped_columns", "source", "source_format"):  # fmt: skip
        assert streamed[key] == mem[key], key
    # The same problems; streamed, in the order their chunks met them.
    assert sorted(map(str, streamed["problems"])) == sorted(map(str, mem["problems"]))
    a = snapshot.read_snapshot(str(tmp_path / "mem"), verify=True)
    b = snapshot.read_snapshot(str(tmp_path / "stream"), verify=True)
    pd.testing.assert_frame_equal(b, a)
    qa = snapshot.read_quarantine(str(tmp_path / "mem"))
    qb = snapshot.read_quarantine(str(tmp_path / "stream"))
    if qa is None:
        assert qb is None
    else:
        pd.testing.assert_frame_equal(qb, qa)


@pytest.mark.parametrize("suffix", ["csv", "csv.gz"])
def test_a_streamed_csv_gives_the_in_memory_snapshot(tmp_path, monkeypatch, suffix, caplog):
    caplog.set_level(logging.INFO, logger="sae_pipeline.data.ingest")
    src = _write(_frame(), tmp_path / f"src.{suffix}")
    mem, streamed = _ingest_both(tmp_path, monkeypatch, src, id_column="id")
    _assert_same_snapshot(tmp_path, mem, streamed)
    assert mem["rows_quarantined"] == 4 and mem["contract"]["dtypes"]["c"] == "int64"
    assert "read in memory" in caplog.text and "streamed in chunks of 16 rows" in caplog.text
    assert (
        "(compressed)" in caplog.text if suffix == "csv.gz" else "(compressed)" not in caplog.text
    )


# A column that changes type only in its last row, where pandas reading the whole file
# promotes it: the integer feature "c" meets a blank, a float or text; the label meets a blank.
LATE = {"blank": ("c", ""), "float": ("c", "2.5"), "text": ("c", "n/a?"), "label": ("target", "")}


@pytest.mark.parametrize("case", list(LATE))
def test_a_type_change_in_the_last_chunk_gives_the_in_memory_result(tmp_path, monkeypatch, case):
    column, value = LATE[case]
    frame = _frame().astype({column: object})
    frame.loc[len(frame) - 1, column] = value
    src = _write(frame, tmp_path / "src.csv")
    mem, streamed = _ingest_both(tmp_path, monkeypatch, src, chunk_rows=16, id_column="id")
    _assert_same_snapshot(tmp_path, mem, streamed)
    # The 4 bad rows of _frame, and the changed one unless it holds a number.
    assert mem["rows_quarantined"] == (4 if case == "float" else 5)
    # Without the whole-file scan the first chunks would be int64 and the last float64/text.
    stream = CsvStream(src, 16, "id")
    dtypes = {str(f[column].dtype) for _, f in stream.chunks()}
    assert dtypes == {str(read_csv(src, "id")[column].dtype)} != {"int64"}


def test_chunks_hold_what_read_csv_reads_whatever_the_chunk_size(tmp_path, monkeypatch):
    """Each mix of values pandas promotes when it reads the whole file, split across chunks."""
    monkeypatch.setattr(csv_stream, "_BLOCK", 3)  # "é" (2 bytes) across the UTF-8 check's blocks
    columns = {
        "int_then_blank": ["1"] * 9 + [""],
        "int_then_float": ["1"] * 9 + ["2.5"],
        "int_then_text": ["1"] * 9 + ["x"],
        "float_then_text": ["0.5"] * 9 + ["x"],
        "blank_then_int": [""] * 9 + ["3"],
        "all_blank": [""] * 10,
        "bool_then_blank": ["True"] * 9 + [""],
        "blank_then_bool": [""] * 9 + ["false"],
        "bool_then_int": ["True"] * 9 + ["1"],
        "negative_then_huge": ["-1"] * 9 + ["18446744073709551615"],
        "positive_then_huge": ["1"] * 9 + ["18446744073709551615"],
        "text": ["é"] * 5 + ["NA"] + ["b"] * 4,
        "id": ["007"] * 9 + [""],
    }
    src = _write(pd.DataFrame(columns), tmp_path / "mixed.csv")
    expected = read_csv(src, "id")
    for chunk_rows in (1, 3, 9, 10, 64):
        stream = CsvStream(src, chunk_rows, "id")
        got = pd.concat([f for _, f in stream.chunks()], ignore_index=True)
        pd.testing.assert_frame_equal(got, expected)
        assert stream.rows == 10 and stream.columns == list(columns)


def _bad_csvs():
    good = _frame().to_csv(index=False).encode()
    return {
        "empty": b"",
        "only white space": b" \n\n  \n",
        "not UTF-8 late": good + "café,1,2,3,4,5\n".encode("latin-1"),
        "cut UTF-8 at the end": good + "é".encode()[:1],
        "duplicate header": b"a,b,a,target\n1,2,3,0\n",
        "ragged row late": good + b"1,2,3,4,5,6,7,8,9\n",
        "open quote": good + b'"1,2,3\n',
    }


@pytest.mark.parametrize("case", list(_bad_csvs()))
def test_a_bad_csv_fails_streamed_as_in_memory(tmp_path, monkeypatch, case):
    """The one-line error of read_csv, and nothing written: the file is scanned (UTF-8, header,
    every row) before the first shard is staged."""
    monkeypatch.setattr(csv_stream, "_BLOCK", 7)  # multi-byte characters across read blocks
    path = tmp_path / "bad.csv"
    path.write_bytes(_bad_csvs()[case])
    cfg = DataConfig(source=str(path))
    with pytest.raises(DataError) as in_memory:
        read_source(cfg)
    out = tmp_path / "out"
    with pytest.raises(DataError) as streamed:
        ingest.write_snapshot_stream(CsvStream(str(path), 8), cfg, str(out))
    assert str(streamed.value) == str(in_memory.value)
    assert len(str(streamed.value).splitlines()) == 1
    assert not out.exists() or list(out.iterdir()) == []


def test_the_ingest_command_streams_a_csv_or_fails_in_one_line(tmp_path):
    from tests.ingest_helpers import assert_accounted, assert_one_line_error, run_ingest

    src = _write(_frame(), tmp_path / "ok.csv")
    a = assert_accounted(run_ingest(src, tmp_path / "a", "--id-column", "id"))
    b = run_ingest(src, tmp_path / "b", "--id-column", "id", "--set", "data.in_memory_max_bytes=0")
    assert assert_accounted(b)["streamed"] and b.manifest["content_hash"] == a["content_hash"]
    (tmp_path / "bad.csv").write_bytes(_bad_csvs()["not UTF-8 late"])
    in_memory = assert_one_line_error(run_ingest(tmp_path / "bad.csv", tmp_path / "c"))
    streamed = run_ingest(
        tmp_path / "bad.csv", tmp_path / "d", "--set", "data.in_memory_max_bytes=0"
    )
    assert assert_one_line_error(streamed, "is not UTF-8", "line 302") == in_memory
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_the_size_is_estimated_from_a_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(csv_stream, "CSV_SAMPLE_BYTES", 4096)  # the file is larger than the sample
    src = _write(_frame(n=2000), tmp_path / "src.csv")
    stream = CsvStream(src)
    assert stream.estimated_columns == 6
    assert stream.estimated_rows == pytest.approx(2000, rel=0.1)
    estimate = stream.nbytes
    assert stream.rows == 2000 and stream.nbytes == 2000 * 6 * 8  # exact once scanned
    assert estimate == pytest.approx(stream.nbytes, rel=0.1)


def test_a_csv_rewritten_with_as_many_rows_while_streamed_fails_naming_it(tmp_path):
    """Rewritten after its scan with other values, as many rows and bytes: the rows read are
    not those scanned (counted reads alone miss it; the file's time does not)."""
    src = tmp_path / "a.csv"
    src.write_text("x,y\n" + "".join(f"{i:02d},{i % 10}\n" for i in range(40)))
    stream = CsvStream(str(src), chunk_rows=16)
    assert stream.rows == 40  # scanned: counts and types
    time.sleep(0.01)
    src.write_text("x,y\n" + "".join(f"{i:02d},{(i + 3) % 10}\n" for i in range(40)))
    with pytest.raises(DataError, match=r"a\.csv changed while it was read"):
        for _ in stream.chunks():
            pass
