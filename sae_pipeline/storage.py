"""The artifact store: one root URI (local folder or fsspec URL), scoped by run.

``<root>/runs/<run key>/<step>/...``. Every write is atomic: local files are written to a
temporary name and renamed; object stores (s3://, gs://) make a PUT visible all at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).resolve()


def normalize_root(root: str) -> str:
    """Local roots become absolute paths, so every task on every worker agrees on them; a
    URL loses trailing slashes of its path only (``x://`` stays a URL, never ``x:``)."""
    if is_local(root):
        return str(local_path(root))
    head, sep, path = root.partition("://")
    return head + sep + path.rstrip("/")


def run_key(run_id: str) -> str:
    """A file-name-safe key for an Airflow run id (``manual__2026-01-01T00:00:00+00:00``)."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("_") or "run"
    # Airflow accepts the run ids "." and "..", which would name the run folder's own parent
    # (<root>/runs/.. is the root). No other run id gives a key that starts with "_".
    return key if key.strip(".") else "_" + key


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def run_dir(root: str, key: str, step: str = "") -> str:
    return join(normalize_root(root), "runs", key, step)


def exists(uri: str) -> bool:
    if is_local(uri):
        return local_path(uri).exists()
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def write_bytes(uri: str, data: bytes) -> str:
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return str(path)
    with fsspec.open(uri, "wb") as fh:
        fh.write(data)
    return uri


def read_bytes(uri: str) -> bytes:
    if is_local(uri):
        return local_path(uri).read_bytes()
    with fsspec.open(uri, "rb") as fh:
        return fh.read()


def write_json(uri: str, obj: Any) -> str:
    return write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_arrays(uri: str, **arrays: np.ndarray) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_bytes(uri, buf.getvalue())


def read_arrays(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def write_parquet(uri: str, frame) -> str:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return write_bytes(uri, buf.getvalue())


def read_parquet(uri: str):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(uri)))


def write_torch(uri: str, obj: Any) -> str:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(uri, buf.getvalue())


def read_torch(uri: str) -> Any:
    import torch

    return torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)


# ---- staged writes: many files, committed together --------------------------------------------
def new_stage(out_dir: str) -> str:
    """A fresh staging folder under ``out_dir`` (hidden from data readers: its name starts
    with ``_``), for outputs too large to build in memory."""
    return join(out_dir, f"_staging-{uuid.uuid4().hex[:12]}")


def remove_stages(out_dir: str) -> None:
    """Delete the staging folders killed writers left under ``out_dir`` (before a retry)."""
    if is_local(out_dir):
        path = local_path(out_dir)
        for stage in sorted(path.glob("_staging-*")) if path.is_dir() else []:
            remove(str(stage))
        return
    fs, path = fsspec.core.url_to_fs(out_dir)
    for stage in fs.glob(join(path, "_staging-*")):
        fs.rm(stage, recursive=True)


@contextlib.contextmanager
def staged_writer(stage: str, name: str):
    """A binary file handle writing ``name`` inside the staging folder ``stage``."""
    uri = join(stage, name)
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            yield fh
        return
    with fsspec.open(uri, "wb") as fh:
        yield fh


def commit(stage: str, out_dir: str, names: dict[str, str]) -> list[str]:
    """Move staged files into ``out_dir`` (staged name -> final name), then drop the stage.

    Each move is atomic (a local rename; on object stores a copy whose PUT appears whole); the
    caller writes its manifest after this, which is what makes the set of files complete.
    """
    moved = []
    for staged, final in names.items():
        src, dst = join(stage, staged), join(out_dir, final)
        if is_local(src):
            target = local_path(dst)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local_path(src), target)
        else:
            fs, path = fsspec.core.url_to_fs(src)
            fs.mv(path, fsspec.core.url_to_fs(dst)[1])
        moved.append(dst)
    remove(stage)
    return moved


def remove(uri: str) -> None:
    """Delete a file or a folder and everything in it; nothing when it does not exist."""
    if is_local(uri):
        import shutil

        path = local_path(uri)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
        return
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ---- advisory locks ---------------------------------------------------------------------------
class LockTimeout(TimeoutError):
    """Another holder kept a lock longer than we were willing to wait."""


@contextlib.contextmanager
def lock(uri: str, timeout: float = 600.0, stale_after: float = 3600.0):
    """Hold an advisory lock named by ``uri`` (under the artifact root) for the ``with`` body.

    Local roots (the compose volume, NFS) use ``flock`` on the file: the kernel releases it when
    the holder dies, so a crashed task never leaves it held. Object stores have no lock
    primitive; there the lock is a lease object (owner token and time) taken over once older
    than ``stale_after`` seconds: best effort, callers must stay correct without it.
    """
    deadline = time.monotonic() + timeout
    if is_local(uri):
        import fcntl

        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as fh:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockTimeout(f"lock {uri} still held after {timeout:g} s") from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return
    token = uuid.uuid4().hex
    while True:
        held = read_json(uri) if exists(uri) else None
        if held is None or time.time() - held["time"] > stale_after:
            write_json(uri, {"token": token, "time": time.time()})
            time.sleep(1.0)  # a concurrent taker's write lands in between: the last one wins
            if read_json(uri).get("token") == token:
                break
        if time.monotonic() > deadline:
            raise LockTimeout(f"lock {uri} still held after {timeout:g} s")
        time.sleep(1.0)
    try:
        yield
    finally:
        if exists(uri) and read_json(uri).get("token") == token:
            fs, path = fsspec.core.url_to_fs(uri)
            fs.rm(path)
