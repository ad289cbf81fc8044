"""Snapshots keep values exactly: nullable integers and booleans, the content hash on what is
written."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_pipeline.config import DataConfig
from sae_pipeline.data.snapshot import read_quarantine, read_snapshot, write_snapshot
from tests.ingest_helpers import assert_accounted, clean_frame, run_ingest


def test_a_nullable_boolean_feature_passes_its_own_hash_check(tmp_path):
    frame = clean_frame(n=20)
    frame["flag"] = pd.array([True, False, None, *[True, False] * 8, True], dtype="boolean")
    manifest = write_snapshot(frame, DataConfig(), str(tmp_path / "snap"))
    assert (manifest["rows_accepted"], manifest["rows_quarantined"]) == (19, 1)
    got = read_snapshot(str(tmp_path / "snap"), verify=True)  # was: "does not match its hash"
    assert got["flag"].tolist() == frame["flag"].drop(index=2).tolist()
    # and as a CLI user meets it: a Parquet file written by pandas
    frame.to_parquet(tmp_path / "in.parquet", index=False)
    assert_accounted(run_ingest(tmp_path / "in.parquet", tmp_path / "out"))


INT_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(),
             pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()]  # fmt: skip


@st.composite
def id_columns(draw):
    """Unique ids of one integer width, at the ends of its range too, with some nulls."""
    kind = draw(st.sampled_from(INT_TYPES))
    bits = kind.bit_width
    lo, hi = (
        (0, 2**bits - 1)
        if pa.types.is_unsigned_integer(kind)
        else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    )
    values = draw(
        st.lists(st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, hi - 1])),
                 min_size=12, max_size=20, unique=True)
    )  # fmt: skip
    nulls = draw(st.sets(st.integers(0, len(values) - 1), max_size=1))
    return kind, [None if i in nulls else v for i, v in enumerate(values)]


@settings(max_examples=30, deadline=None)
@given(ids=id_columns(), csv=st.booleans())
def test_ids_of_any_integer_width_with_nulls_round_trip_exactly(ids, csv):
    kind, values = ids
    frame = clean_frame(n=len(values))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if csv:
            frame.assign(id=pd.array(values, dtype="object")).to_csv(tmp / "in.csv", index=False)
            source = tmp / "in.csv"
        else:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            pq.write_table(table.append_column("id", pa.array(values, kind)), tmp / "in.parquet")
            source = tmp / "in.parquet"
        result = run_ingest(source, tmp / "out", "--id-column", "id",
                            "--set", "data.validation.max_quarantine_fraction=0.5")  # fmt: skip
        assert_accounted(result)
        kept = [v for v in values if v is not None]
        got = result.snapshot()["id"].tolist()
        assert got == ([str(v) for v in kept] if csv else kept)
        if len(kept) < len(values):
            assert read_quarantine(str(tmp / "out"))["id"].isna().sum() == 1
