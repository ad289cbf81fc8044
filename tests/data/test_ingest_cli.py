"""``sae-pipeline ingest``: one test per problem a user will meet, and what a snapshot promises.

Every rejected batch must exit 2 with one line naming the problem and write nothing; every
accepted one must account for each row (rows in = accepted + quarantined) and leave the
input as it was (``run_ingest`` checks the input's bytes before and after).
"""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.ingest_helpers import (
    assert_accounted,
    assert_one_line_error,
    clean_frame,
    run_ingest,
    write_csv,
    write_parquet,
)


@pytest.fixture
def trained(tmp_path):
    """A snapshot of a clean batch: its manifest holds the contract later batches must meet."""
    result = run_ingest(write_csv(clean_frame(), tmp_path / "train.csv"), tmp_path / "train")
    assert_accounted(result)
    return str(tmp_path / "train" / "manifest.json")


def with_value(frame: pd.DataFrame, row: int, column: str, value) -> pd.DataFrame:
    out = frame.astype({column: object})
    out.loc[row, column] = value
    return out


# ---- row problems: quarantined by default, the batch rejected on request ----------------------
ROW_PROBLEMS = [
    # (name, column, bad value, policy field, text in the row's reason, text in the error)
    ("non-numeric", "a", "abc", "non_numeric", "column 'a': non-numeric value 'abc'", "'abc'"),
    ("NaN", "b", np.nan, "missing_values", "column 'b': missing value", "missing value"),
    ("empty cell", "b", "", "missing_values", "column 'b': missing value", "missing value"),
    ("infinity", "c", "inf", "infinite_values", "column 'c': infinite value inf", "infinite"),
    ("-infinity", "c", "-inf", "infinite_values", "column 'c': infinite value -inf", "infinite"),
]


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [(p[1], p[2], p[4]) for p in ROW_PROBLEMS],
    ids=[p[0] for p in ROW_PROBLEMS],
)
def test_bad_values_are_quarantined_with_their_reason(tmp_path, column, value, reason):
    frame = with_value(clean_frame(), 7, column, value)
    result = run_ingest(write_csv(frame, tmp_path / "in.csv"), tmp_path / "out")
    m = assert_accounted(result)
    assert (m["rows_in"], m["rows_accepted"], m["rows_quarantined"]) == (40, 39, 1)
    q = result.quarantine()
    assert q["_row"].tolist() == [7]
    assert q["_quarantine_reason"].tolist() == [reason]
    assert np.isfinite(result.snapshot()[["a", "b", "c"]].to_numpy(dtype=float)).all()


@pytest.mark.parametrize(
    ("column", "value", "field", "needle"),
    [(p[1], p[2], p[3], p[5]) for p in ROW_PROBLEMS],
    ids=[p[0] for p in ROW_PROBLEMS],
)
def test_bad_values_reject_the_batch_when_the_policy_says_so(
    tmp_path, column, value, field, needle
):
    frame = with_value(clean_frame(), 7, column, value)
    result = run_ingest(
        write_csv(frame, tmp_path / "in.csv"),
        tmp_path / "out",
        "--set",
        f"data.validation.{field}=reject",
    )
    assert_one_line_error(result, f"column {column!r} has 1", needle, "at row 7", "reject")


def test_nan_and_inf_in_parquet_are_quarantined(tmp_path):
    frame = clean_frame().astype({"a": float})
    frame.loc[3, "a"] = np.nan
    frame.loc[5, "b"] = np.inf
    result = run_ingest(write_parquet(frame, tmp_path / "in.parquet"), tmp_path / "out")
    assert_accounted(result)
    reasons = result.quarantine().set_index("_row")["_quarantine_reason"].to_dict()
    assert reasons == {3: "column 'a': missing value", 5: "column 'b': infinite value inf"}


def test_too_many_quarantined_rows_fail_the_batch(tmp_path):
    frame = clean_frame()
    frame = frame.astype({"a": object})
    frame.loc[:7, "a"] = "oops"  # 8 of 40 rows: 20% > 10%
    result = run_ingest(write_csv(frame, tmp_path / "in.csv"), tmp_path / "out")
    assert_one_line_error(
        result, "8 of 40 rows (20%)", "max_quarantine_fraction=0.1", "column 'a'", "'oops'"
    )
    # the ceiling is configurable
    result = run_ingest(
        tmp_path / "in.csv",
        tmp_path / "out",
        "--set",
        "data.validation.max_quarantine_fraction=0.25",
    )
    assert assert_accounted(result)["rows_quarantined"] == 8


