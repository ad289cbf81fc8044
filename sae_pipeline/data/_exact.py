"""Frames that keep values exactly as the source holds them.

By default pandas turns an integer column with a null into float64 (ids above 2**53 collide)
and a boolean column with a null into objects. Here such columns become pandas' nullable
types (``Int64``, ``UInt64``, ``boolean``, ...); every other column keeps its usual NumPy type.
Decimal columns (Spark and SQL exports) become float64, as every reader of features wants.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _nullable_types() -> dict:
    import pyarrow as pa

    return {
        pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
        pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype(),
    }  # fmt: skip


def decimal_to_float(array):
    """A decimal Arrow array as float64, each value the float nearest it (``float(Decimal)``).

    Through text: Arrow's direct cast scales by a power of ten and can land one float off.
    """
    import pyarrow as pa

    return array.cast(pa.string()).cast(pa.float64())


def decimals_as_floats(table):
    """An Arrow table or record batch with its decimal columns as float64."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_decimal(field.type):
            table = table.set_column(i, field.name, decimal_to_float(table.column(i)))
    return table


def table_to_frame(table) -> pd.DataFrame:
    """An Arrow table as a frame: nullable integers and booleans exact, decimals as float64."""
    table = decimals_as_floats(table)
    frame = table.to_pandas()
    nullable = _nullable_types()
    for name, column in zip(table.column_names, table.columns, strict=True):
        if column.null_count and column.type in nullable and list(frame.columns).count(name) == 1:
            # .array: assigned by position (the frame may have an index restored from pandas)
            frame[name] = column.to_pandas(types_mapper=nullable.get).array
    return frame


def numpy_unless_nullable(frame: pd.DataFrame) -> pd.DataFrame:
    """Nullable columns (as ``dtype_backend="numpy_nullable"`` reads them) back to NumPy types,
    except integer and boolean columns that hold a null: those stay exact."""
    for j in range(frame.shape[1]):
        s = frame.iloc[:, j]
        dtype = s.dtype
        if not isinstance(dtype, pd.api.extensions.ExtensionDtype):
            continue
        exact = pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
        if exact and s.isna().any():
            continue
        if pd.api.types.is_float_dtype(dtype):
            frame.isetitem(j, s.to_numpy(dtype=np.float64, na_value=np.nan))
        elif exact:
            frame.isetitem(j, s.to_numpy(dtype=dtype.numpy_dtype))
        else:  # text and the like: objects, None where no value (as pandas reads them)
            frame.isetitem(j, s.astype(object).where(s.notna(), None))
    return frame
