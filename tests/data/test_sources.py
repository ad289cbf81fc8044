"""Reading sources: CSV and Parquet variants, SQL (SQLite and the local PostgreSQL server)."""

import gzip

import numpy as np
import pandas as pd
import pytest
import sqlalchemy

from sae_pipeline.config import DataConfig
from sae_pipeline.data.sources import describe_source, read_source, source_format
from sae_pipeline.errors import DataError
from tests.ingest_helpers import (
    assert_accounted,
    assert_one_line_error,
    clean_frame,
    postgres_database,
    run_ingest,
    write_csv,
)


def read(source: str, **kw) -> pd.DataFrame:
    return read_source(DataConfig(source=source, **kw))


def test_csv_variants(tmp_path):
    frame = clean_frame(n=12)
    text = frame.to_csv(index=False)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "z.csv.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "t.txt").write_text(text)
    for name in ("bom.csv", "z.csv.gz", "t.txt"):
        pd.testing.assert_frame_equal(read(str(tmp_path / name)), frame)


def test_parquet_folder_reads_shards_in_name_order_and_skips_markers(tmp_path):
    frame = clean_frame(n=30)
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    frame.iloc[20:].to_parquet(folder / "sub" / "part-2.parquet", index=False)
    frame.iloc[:10].to_parquet(folder / "part-0.parquet", index=False)
    frame.iloc[10:20].to_parquet(folder / "part-1.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-0.parquet.crc").write_text("x")
    got = read(str(folder))
    pd.testing.assert_frame_equal(got, frame)
    assert source_format(DataConfig(source=str(folder))) == "parquet"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.parquet files"):
        read(str(tmp_path / "empty"))


def test_a_named_parquet_index_is_kept_as_a_column(tmp_path):
    frame = clean_frame(n=5).rename_axis("row_id")
    frame.to_parquet(tmp_path / "x.parquet")
    assert list(read(str(tmp_path / "x.parquet")).columns) == ["row_id", "a", "b", "c", "target"]


def test_sqlite_query(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    engine = sqlalchemy.create_engine(url)
    clean_frame(n=15).to_sql("batch", engine, index=False)
    engine.dispose()
    got = read(url, query="select * from batch order by rowid")
    pd.testing.assert_frame_equal(got, clean_frame(n=15))
    with pytest.raises(DataError, match="no such table: nope"):
        read(url, query="select * from nope")
    with pytest.raises(DataError, match="duplicate column names: 'a'"):
        read(url, query="select a, a, b from batch")


def test_passwords_are_not_shown():
    assert describe_source("postgresql://bob:s3cret@db:5432/x") == "postgresql://bob:***@db:5432/x"
    with pytest.raises(DataError) as err:
        read("postgresql+psycopg2://bob:s3cret@127.0.0.1:1/x", query="select 1")
    assert "s3cret" not in str(err.value)


@pytest.fixture
def pg_url():
    with postgres_database() as url:
        yield url


@pytest.mark.integration
def test_postgresql_table_with_nulls_nan_and_infinity(pg_url, tmp_path):
    engine = sqlalchemy.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("create table batch (a float8, b numeric, c int, target int)"))
        rows = [f"({r.a}, {r.b}, {r.c}, {r.target})" for r in clean_frame(n=40).itertuples()]
        conn.execute(sqlalchemy.text(f"insert into batch values {', '.join(rows)}"))
        conn.execute(sqlalchemy.text("insert into batch values (null, 1, 2, 0)"))
        conn.execute(sqlalchemy.text("insert into batch values ('NaN', 1, 2, 0)"))
        conn.execute(sqlalchemy.text("insert into batch values ('Infinity', 1, 2, 0)"))
    engine.dispose()
    frame = read(pg_url, query="select * from batch")
    assert frame["b"].dtype == np.float64  # NUMERIC arrives as numbers, not Decimal objects
    result = run_ingest(pg_url, tmp_path / "out", "--query", "select * from batch")
    m = assert_accounted(result)
    assert (m["rows_in"], m["rows_quarantined"]) == (43, 3)
    assert sorted(result.quarantine()["_quarantine_reason"]) == [
        "column 'a': infinite value inf",
        "column 'a': missing value",
        "column 'a': missing value",
    ]
    assert m["source"] == pg_url and m["source_format"] == "sql"
    bad = run_ingest(pg_url, tmp_path / "bad", "--query", "select * from nowhere")
    assert_one_line_error(bad, "SQL source", 'relation "nowhere" does not exist')


