"""One schema for a source: each column's pandas type over every file, worked out once.

A folder of Parquet files may hold a column as int64 in one file and float64 (or text) in the
next, and a column whose nulls sit in one row group only. Read whole, pandas would promote
such a column when it concatenates the files; read a chunk at a time, each chunk would keep
its own type. Here the type is decided once, at open, from every file's footer, with pandas'
promotion rules (``find_common_type``, what ``pd.concat`` applies), and every chunk (or
file, in memory) is cast to it before it is validated: both paths see the same values, key
ids on the same type and record the same contract.

- integers with a null anywhere in the column (in any file): pandas' nullable type (``Int64``);
- integers and floats: float64; integers of two widths: the wider;
- a mix pandas keeps as objects (numbers and text, booleans and numbers): text, each value
  written as ``str`` writes it (``100`` becomes ``"100"``; ``"00100"`` stays as it is).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.errors import DataError

Dtypes = dict[str, Any]


def file_dtypes(pf) -> Dtypes:
    """The columns and pandas types of a whole Parquet file as ``read_parquet`` reads it
    (a named index as a column; integers and booleans nullable when the file holds a null),
    from its footer: no row is read unless a column's null count is not recorded there."""
    from sae_pipeline.data._exact import _nullable_types, table_to_frame

    frame = table_to_frame(pf.schema_arrow.empty_table())
    if isinstance(frame.index, pd.MultiIndex) or frame.index.name is not None:
        frame = frame.reset_index()
    dtypes = dict(frame.dtypes.items())
    nullable = _nullable_types()
    names = pf.schema_arrow.names
    for name in list(dtypes):
        if name not in names:
            continue
        arrow_type = pf.schema_arrow.field(name).type
        if arrow_type in nullable and _has_null(pf, names.index(name)):
            dtypes[name] = nullable[arrow_type]
    return dtypes


def _has_null(pf, j: int) -> bool:
    md = pf.metadata
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(j).statistics
        if stats is None or not stats.has_null_count:  # not recorded: count them
            return pf.read(columns=[pf.schema_arrow.names[j]]).column(0).null_count > 0
        if stats.null_count:
            return True
    return False


def common_dtypes(per_file: Sequence[Dtypes]) -> Dtypes:
    """Each column's type over all files, by pandas' promotion rules (as ``pd.concat``)."""
    from pandas.core.dtypes.cast import find_common_type

    out: Dtypes = {}
    for name in per_file[0]:
        kinds = [d[name] for d in per_file]
        common = find_common_type(kinds)
        out[name] = np.dtype(object) if isinstance(common, pd.StringDtype) else common
    return out


def cast_frame(frame: pd.DataFrame, dtypes: Dtypes, label: str) -> pd.DataFrame:
    """``frame`` with each column in its ``dtypes`` type: the same values either path reads."""
    changed = [c for c in frame.columns if c in dtypes and frame[c].dtype != dtypes[c]]
    if not changed:
        return frame
    frame = frame.copy(deep=False)
    for col in changed:
        target, values = dtypes[col], frame[col]
        try:
            if target == np.dtype(object):
                frame[col] = _as_text(values)
            elif pd.api.types.is_float_dtype(target) and not isinstance(
                target, pd.api.extensions.ExtensionDtype
            ):
                frame[col] = values.to_numpy(dtype=target, na_value=np.nan)
            else:
                frame[col] = values.astype(target)
        except (TypeError, ValueError, OverflowError) as err:
            raise DataError(
                f"{label}: column {col!r} is {values.dtype} here but {target} in the source's "
                f"other files, and cannot be converted ({str(err).splitlines()[0]})"
            ) from None
    return frame


def _as_text(values: pd.Series) -> pd.Series:
    """Values as text (``str``), nulls as None: how a column of mixed types is kept."""
    out = values.astype(object)
    present = out.notna().to_numpy()
    text = np.array([v if isinstance(v, str) else str(v) for v in out[present]], dtype=object)
    result = np.full(len(out), None, dtype=object)
    result[present] = text
    return pd.Series(result, index=values.index, name=values.name, dtype=object)


def arrow_schema(dtypes: Dtypes):
    """The Arrow schema a frame of these types is stored with (nullable types as their values,
    text as string)."""
    import pyarrow as pa

    fields = []
    for name, dtype in dtypes.items():
        if dtype == np.dtype(object):
            fields.append(pa.field(name, pa.string()))
        else:
            empty = pd.Series([], dtype=dtype)
            fields.append(pa.field(name, pa.array(empty, from_pandas=True).type))
    return pa.schema(fields)
