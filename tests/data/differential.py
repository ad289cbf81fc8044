"""The differential harness's sources and paths: small generated sources, each read in memory
and streamed (``data.in_memory_max_bytes: 0``, tiny chunks and shards), for the tests in
``test_differential.py`` to compare."""

from __future__ import annotations

import csv
import io
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
from hypothesis import strategies as st

from sae_pipeline import storage
from sae_pipeline.config import DataConfig, ValidationConfig
from sae_pipeline.data import ingest, snapshot
from sae_pipeline.data.sources import ParquetStream, read_source
from sae_pipeline.errors import DataError

OFFSETS = [0.0, 1e-3, 1e3, 1e6, 1.7e9, -3e12]
SCALES = [1e-4, 0.05, 1.0, 1e3, 1e7]
NUMERIC_KINDS = ["float64", "float64", "int64", "float32", "int32", "Int64"]


@dataclass
class Source:
    """A generated source: its files' frames and how they are written."""

    frames: list[pd.DataFrame]
    fmt: str = "parquet"  # or "csv"
    row_groups: list[int] = field(default_factory=list)
    index: str = "none"  # "named" or "unnamed" (a non-range index pandas stores as a column)
    dialect: dict = field(default_factory=dict)  # CSV: bom, crlf, quote_all
    id_column: str | None = None
    label_column: str | None = None
    chunk_rows: int = 3
    shard_rows: int = 5
    scaler: str = "standard"
    via_raw: bool = True  # also through the training run's raw copy

    def write(self, folder: Path) -> str:
        if self.fmt == "csv":
            path = folder / "src.csv"
            text = self.frames[0].to_csv(
                index=False,
                lineterminator="\r\n" if self.dialect.get("crlf") else "\n",
                quoting=csv.QUOTE_ALL if self.dialect.get("quote_all") else csv.QUOTE_MINIMAL,
            )
            path.write_bytes(("\ufeff" if self.dialect.get("bom") else "").encode() + text.encode())
            return str(path)
        src = folder / "src"
        src.mkdir()
        for k, (frame, rg) in enumerate(zip(self.frames, self.row_groups, strict=True)):
            out = frame
            if self.index == "named":
                out = frame.set_axis(pd.Index(np.arange(len(frame)) * 7 + k, name="key"))
            elif self.index == "unnamed":
                out = frame.set_axis(pd.Index(np.arange(len(frame)) * 3 + 1))
            out.to_parquet(src / f"part-{k}.parquet", index=self.index != "none", row_group_size=rg)
        return str(src) + "/"

    def config(self, source: str, streamed: bool) -> DataConfig:
        return DataConfig(
            source=source,
            id_column=self.id_column,
            label_column=self.label_column,
            snapshot_shard_rows=self.shard_rows,
            in_memory_max_bytes=0 if streamed else 2**40,
            validation=ValidationConfig(max_quarantine_fraction=0.9),
        )


def _column(rng, kind: str, n: int, offset: float, scale: float, nulls: float) -> pd.Series:
    x = offset + scale * rng.normal(size=n)
    null = rng.random(n) < nulls
    if kind == "bool":
        values = pd.array(rng.random(n) < 0.5, dtype="boolean")
        values[null] = pd.NA
        return pd.Series(values)
    if kind in ("int64", "int32", "Int64"):
        bound = 2**30 if kind == "int32" else 2**62
        x = np.clip(np.round(x), -bound, bound)
        if kind != "int32" and rng.random() < 0.1 and n:
            x[0] = -(2**63)  # the integer that is pandas' null marker
        if null.any() or kind == "Int64":
            values = pd.array(x.astype(np.int64), dtype="Int64")
            values[null] = pd.NA
            return pd.Series(values)
        return pd.Series(x.astype(kind))
    x = x.astype(kind)
    x[null] = np.nan
    return pd.Series(x)


def _ids(rng, kind: str, n: int, start: int, nulls: float) -> pd.Series:
    # Ids overlap between files and within them: repeats to quarantine.
    base = start + rng.integers(-3, max(n, 1) + 2, size=n)
    null = rng.random(n) < nulls
    if kind == "int":
        values = pd.array(base, dtype="Int64")
        values[null] = pd.NA
        return pd.Series(values if null.any() else base)
    if kind == "float":
        return pd.Series(np.where(null, np.nan, base.astype(np.float64)))
    return pd.Series(
        [None if z else f"{v:05d}" for v, z in zip(base, null, strict=True)], dtype=object
    )


