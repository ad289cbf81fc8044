"""The pure core: the data contract and ``validate_batch`` on frames (no files, no CLI)."""

import numpy as np
import pandas as pd
import pytest

from sae_pipeline.config import DataConfig, ValidationConfig
from sae_pipeline.data.contract import Contract, content_hash
from sae_pipeline.data.validation import REASON_COLUMN, ROW_COLUMN, validate_batch, validate_frame
from sae_pipeline.errors import DataError
from tests.ingest_helpers import clean_frame


def data_config(**validation) -> DataConfig:
    return DataConfig(validation=ValidationConfig(**validation))


def test_contract_round_trip_and_older_contracts():
    c = Contract(["a", "b"], {"a": "float64", "b": "int64"}, "y", "id", {"a": [0.0, 1.0]})
    assert Contract.from_dict(c.to_dict()) == c
    assert c.columns == ["a", "b", "y", "id"]
    old = {"feature_columns": ["a"], "dtypes": {"a": "float64"}, "label_column": None}
    assert Contract.from_dict({**old, "id_column": None}).feature_ranges is None
    with pytest.raises(DataError, match="feature_columns"):
        Contract.from_dict({"columns": ["a"]})


def test_validate_frame_stays_strict_and_names_the_problem():
    contract = Contract(["a", "b"], {"a": "float64", "b": "float64"})
    ok = pd.DataFrame({"a": [1.0, 2.0], "b": [3, 4], "extra": ["x", "y"]})
    assert validate_frame(ok, contract) == {"rows": 2, "columns": 2}
    cases = [
        (pd.DataFrame({"a": [1.0, np.nan], "b": [1, 2]}), "column 'a' has 1 missing value"),
        (pd.DataFrame({"a": [1.0, np.inf], "b": [1, 2]}), "column 'a' has 1 infinite value"),
        (pd.DataFrame({"a": ["1", "x"], "b": [1, 2]}), "column 'a' has 1 non-numeric value"),
        (pd.DataFrame({"a": [1.0]}), "feature column(s) missing: b"),
        (pd.DataFrame({"a": [], "b": []}), "header but no rows"),
    ]
    for frame, message in cases:
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate_frame(frame, contract)


def test_accepted_plus_quarantined_is_every_row_and_reasons_are_per_row():
    frame = clean_frame().astype({"a": object, "b": float})
    frame.loc[1, "a"] = "x"
    frame.loc[1, "b"] = np.inf  # two problems in one row: both reasons
    frame.loc[3, "b"] = np.nan
    result = validate_batch(frame, data_config())
    assert (result.rows_in, result.rows_accepted, result.rows_quarantined) == (40, 38, 2)
    q = result.quarantined
    assert q[ROW_COLUMN].tolist() == [1, 3]
    assert q[REASON_COLUMN].tolist() == [
        "column 'a': non-numeric value 'x'; column 'b': infinite value inf",
        "column 'b': missing value",
    ]
    assert q["a"].tolist() == ["x", frame.loc[3, "a"]]  # quarantined rows keep their values
    assert result.accepted["a"].dtype == np.float64  # text that holds numbers becomes numbers
    np.testing.assert_allclose(
        result.accepted["a"], frame.drop(index=[1, 3])["a"].astype(float), rtol=0
    )


def test_the_recorded_contract_has_numeric_dtypes_and_training_ranges():
    frame = clean_frame().astype({"c": str})
    result = validate_batch(frame, data_config())
    c = result.contract
    assert c.feature_columns == ["a", "b", "c"] and c.label_column == "target"
    assert c.dtypes == {"a": "float64", "b": "float64", "c": "float64"}
    assert c.feature_ranges["c"] == [
        float(frame["c"].astype(int).min()),
        float(frame["c"].astype(int).max()),
    ]


def test_out_of_range_uses_the_contract_and_the_tolerance():
    train = validate_batch(clean_frame(), data_config()).contract
    lo, hi = train.feature_ranges["b"]
    span = hi - lo
    batch = clean_frame(seed=1).astype({"b": float})
    batch.loc[0, "b"] = hi + 0.9 * span  # within one range of the edge: accepted
    batch.loc[1, "b"] = lo - 1.1 * span  # beyond: quarantined
    result = validate_batch(batch, data_config(), train)
    assert result.quarantined[ROW_COLUMN].tolist() == [1]
    strict = validate_batch(batch, data_config(range_tolerance=0.5), train)
    assert strict.quarantined[ROW_COLUMN].tolist() == [0, 1]
    assert result.contract is train  # a given contract is kept, not re-recorded