def test_the_training_dag_takes_a_sql_query():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "dags" / "sae_training.py"
    spec = importlib.util.spec_from_file_location("_test_sources_dag", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params = {"data_source": "postgresql://u@h/db", "data_query": "select * from t"}
    overrides = module.overrides_from_params(params)
    assert overrides["data.source"] == "postgresql://u@h/db"
    assert overrides["data.query"] == "select * from t"


# ---- data safety (issue 14) -------------------------------------------------------------------
SNOWFLAKES = [1_234_567_890_123_456_789 + i for i in range(40)]  # far above 2**53


def test_spark_leftovers_in_a_parquet_folder_are_not_data(tmp_path):
    import fsspec

    part = clean_frame(n=10)
    leftovers = {
        "part-00000.parquet": part,
        "_temporary/0/task_1/part-00000.parquet": part,
        ".part-00001.parquet": part,
        "sub/.staging/part-00002.parquet": part,
    }
    folder = tmp_path / "spark"
    for name, frame in leftovers.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(folder / name, index=False)
    (folder / "_SUCCESS").write_text("")
    pd.testing.assert_frame_equal(read(str(folder)), part)
    fs = fsspec.filesystem("memory")
    for p in folder.rglob("*"):
        if p.is_file():
            fs.pipe(f"/sae-spark-test/{p.relative_to(folder).as_posix()}", p.read_bytes())
    try:
        pd.testing.assert_frame_equal(read("memory://sae-spark-test/", format="parquet"), part)
    finally:
        fs.rm("/sae-spark-test", recursive=True)


def test_nullable_integer_ids_in_parquet_are_read_exactly(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [None if i == 17 else v for i, v in enumerate(SNOWFLAKES)]
    frame = clean_frame(n=40)
    table = pa.Table.from_pandas(frame, preserve_index=False).append_column(
        "id", pa.array(ids, pa.int64())
    )
    pq.write_table(table, tmp_path / "in.parquet")  # written by Spark-like tools: no pandas hints
    got = read(str(tmp_path / "in.parquet"))
    assert got["id"].dtype == "Int64"
    assert got["id"].tolist()[:17] == SNOWFLAKES[:17]
    result = run_ingest(tmp_path / "in.parquet", tmp_path / "out", "--id-column", "id")
    m = assert_accounted(result)  # was: "id 'id' has 38 repeated value(s)", 39 of 40 rows fail
    assert (m["rows_accepted"], m["rows_quarantined"]) == (39, 1)
    assert result.snapshot()["id"].tolist() == [v for v in ids if v is not None]
    assert result.quarantine()["_quarantine_reason"].tolist() == ["id 'id': missing value"]


def test_nullable_integer_ids_from_sql_are_read_exactly(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("create table batch (a float, b float, c int, id integer)"))
        for i, row in enumerate(clean_frame(n=40).itertuples()):
            ident = "null" if i == 3 else SNOWFLAKES[i]
            conn.execute(
                sqlalchemy.text(f"insert into batch values ({row.a}, {row.b}, {row.c}, {ident})")
            )
    engine.dispose()
    frame = read(url, query="select * from batch order by rowid")
    assert frame["id"].tolist()[4:] == SNOWFLAKES[4:]
    assert frame["a"].dtype == np.float64 and frame["c"].dtype == np.int64  # numbers as before
    result = run_ingest(
        url, tmp_path / "out", "--query", "select * from batch", "--id-column", "id"
    )
    m = assert_accounted(result)
    assert (m["rows_accepted"], m["rows_quarantined"]) == (39, 1)
    assert result.snapshot()["id"].tolist() == SNOWFLAKES[:3] + SNOWFLAKES[4:]


def test_csv_ids_are_carried_through_as_text(tmp_path):
    frame = clean_frame(n=6).astype({"c": object})
    frame["id"] = ["007", "7", "010", "10", "1.0", "90071992547409931"]
    result = run_ingest(
        write_csv(frame, tmp_path / "in.csv"), tmp_path / "out", "--id-column", "id"
    )
    m = assert_accounted(result)  # was: "007" and "7" reported as one repeated id
    assert m["rows_quarantined"] == 0
    assert result.snapshot()["id"].tolist() == ["007", "7", "010", "10", "1.0", "90071992547409931"]


def test_a_leading_blank_line_does_not_hide_a_duplicate_header(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("\n" + "a,a,b\n1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match="duplicate column names: 'a'"):
        read(str(path))
    path.write_text("\n\n  \na,b\n1,2\n")  # blank lines before a good header stay readable
    assert list(read(str(path)).columns) == ["a", "b"]


def test_decimal_columns_are_read_as_float64(tmp_path):
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [Decimal("3.3"), None, Decimal("-0.1")]
    pq.write_table(pa.table({"a": pa.array(values, pa.decimal128(3, 1))}), tmp_path / "d.parquet")
    got = read(str(tmp_path / "d.parquet"))
    assert got["a"].dtype == np.float64
    assert got["a"].tolist()[::2] == [3.3, -0.1] and np.isnan(got["a"][1])