@st.composite
def sources(draw) -> Source:
    """Several files, mixed row groups, nulls, mixed numeric types, ids of each kind,
    offsets and scales over many orders of magnitude, CSV dialects."""
    fmt = draw(st.sampled_from(["parquet", "parquet", "csv"]))
    n_files = 1 if fmt == "csv" else draw(st.integers(1, 3))
    n_features = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kinds = [*NUMERIC_KINDS, "bool"]
    feature_kinds = [
        [draw(st.sampled_from(kinds)) for _ in range(n_files)]
        if draw(st.booleans())
        else [draw(st.sampled_from(kinds))] * n_files
        for _ in range(n_features)
    ]
    shapes = [
        (draw(st.sampled_from(OFFSETS)), draw(st.sampled_from(SCALES))) for _ in range(n_features)
    ]
    nulls = draw(st.sampled_from([0.0, 0.0, 0.05, 0.2]))
    id_kind = draw(st.sampled_from([None, "int", "text", "float", "mixed"]))
    label = draw(st.booleans())
    frames, start = [], 0
    for k in range(n_files):
        n = draw(st.integers(1 if n_files == 1 else 0, 9))
        frame = pd.DataFrame(
            {
                f"f{j}": _column(rng, feature_kinds[j][k], n, *shapes[j], nulls)
                for j in range(n_features)
            }
        )
        if label:
            frame["target"] = pd.Series(pd.array(rng.integers(0, 3, n), dtype="Int64"))
            if nulls and n:
                frame.loc[0, "target"] = pd.NA
            if not frame["target"].isna().any():
                frame["target"] = frame["target"].astype(np.int64)
        if id_kind is not None:
            kind = (
                draw(st.sampled_from(["int", "text", "float"])) if id_kind == "mixed" else id_kind
            )
            frame["id"] = _ids(rng, kind, n, start, nulls / 2)
        frames.append(frame)
        start += n
    if sum(len(f) for f in frames) == 0:
        frames[0] = frames[0].iloc[:0]
    return Source(
        frames=frames,
        fmt=fmt,
        row_groups=[draw(st.integers(1, 4)) for _ in frames],
        index=draw(st.sampled_from(["none", "none", "named", "unnamed"])),
        dialect={k: draw(st.booleans()) for k in ("bom", "crlf", "quote_all")},
        id_column="id" if id_kind is not None else None,
        label_column="target" if label else None,
        chunk_rows=draw(st.integers(1, 5)),
        shard_rows=draw(st.integers(1, 7)),
        scaler=draw(st.sampled_from(["standard", "minmax", "robust", "none"])),
        via_raw=draw(st.integers(0, 2)) == 0,
    )


@contextmanager
def small_chunks(rows: int):
    with mock.patch.object(ingest, "CHUNK_ROWS", rows):
        yield


def ingest_both(src: Source, folder: Path) -> dict:
    """{"memory": ..., "stream": ...}: each a manifest dict, or the DataError's message."""
    source = src.write(folder)
    out = {}
    for name, streamed in (("memory", False), ("stream", True)):
        with small_chunks(src.chunk_rows):
            try:
                out[name] = ingest.ingest(src.config(source, streamed), str(folder / name))
            except DataError as err:
                out[name] = str(err)
    out["source"] = source
    return out


def ingest_via_raw(src: Source, source: str, folder: Path) -> dict:
    """The training run's way: the source kept as a raw copy, then validated (as
    ``steps._training_data.ingest`` and ``validate`` do, in memory and streamed)."""
    out = {}
    cfg = src.config(source, False)
    try:
        frame = snapshot.parquet_safe(read_source(cfg))
        raw = str(folder / "raw_mem.parquet")
        storage.write_bytes(raw, snapshot.parquet_bytes(frame))
        out["memory"] = snapshot.write_snapshot(
            storage.read_parquet(raw), cfg, str(folder / "raw_memory")
        )
    except DataError as err:
        out["memory"] = str(err)
    cfg = src.config(source, True)
    with small_chunks(src.chunk_rows):
        try:
            stream = ingest.open_stream(cfg)
            if stream is None:  # no rows: read in memory whatever the setting
                out["stream"], out["copied_rows"] = out["memory"], 0
                return out
            copied = ingest.copy_raw(stream, str(folder / "raw_stream"), src.shard_rows)
            assert copied["rows"] == stream.rows
            out["copied_rows"] = copied["rows"]
            chunks = ParquetStream(str(folder / "raw_stream"), src.chunk_rows)
            out["stream"] = ingest.write_snapshot_stream(chunks, cfg, str(folder / "raw_streamed"))
        except DataError as err:
            out["stream"] = str(err)
    return out


def csv_text(frame: pd.DataFrame) -> str:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue()
