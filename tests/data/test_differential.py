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
from hypothesis import HealthCheck, Phase, given, settings

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
        if src.via_raw:
            raw = ingest_via_raw(src, out["source"], folder)
            assert_same_outcome(out["memory"], raw["memory"])
            assert_same_outcome(out["memory"], raw["stream"])
        if isinstance(out["memory"], str):
            return
        frame = assert_same_snapshot(folder, "memory", "stream")
        if src.via_raw and raw["copied_rows"]:
            assert raw["copied_rows"] == out["memory"]["rows_in"]
            assert_same_snapshot(folder, "memory", "raw_streamed")
        features = out["memory"]["contract"]["feature_columns"]
        assert_same_split(folder, frame, features, src.chunk_rows)
        scaled_rows_both(folder / "stream", frame, features, src.chunk_rows, src.scaler)


@settings(
    max_examples=int(os.environ.get("DIFF_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False,
)
@given(sources())
def test_memory_and_stream_agree(src):
    check(src)


# ---- the reproductions of issue 28, as fixed cases ------------------------------------------
def _parquet_source(frames, **kw) -> Source:
    return Source(frames=frames, row_groups=[3] * len(frames), chunk_rows=4, shard_rows=6, **kw)


def _ingested(src: Source, tmp_path: Path) -> dict:
    out = ingest_both(src, tmp_path)
    assert_same_outcome(out["memory"], out["stream"])
    return out


def test_item1_offset_features_keep_their_precision_when_streamed(tmp_path):
    """ts = 1.7e9 + N(0, 1): 1 distinct scaled value when streamed before, std 0.0."""
    rng = np.random.default_rng(0)
    n = 2000
    frame = pd.DataFrame(
        {
            "ts": 1.7e9 + rng.normal(0, 1, n),
            "price": 1e6 + rng.normal(0, 0.05, n),
            "z": rng.normal(size=n),
        }
    )
    src = _parquet_source([frame], scaler="standard")
    src.chunk_rows, src.row_groups = 256, [500]
    out = _ingested(src, tmp_path)
    features = out["memory"]["contract"]["feature_columns"]
    snap = snapshot.read_snapshot(str(tmp_path / "memory"))
    scaled_rows_both(tmp_path / "stream", snap, features, 256, "standard")
    from tests.data.training_rows import SPLIT, streamed_scaler

    plan = parts.units(parts.snapshot_files(str(tmp_path / "stream"), out["stream"]))
    scaler = streamed_scaler(plan, features, "standard", 256)
    x = np.concatenate([c for c, _ in parts.iter_part(plan, features, SPLIT, "train", 256)])
    from sae_pipeline.data.scaling import apply_scaler

    scaled = apply_scaler(scaler, x)
    assert len(np.unique(scaled[:, 0])) > 0.9 * len(x)
    np.testing.assert_allclose(scaled.std(axis=0), 1.0, rtol=1e-3)


def test_item3_an_id_int_in_one_file_and_float_in_the_next_is_one_id(tmp_path):
    a = pd.DataFrame({"x": np.arange(100.0), "id": np.arange(100)})
    b = pd.DataFrame({"x": np.arange(100.0) + 0.5, "id": np.arange(95, 195).astype(float)})
    out = _ingested(_parquet_source([a, b], id_column="id"), tmp_path)
    assert out["stream"]["rows_quarantined"] == 5
    snap = snapshot.read_snapshot(str(tmp_path / "stream"))
    assert snap["id"].is_unique and snap["id"].dtype == np.float64


def test_item3_an_id_int_in_one_file_and_text_in_the_next_stays_as_written(tmp_path):
    a = pd.DataFrame({"x": np.arange(10.0), "id": np.arange(10)})
    b = pd.DataFrame({"x": [1.5, 2.5], "id": ["00100", "00101"]})
    _ingested(_parquet_source([a, b], id_column="id"), tmp_path)
    snap = snapshot.read_snapshot(str(tmp_path / "stream"))
    assert snap["id"].tolist()[-3:] == ["9", "00100", "00101"]


@pytest.mark.parametrize("second", [20.0, 31.5])
def test_item3_a_feature_int_in_one_file_and_float_in_the_next_is_float(tmp_path, second):
    a = pd.DataFrame({"x": np.arange(10.0), "y": np.arange(10)})
    b = pd.DataFrame({"x": np.arange(10.0), "y": np.arange(10.0) + second})
    out = _ingested(_parquet_source([a, b]), tmp_path)
    assert out["stream"]["contract"]["dtypes"]["y"] == "float64"


def test_item7_a_csv_boolean_with_blanks_is_one_type(tmp_path):
    values = pd.array([True, False, None, True, False, True, True, False, True, True], "boolean")
    frame = pd.DataFrame({"b": values, "x": np.arange(10.0)})
    src = Source(frames=[frame], fmt="csv", chunk_rows=3)
    out = _ingested(src, tmp_path)
    raw = ingest_via_raw(src, out["source"], tmp_path)
    assert_same_outcome(out["memory"], raw["stream"])
    assert out["stream"]["contract"]["dtypes"]["b"] == "float64"


def test_item7_a_null_in_a_later_row_group_only_is_one_type(tmp_path):
    y = pd.array([*list(range(9)), None], "Int64")
    out = _ingested(_parquet_source([pd.DataFrame({"x": np.arange(10.0), "y": y})]), tmp_path)
    assert out["stream"]["contract"]["dtypes"]["y"] == "int64"


def test_item7_a_named_index_is_a_column_either_way(tmp_path):
    """The streamed quarantine kept a named index as the index (pandas metadata), memory as a
    column."""
    frame = pd.DataFrame({"x": np.arange(12.0), "y": np.arange(12.0) ** 2})
    frame.loc[1, "x"] = np.nan
    src = _parquet_source([frame], index="named")
    out = _ingested(src, tmp_path)
    raw = ingest_via_raw(src, out["source"], tmp_path)
    assert_same_outcome(out["memory"], raw["stream"])
    assert out["stream"]["columns"][0] == "key"
    for name in ("memory", "stream", "raw_streamed"):
        assert_same_snapshot(tmp_path, "memory", name)
        assert list(snapshot.read_quarantine(str(tmp_path / name)).columns)[:3] == ["key", "x", "y"]


def test_item7_minus_two_to_the_63_next_to_a_blank_is_a_number(tmp_path):
    y = pd.array([-(2**63), None, *list(range(9))], "Int64")
    src = Source(frames=[pd.DataFrame({"x": np.arange(11), "y": y})], fmt="csv", chunk_rows=2)
    out = _ingested(src, tmp_path)
    assert out["memory"]["rows_quarantined"] == 1  # the blank only
    first = snapshot.read_snapshot(str(tmp_path / "memory"))["y"].iloc[0]
    assert first == pytest.approx(-(2.0**63), rel=1e-15)  # pandas' CSV float parser's nearest