def test_a_column_of_text_is_rejected_by_name(tmp_path):
    frame = clean_frame().assign(name=[f"item {i}" for i in range(40)])
    result = run_ingest(write_csv(frame, tmp_path / "in.csv"), tmp_path / "out")
    assert_one_line_error(result, "column 'name' is not numeric", "40 value(s)", "'item 0'")
    # naming the features leaves the text column out of the snapshot
    result = run_ingest(
        tmp_path / "in.csv", tmp_path / "out", "--set", "data.feature_columns=[a, b, c]"
    )
    m = assert_accounted(result)
    assert m["columns"] == ["a", "b", "c", "target"]
    assert m["dropped_columns"] == ["name"]


def test_an_empty_column_is_rejected_by_name(tmp_path):
    frame = clean_frame().assign(b=np.nan)
    result = run_ingest(write_csv(frame, tmp_path / "in.csv"), tmp_path / "out")
    assert_one_line_error(result, "column 'b' has no values", "40 row(s)")


def test_missing_labels_and_bad_ids_are_quarantined(tmp_path):
    frame = clean_frame().astype({"target": object})
    frame["id"] = [f"r{i}" for i in range(40)]
    frame.loc[4, "target"] = None
    frame.loc[9, "id"] = "r2"
    frame.loc[11, "id"] = None
    result = run_ingest(
        write_csv(frame, tmp_path / "in.csv"), tmp_path / "out", "--id-column", "id"
    )
    assert_accounted(result)
    q = result.quarantine().set_index("_row")["_quarantine_reason"].to_dict()
    assert q == {
        4: "label 'target': missing value",
        9: "id 'id': repeated value 'r2' (first at row 2)",
        11: "id 'id': missing value",
    }
    assert result.snapshot()["id"].is_unique
    assert result.manifest["contract"]["id_column"] == "id"


# ---- against a recorded contract --------------------------------------------------------------
def test_a_missing_column_is_rejected(tmp_path, trained):
    frame = clean_frame(seed=1).drop(columns="b")
    result = run_ingest(
        write_csv(frame, tmp_path / "in.csv"), tmp_path / "out", "--contract", trained
    )
    assert_one_line_error(result, "1 feature column(s) of the contract missing", "'b'")


def test_an_extra_column_is_rejected_or_dropped(tmp_path, trained):
    frame = clean_frame(seed=1).assign(extra=1.0)
    source = write_csv(frame, tmp_path / "in.csv")
    result = run_ingest(source, tmp_path / "out", "--contract", trained)
    assert_one_line_error(result, "1 column(s) not in the contract: 'extra'", "ignore")
    result = run_ingest(
        source,
        tmp_path / "out",
        "--contract",
        trained,
        "--set",
        "data.validation.extra_columns=ignore",
    )
    m = assert_accounted(result)
    assert list(result.snapshot().columns) == ["a", "b", "c", "target"]
    assert m["dropped_columns"] == ["extra"]
    assert any("'extra'" in w for w in m["warnings"])


def test_reordered_columns_are_put_back_in_order_or_rejected(tmp_path, trained):
    frame = clean_frame(seed=1)[["c", "a", "target", "b"]]
    source = write_csv(frame, tmp_path / "in.csv")
    result = run_ingest(source, tmp_path / "out", "--contract", trained)
    m = assert_accounted(result)
    assert list(result.snapshot().columns) == ["a", "b", "c", "target"]
    assert any("order" in w for w in m["warnings"])
    pd.testing.assert_frame_equal(
        result.snapshot(), clean_frame(seed=1), check_dtype=False, check_exact=False
    )
    result = run_ingest(
        source,
        tmp_path / "out2",
        "--contract",
        trained,
        "--set",
        "data.validation.column_order=reject",
    )
    assert_one_line_error(result, "not in the contract's order", "'c'", "'a'")


