"""Helpers for the data tests: a clean batch, files made from it, and the ingest CLI in-process."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sae_pipeline.cli import main

ERROR_PREFIX = "sae-pipeline: error: "


def clean_frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Three numeric features on different scales and a label."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "a": rng.normal(0.0, 1.0, n).round(4),
            "b": rng.uniform(0.0, 10.0, n).round(4),
            "c": rng.integers(0, 100, n),
            "target": rng.integers(0, 3, n),
        }
    )


@dataclass
class Ingest:
    """What one ``sae-pipeline ingest`` call did."""

    rc: int
    out: str
    err: str
    output: Path

    @property
    def manifest(self) -> dict:
        return json.loads((self.output / "manifest.json").read_text())

    @property
    def error(self) -> str:
        return self.err.strip()

    def snapshot(self) -> pd.DataFrame:
        from sae_pipeline.data.snapshot import read_snapshot

        return read_snapshot(str(self.output), verify=True)

    def quarantine(self) -> pd.DataFrame:
        return pd.read_parquet(self.output / self.manifest["quarantine"])


def digest(path: Path) -> str:
    """Bytes of a file or of every file under a folder, hashed (to prove the input is untouched)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def run_ingest(source: str | Path | None, output: Path, *args: str) -> Ingest:
    """``sae-pipeline ingest`` in this process; checks the source was not modified."""
    argv = ["ingest", "--output", str(output), *args]
    if source is not None:
        argv += ["--source", str(source)]
    local = Path(str(source)) if source is not None and "://" not in str(source) else None
    before = digest(local) if local is not None and local.exists() else None
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    if before is not None:
        assert digest(local) == before, "ingest modified its input"
    return Ingest(rc, out.getvalue(), err.getvalue(), output)


def assert_one_line_error(result: Ingest, *needles: str) -> str:
    """A rejected batch: exit 2, one line naming the problem, nothing written."""
    assert result.rc == 2, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    message = lines[0].removeprefix(ERROR_PREFIX)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert not (result.output / "manifest.json").exists()
    assert not any(result.output.glob("snapshot*"))
    assert not (result.output / "quarantine.parquet").exists()
    return message


def assert_accounted(result: Ingest) -> dict:
    """An accepted batch: exit 0, rows in = accepted + quarantined, files match the manifest."""
    assert result.rc == 0, result.err
    m = result.manifest
    assert m["rows_in"] == m["rows_accepted"] + m["rows_quarantined"]
    printed = json.loads(result.out)
    for key in ("rows_in", "rows_accepted", "rows_quarantined", "content_hash"):
        assert printed[key] == m[key]
    assert len(result.snapshot()) == m["rows_accepted"]
    if m["rows_quarantined"]:
        q = result.quarantine()
        assert len(q) == m["rows_quarantined"]
        assert q["_quarantine_reason"].str.len().min() > 0
        assert q["_row"].is_unique and q["_row"].between(0, m["rows_in"] - 1).all()
    else:
        assert m["quarantine"] is None
        assert not (result.output / "quarantine.parquet").exists()
    return m


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_parquet(path, index=False)
    return path


PG_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"


@contextmanager
def postgres_database():
    """A fresh database on the local PostgreSQL server, dropped afterwards; skip if none runs
    (fail under CI, which provides it)."""
    import sqlalchemy

    from tests.ci import unavailable

    try:
        import psycopg2  # noqa: F401
    except ImportError:
        unavailable("psycopg2 is not installed (the distributed extra)")
    admin = sqlalchemy.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        conn = admin.connect()
    except sqlalchemy.exc.OperationalError as err:
        admin.dispose()
        unavailable(f"no PostgreSQL server answers at 127.0.0.1:5432 ({str(err).splitlines()[0]})")
    name = f"sae_test_{uuid.uuid4().hex[:12]}"
    conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.close()
        admin.dispose()
