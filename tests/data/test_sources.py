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