def test_a_constant_training_column_gets_a_unit_range():
    frame = clean_frame().assign(k=0.0)
    train = validate_batch(frame, data_config()).contract
    batch = clean_frame(seed=1).assign(k=0.0)
    batch.loc[2, "k"] = 0.9
    batch.loc[3, "k"] = 1.5
    result = validate_batch(batch, data_config(), train)
    assert result.quarantined[ROW_COLUMN].tolist() == [3]


def test_the_quarantine_ceiling_is_inclusive():
    frame = clean_frame().astype({"a": object})
    frame.loc[:3, "a"] = "bad"  # 4 of 40 = exactly 10%
    assert validate_batch(frame, data_config()).rows_quarantined == 4
    frame.loc[4, "a"] = "bad"
    with pytest.raises(DataError, match=r"5 of 40 rows \(12%\)"):
        validate_batch(frame, data_config())
    frame.loc[5:, "b"] = np.nan  # every row now has a problem
    with pytest.raises(DataError, match="no rows left: all 40 rows fail"):
        validate_batch(frame, data_config(max_quarantine_fraction=1.0))


def test_bool_and_integer_features_are_numbers():
    frame = clean_frame().assign(flag=[True, False] * 20)
    result = validate_batch(frame, data_config())
    assert result.rows_quarantined == 0
    assert result.accepted["flag"].dtype == bool and result.accepted["c"].dtype == np.int64


def test_text_that_means_missing_is_missing_not_non_numeric():
    frame = clean_frame().astype({"a": object})
    frame.loc[0, "a"] = "NaN"
    frame.loc[1, "a"] = " null "
    result = validate_batch(frame, data_config())
    assert set(result.quarantined[REASON_COLUMN]) == {"column 'a': missing value"}


def test_reserved_and_duplicate_names():
    with pytest.raises(DataError, match="'_quarantine_reason' is reserved"):
        validate_batch(clean_frame().assign(_quarantine_reason="x"), data_config())
    frame = pd.DataFrame([[1.0, 2.0]], columns=["a", "a"])
    with pytest.raises(DataError, match="duplicate column names: 'a'"):
        validate_batch(frame, data_config())
    with pytest.raises(DataError, match="no columns"):
        validate_batch(pd.DataFrame(index=range(3)), data_config())


def test_content_hash_follows_the_values():
    a, b = clean_frame(), clean_frame()
    assert content_hash(a) == content_hash(b)
    b.loc[0, "a"] += 1e-9
    assert content_hash(a) != content_hash(b)
    assert content_hash(a) != content_hash(a.rename(columns={"a": "z"}))


def test_column_names_become_strings():
    frame = pd.DataFrame(np.arange(30, dtype=float).reshape(10, 3))
    result = validate_batch(frame, data_config())
    assert list(result.accepted.columns) == ["0", "1", "2"]
    assert result.contract.feature_columns == ["0", "1", "2"]


# ---- data safety (issue 14) -------------------------------------------------------------------
def test_an_unlabelled_batch_gets_a_contract_without_the_label():
    contract = validate_batch(clean_frame(), data_config()).contract
    assert contract.label_column == "target"
    result = validate_batch(clean_frame().drop(columns=["target"]), data_config(), contract)
    assert result.contract.label_column is None
    assert list(result.accepted.columns) == ["a", "b", "c"]
    assert any("label column 'target' is absent" in w for w in result.warnings)


def test_a_repeated_id_is_kept_when_its_first_row_was_quarantined_for_another_reason():
    frame = clean_frame(n=10).astype({"a": object})
    frame["id"] = [f"r{i}" for i in range(10)]
    frame.loc[2, "a"] = "x"  # row 2 is quarantined for its value...
    frame.loc[6, "id"] = "r2"  # ...so row 6 is the first valid row with id r2
    frame.loc[9, "id"] = "r7"  # a repeat among valid rows is still one
    cfg = DataConfig(id_column="id", validation=ValidationConfig(max_quarantine_fraction=0.5))
    result = validate_batch(frame, cfg)
    reasons = dict(
        zip(result.quarantined[ROW_COLUMN], result.quarantined[REASON_COLUMN], strict=True)
    )
    assert reasons == {
        2: "column 'a': non-numeric value 'x'",
        9: "id 'id': repeated value 'r7' (first at row 7)",
    }
    assert sorted(result.accepted["id"]) == sorted(["r0", "r1", "r3", "r4", "r5", "r2", "r7", "r8"])