def test_values_far_outside_the_training_range_are_quarantined_or_rejected(tmp_path, trained):
    frame = clean_frame(seed=1).astype({"b": float})
    frame.loc[5, "b"] = 1e6  # training range of b is within [0, 10]
    frame.loc[6, "b"] = 12.0  # outside, but not far: accepted
    source = write_csv(frame, tmp_path / "in.csv")
    result = run_ingest(source, tmp_path / "out", "--contract", trained)
    assert_accounted(result)
    q = result.quarantine()
    assert q["_row"].tolist() == [5]
    assert q["_quarantine_reason"][0].startswith(
        "column 'b': value 1e+06 far outside the training range ["
    )
    result = run_ingest(
        source,
        tmp_path / "out2",
        "--contract",
        trained,
        "--set",
        "data.validation.out_of_range=reject",
    )
    assert_one_line_error(
        result, "column 'b' has 1 value(s) far outside the training range [", "e.g. 1e+06 at row 5"
    )
    result = run_ingest(
        source,
        tmp_path / "out3",
        "--contract",
        trained,
        "--set",
        "data.validation.out_of_range=accept",
    )
    assert assert_accounted(result)["rows_quarantined"] == 0


def test_the_contract_itself_must_exist_and_be_one(tmp_path):
    source = write_csv(clean_frame(), tmp_path / "in.csv")
    result = run_ingest(source, tmp_path / "out", "--contract", str(tmp_path / "none.json"))
    assert_one_line_error(result, "data contract not found", "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"columns": ["a"]}))
    result = run_ingest(source, tmp_path / "out", "--contract", str(tmp_path / "bad.json"))
    assert_one_line_error(result, "is not a data contract", "feature_columns")


# ---- column and file problems -----------------------------------------------------------------
def test_duplicate_column_names_in_csv(tmp_path):
    (tmp_path / "in.csv").write_text("a,b,a,target\n1,2,3,0\n4,5,6,1\n")
    result = run_ingest(tmp_path / "in.csv", tmp_path / "out")
    assert_one_line_error(result, "duplicate column names: 'a'")


def test_duplicate_column_names_in_parquet(tmp_path):
    table = pa.Table.from_arrays([pa.array([1.0, 2.0])] * 2 + [pa.array([0, 1])], ["b", "b", "t"])
    pq.write_table(table, tmp_path / "in.parquet")
    result = run_ingest(tmp_path / "in.parquet", tmp_path / "out")
    assert_one_line_error(result, "duplicate column names: 'b'")


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_an_empty_file(tmp_path, suffix):
    (tmp_path / f"in.{suffix}").write_bytes(b"")
    result = run_ingest(tmp_path / f"in.{suffix}", tmp_path / "out")
    assert_one_line_error(result, "is empty", "0 bytes")


def test_a_header_with_no_rows(tmp_path):
    (tmp_path / "in.csv").write_text("a,b,c,target\n")
    result = run_ingest(tmp_path / "in.csv", tmp_path / "out")
    assert_one_line_error(result, "header but no rows", "'a', 'b', 'c', 'target'")
    write_parquet(clean_frame().iloc[:0], tmp_path / "in.parquet")
    result = run_ingest(tmp_path / "in.parquet", tmp_path / "out")
    assert_one_line_error(result, "header but no rows")


def test_constant_columns_warn_or_reject(tmp_path):
    frame = clean_frame().assign(k=3.0)
    source = write_csv(frame, tmp_path / "in.csv")
    m = assert_accounted(run_ingest(source, tmp_path / "out"))
    assert any("constant" in w and "'k'" in w for w in m["warnings"])
    result = run_ingest(
        source, tmp_path / "out2", "--set", "data.validation.constant_columns=reject"
    )
    assert_one_line_error(result, "1 constant feature column(s)", "'k'", "40 accepted rows")


def test_a_csv_that_is_not_utf8(tmp_path):
    text = "a,b,c,target\n1,2,3,0\n4,5,6,1\ncafé,1,2,0\n".encode("latin-1")
    (tmp_path / "in.csv").write_bytes(text)
    result = run_ingest(tmp_path / "in.csv", tmp_path / "out")
    assert_one_line_error(result, "is not UTF-8", "byte 0xe9", "line 4")


def test_a_csv_with_a_ragged_row(tmp_path):
    (tmp_path / "in.csv").write_text("a,b,target\n1,2,0\n3,4,5,6\n")
    result = run_ingest(tmp_path / "in.csv", tmp_path / "out")
    assert_one_line_error(result, "cannot be parsed", "line 3")


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not parquet"])
def test_a_damaged_parquet_file(tmp_path, damage):
    data = (write_parquet(clean_frame(), tmp_path / "good.parquet")).read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "corrupt":
        data = data[:4] + bytes(len(data) - 8) + data[-4:]
    else:
        data = b"a,b,c\n1,2,3\n"
    (tmp_path / "in.parquet").write_bytes(data)
    result = run_ingest(tmp_path / "in.parquet", tmp_path / "out")
    assert_one_line_error(result, "in.parquet is corrupt or truncated")


def test_a_damaged_shard_of_a_parquet_folder_is_named(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    frame = clean_frame()
    write_parquet(frame.iloc[:20], folder / "part-0.parquet")
    (folder / "part-1.parquet").write_bytes(b"PAR1 garbage PAR1")
    result = run_ingest(folder, tmp_path / "out")
    assert_one_line_error(result, "shard part-1.parquet", "corrupt or truncated")


def test_shards_with_different_columns_are_rejected(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(clean_frame().iloc[:20], folder / "part-0.parquet")
    write_parquet(clean_frame().iloc[20:].drop(columns="c"), folder / "part-1.parquet")
    result = run_ingest(folder, tmp_path / "out")
    assert_one_line_error(result, "shard part-1.parquet", "has columns ['a', 'b', 'target']")


def test_a_column_of_dates_is_the_wrong_type(tmp_path):
    frame = clean_frame().assign(when=pd.date_range("2026-01-01", periods=40))
    result = run_ingest(write_parquet(frame, tmp_path / "in.parquet"), tmp_path / "out")
    assert_one_line_error(result, "column 'when' has type datetime64[ns], not a number")


def test_a_missing_source(tmp_path):
    result = run_ingest(tmp_path / "nowhere.csv", tmp_path / "out")
    assert_one_line_error(result, "data source not found", "nowhere.csv")


def test_an_unknown_format(tmp_path):
    (tmp_path / "in.xlsx").write_bytes(b"x")
    result = run_ingest(tmp_path / "in.xlsx", tmp_path / "out")
    assert_one_line_error(result, "cannot tell the format", "data.format")


# ---- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("data.validation.max_quarantine_fraction=lots", "data.validation.max_quarantine_fraction"),
        ("data.validation.max_quarantine_fraction=1.5", "data.validation.max_quarantine_fraction"),
        ("data.validation.range_tolerance=-1", "data.validation.range_tolerance"),
        ("data.validation.non_numeric=ignore", "data.validation.non_numeric"),
        ("data.validation.typo=1", "data.validation.typo"),
        ("data.snapshot_shard_rows=0", "data.snapshot_shard_rows"),
        ("data.format=xlsx", "data.format"),
        ("data.feature_columns=[]", "data.feature_columns is empty"),
        ("data.feature_columns=[a, a]", "data.feature_columns repeats 'a'"),
        ("data.feature_columns=[a, target]", "data.label_column 'target' is also in"),
        ("data.feature_columns=5", "data.feature_columns"),
    ],
)
def test_bad_config_values_are_named(tmp_path, setting, needle):
    source = write_csv(clean_frame(), tmp_path / "in.csv")
    result = run_ingest(source, tmp_path / "out", "--set", setting)
    assert_one_line_error(result, "invalid config", needle)


def test_an_unknown_feature_column(tmp_path):
    source = write_csv(clean_frame(), tmp_path / "in.csv")
    result = run_ingest(source, tmp_path / "out", "--set", "data.feature_columns=[a, zz]")
    assert_one_line_error(result, "data.feature_columns names column(s) missing", "'zz'")


def test_sql_format_needs_a_query(tmp_path):
    result = run_ingest("sqlite:///x.db", tmp_path / "out")
    assert_one_line_error(result, "is a database URL but data.query is empty")
    result = run_ingest("x.db", tmp_path / "out", "--format", "sql")
    assert_one_line_error(result, "invalid config", "data.query is empty")


# ---- what a snapshot promises -----------------------------------------------------------------
def test_the_same_input_gives_the_same_hash_and_is_written_once(tmp_path):
    source = write_csv(clean_frame(), tmp_path / "in.csv")
    first = assert_accounted(run_ingest(source, tmp_path / "one"))
    second = assert_accounted(run_ingest(source, tmp_path / "two"))
    assert first["content_hash"] == second["content_hash"]
    # the same data in another format: the same hash
    third = assert_accounted(
        run_ingest(write_parquet(clean_frame(), tmp_path / "in.parquet"), tmp_path / "three")
    )
    assert third["content_hash"] == first["content_hash"]
    # again into the same folder: nothing rewritten
    mtime = (tmp_path / "one" / "snapshot.parquet").stat().st_mtime_ns
    again = assert_accounted(run_ingest(source, tmp_path / "one"))
    assert again == first
    assert (tmp_path / "one" / "snapshot.parquet").stat().st_mtime_ns == mtime
    # other data into the same folder: refused
    other = write_csv(clean_frame(seed=5), tmp_path / "other.csv")
    result = run_ingest(other, tmp_path / "one")
    assert result.rc == 2 and "already holds snapshot" in result.err
    assert (tmp_path / "one" / "manifest.json").read_text() == json.dumps(
        first, indent=2, sort_keys=True
    )


def test_the_manifest_has_what_was_promised(tmp_path):
    frame = with_value(clean_frame(), 2, "a", "bad")
    result = run_ingest(write_csv(frame, tmp_path / "in.csv"), tmp_path / "out")
    m = assert_accounted(result)
    assert m["snapshot"] == "snapshot.parquet"
    assert m["quarantine"] == "quarantine.parquet"
    assert m["source"] == str(tmp_path / "in.csv")
    contract = m["contract"]
    assert contract["feature_columns"] == ["a", "b", "c"]
    assert contract["label_column"] == "target"
    assert contract["dtypes"] == {"a": "float64", "b": "float64", "c": "int64"}
    snap = result.snapshot()
    for col, (lo, hi) in contract["feature_ranges"].items():
        assert lo == pytest.approx(snap[col].min()) and hi == pytest.approx(snap[col].max())
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out").glob(".*"))


def test_a_large_snapshot_is_written_as_shards(tmp_path):
    source = write_csv(clean_frame(n=95), tmp_path / "in.csv")
    result = run_ingest(source, tmp_path / "out", "--set", "data.snapshot_shard_rows=40")
    m = assert_accounted(result)
    assert m["snapshot"] == "snapshot"
    assert m["snapshot_files"] == [f"snapshot/part-0000{k}.parquet" for k in range(3)]
    assert len(result.snapshot()) == 95
    # a folder of shards is also a source; same rows, same hash
    again = assert_accounted(run_ingest(tmp_path / "out" / "snapshot", tmp_path / "again"))
    assert again["content_hash"] == m["content_hash"]


def test_a_damaged_snapshot_is_detected_on_reading(tmp_path):
    from sae_pipeline.data.snapshot import read_snapshot
    from sae_pipeline.errors import DataError

    result = run_ingest(write_csv(clean_frame(), tmp_path / "in.csv"), tmp_path / "out")
    assert_accounted(result)
    write_parquet(clean_frame(seed=3), tmp_path / "out" / "snapshot.parquet")  # swapped
    with pytest.raises(DataError, match="does not match its content hash"):
        read_snapshot(str(tmp_path / "out"), verify=True)


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine"])
def test_sklearn_datasets(tmp_path, name):
    from sae_pipeline.data.sources import load_sklearn

    m = assert_accounted(run_ingest(f"sklearn://{name}", tmp_path / "out"))
    assert m["rows_in"] == m["rows_accepted"] == len(load_sklearn(name))
    assert m["contract"]["label_column"] == "target"
    if name == "digits":  # the border pixels are blank in every image
        assert any("constant" in w and "'pixel_0'" in w for w in m["warnings"])


def test_fsspec_urls(tmp_path):
    import fsspec

    source = write_csv(clean_frame(), tmp_path / "in.csv")
    local = assert_accounted(run_ingest(source, tmp_path / "local"))
    by_url = assert_accounted(run_ingest(source.as_uri(), tmp_path / "url"))
    assert by_url["content_hash"] == local["content_hash"]
    fs = fsspec.filesystem("memory")
    fs.pipe(
        "/sae-test/in.parquet", write_parquet(clean_frame(), tmp_path / "p.parquet").read_bytes()
    )
    try:
        in_memory = run_ingest("memory://sae-test/in.parquet", tmp_path / "mem")
        assert assert_accounted(in_memory)["content_hash"] == local["content_hash"]
        # and the output can be a URL too
        url_out = run_ingest(source, "memory://sae-test/out")  # type: ignore[arg-type]
        assert url_out.rc == 0, url_out.err
        manifest = json.loads(fs.cat("/sae-test/out/manifest.json"))
        assert manifest["content_hash"] == local["content_hash"]
        assert fs.exists("/sae-test/out/snapshot.parquet")
    finally:
        fs.rm("/sae-test", recursive=True)
