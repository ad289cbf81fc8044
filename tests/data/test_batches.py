"""New batches for encoding and drift: listing their files, their key, decimal features."""

from __future__ import annotations

import io
import threading
from decimal import Decimal
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_pipeline.data import batches
from sae_pipeline.data.contract import Contract

FEATURES = ["x0", "x1"]
CONTRACT = Contract(FEATURES, dict.fromkeys(FEATURES, "float64"))


def parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    return buf.getvalue()


def spark_folder(write) -> None:
    """A Spark job's output: one real part, and what a job leaves beside it."""
    write("part-00000.parquet", parquet(pd.DataFrame({"x0": [1.0, 2.0], "x1": [3.0, 4.0]})))
    write(
        "_temporary/0/task_1/part-00000.parquet", parquet(pd.DataFrame({"x0": [9.0], "x1": [9.0]}))
    )
    write(".part-00001.parquet", parquet(pd.DataFrame({"x0": [8.0], "x1": [8.0]})))
    write("_SUCCESS", b"")


def test_batch_listings_skip_spark_leftovers_locally_and_remotely(tmp_path):
    def local(name: str, data: bytes) -> None:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)

    spark_folder(local)
    assert batches.list_files(str(tmp_path)) == [str(tmp_path / "part-00000.parquet")]
    fs = fsspec.filesystem("memory")
    spark_folder(lambda name, data: fs.pipe(f"/sae-batches-test/{name}", data))
    try:
        assert batches.list_files("memory://sae-batches-test") == [
            "memory:///sae-batches-test/part-00000.parquet"
        ]
    finally:
        fs.rm("/sae-batches-test", recursive=True)


def test_decimal_features_are_numbers_for_encoding_and_drift(tmp_path):
    values = {"x0": ["1.5", "-2.0", "0.1"], "x1": ["3.3", None, "4.0"]}
    table = pa.table(
        {c: pa.array([None if v is None else Decimal(v) for v in vs], pa.decimal128(3, 1))
         for c, vs in values.items()}
    )  # fmt: skip
    pq.write_table(table, tmp_path / "d.parquet")
    files = batches.list_files(str(tmp_path / "d.parquet"))
    info = batches.inspect_batch(files, CONTRACT)  # was: "is decimal128(3, 1), not numeric"
    x = batches.feature_matrix(next(batches.iter_chunks(files, FEATURES, 10)), FEATURES)
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x, [[1.5, 3.3], [-2.0, np.nan], [0.1, 4.0]])
    sample, counts = batches.read_batch_sample({"batch": info}, FEATURES, 0, seed=0)
    assert counts == {"rows_in": 3, "rows_valid": 2, "rows_quarantined": 1}
    assert sample["x0"].tolist() == [1.5, 0.1]


FRAMES = st.integers(1, 6).flatmap(
    lambda n: st.lists(
        st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=2, max_size=2),
        min_size=n,
        max_size=n,
    )
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(before=FRAMES, after=FRAMES, remote=st.booleans())
def test_the_batch_key_changes_whenever_the_content_does(tmp_path, before, after, remote):
    a = parquet(pd.DataFrame(before, columns=FEATURES))
    b = parquet(pd.DataFrame(after, columns=FEATURES))
    if remote:
        fs = fsspec.filesystem("memory")
        uri = "memory:///sae-key-test/today.parquet"

        def put(data: bytes) -> None:
            fs.pipe("/sae-key-test/today.parquet", data)
    else:
        path: Path = tmp_path / "today.parquet"
        uri = str(path)
        put = path.write_bytes
    put(a)
    first = batches.inspect_batch([uri], CONTRACT)["key"]
    put(b)  # the same name, maybe the same row count
    second = batches.inspect_batch([uri], CONTRACT)["key"]
    assert (first == second) == (a == b), (before, after)  # content = the bytes (0.0 vs -0.0)
    assert first.startswith("today-")


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_the_batch_key_is_stable_for_the_same_content(tmp_path, kind):
    data = parquet(pd.DataFrame({"x0": [1.0], "x1": [2.0]}))
    if kind == "memory":
        fs = fsspec.filesystem("memory")
        fs.pipe("/sae-key-stable/b.parquet", data)
        uri = "memory:///sae-key-stable/b.parquet"
    else:
        (tmp_path / "b.parquet").write_bytes(data)
        uri = str(tmp_path / "b.parquet")
    keys = {batches.inspect_batch([uri], CONTRACT)["key"] for _ in range(2)}
    assert len(keys) == 1


def test_prefetch_runs_setup_in_its_own_thread_before_the_items():
    seen = []

    def items():
        seen.append(("item", threading.current_thread().name))
        yield 1
        yield 2

    got = list(
        batches.prefetch(
            items(), setup=lambda: seen.append(("setup", threading.current_thread().name))
        )
    )
    assert got == [1, 2]
    assert seen == [("setup", "sae-prefetch"), ("item", "sae-prefetch")]
