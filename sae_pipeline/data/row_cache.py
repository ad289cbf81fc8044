"""One part of a snapshot as row-major float32 files: what the streaming trainer reads.

The snapshot is columnar Parquet and holds every part's rows; a streamed training run reads
its training part many times (each layer, each epoch). Read from the snapshot, every epoch
decodes the Parquet pages, transposes the columns into rows and drops the validation and test
rows it read. ``write`` stores the part once, scaled (in float64, by the fitted scaler, then
rounded to float32: what serving computes), as raw float32 files of about ``file_rows`` rows
each (row-major, native byte order) plus an ``index.json`` naming them and their row counts;
``RowCache.read_into`` then reads a file straight into the shuffling buffer's rows, one
``readinto`` with no decoding, no transpose and no scaling.

    cache = row_cache.write(out_dir, chunks, features, scaler=scaler)  # fit_scaler, once
    cache = row_cache.RowCache.open(out_dir)                            # each layer task
    for name, start, rows in cache.slices_in_order(order_seed, 16_384): ...

The files are written to a staging folder and moved into place together; ``index.json`` is
written last and names the files of the cache, so a reader finds a complete cache or none. A
new attempt first removes what a killed one left: its staging folders, its files and index.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from sae_pipeline import storage

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "row-major-float32/1"


@dataclass(frozen=True)
class RowCache:
    """A written cache: its folder, width and files as (name, rows)."""

    uri: str
    features: int
    files: tuple[tuple[str, int], ...]
    scaled: bool = False  # rows scaled when written (older caches hold them unscaled)

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.files)

    @classmethod
    def open(cls, uri: str) -> RowCache | None:
        """The cache in ``uri``, or None when there is none (older runs, killed writers)."""
        index_uri = storage.join(uri, INDEX)
        if not storage.exists(index_uri):
            return None
        index = storage.read_json(index_uri)
        if index.get("format") != FORMAT or index.get("byteorder") != sys.byteorder:
            return None
        files = tuple((f["name"], int(f["rows"])) for f in index["files"])
        return cls(uri, int(index["features"]), files, bool(index.get("scaled", False)))

    def slices_in_order(self, order_seed: int, slice_rows: int) -> list[tuple[str, int, int]]:
        """(file, first row, rows) of every ``slice_rows``-row slice of every file, in a seeded
        random order (one per epoch): a shuffling buffer of a few files' size then mixes rows
        from many places of the part, not from a few runs of neighbouring rows."""
        pieces = [
            (name, start, min(slice_rows, n - start))
            for name, n in self.files
            for start in range(0, n, slice_rows)
        ]
        order = np.random.default_rng(order_seed).permutation(len(pieces))
        return [pieces[i] for i in order]

    def iter_chunks(self):
        """The rows file by file, in written order (float32 arrays)."""
        for name, n in self.files:
            out = np.empty((n, self.features), dtype=np.float32)
            self.read_into(name, out)
            yield out

    def read_into(self, name: str, out: np.ndarray, start: int = 0) -> None:
        """Fill ``out`` (rows x features float32, C-contiguous) with the rows of file ``name``
        from row ``start`` on."""
        uri = storage.join(self.uri, name)
        if storage.is_local(uri):
            with open(storage.local_path(uri), "rb", buffering=0) as fh:
                fh.seek(start * self.features * 4)
                view = memoryview(out.reshape(-1)).cast("B")
                got = 0
                while got < len(view):
                    n = fh.readinto(view[got:])
                    if not n:
                        break
                    got += n
            if got != len(view):
                raise OSError(f"row cache file {uri} is short: {got} of {len(view)} bytes")
            return
        rows = np.frombuffer(storage.read_bytes(uri), dtype=np.float32).reshape(-1, self.features)
        if start + len(out) > len(rows):
            need = start + len(out)
            raise OSError(f"row cache file {uri} is short: {len(rows)} rows, not {need}")
        out[...] = rows[start : start + len(out)]


def write(
    out_dir: str,
    chunks: Iterable[np.ndarray],
    features: int,
    file_rows: int = 65_536,
    *,
    scaler=None,
) -> RowCache:
    """Store ``chunks`` (float64 rows, any sizes), scaled by ``scaler`` when given (in float64,
    then float32), as files of ``file_rows`` rows (the last shorter) under ``out_dir``;
    remove first whatever a killed attempt left there."""
    from sae_pipeline.data.scaling import apply_scaler

    _clear(out_dir)
    stage = storage.new_stage(out_dir)
    buf = np.empty((file_rows, features), dtype=np.float32)
    held, files, names = 0, [], {}

    def flush() -> None:
        nonlocal held
        name = f"rows-{len(files):05d}.f32"
        with storage.staged_writer(stage, name) as fh:
            fh.write(memoryview(buf[:held].reshape(-1)).cast("B"))
        files.append({"name": name, "rows": held})
        names[name] = name
        held = 0

    try:
        for x in chunks:
            x = np.asarray(x).reshape(-1, features)
            x = apply_scaler(scaler, x) if scaler is not None else x.astype(np.float32)
            start = 0
            while start < len(x):
                n = min(file_rows - held, len(x) - start)
                buf[held : held + n] = x[start : start + n]
                held, start = held + n, start + n
                if held == file_rows:
                    flush()
        if held:
            flush()
        storage.commit(stage, out_dir, names)
    except BaseException:
        storage.remove(stage)
        raise
    index = {
        "format": FORMAT,
        "byteorder": sys.byteorder,
        "features": features,
        "scaled": scaler is not None,
        "files": files,
    }
    storage.write_json(storage.join(out_dir, INDEX), index)
    cache = RowCache(
        out_dir, features, tuple((f["name"], f["rows"]) for f in files), scaler is not None
    )
    log.info(
        "row cache: %d rows x %d features in %d files under %s",
        cache.rows, features, len(files), out_dir,
    )  # fmt: skip
    return cache


def _clear(out_dir: str) -> None:
    """Remove an earlier attempt's cache: its index first (no reader takes the folder for a
    cache from then on), its staging folders, and its row files."""
    storage.remove(storage.join(out_dir, INDEX))
    storage.remove_stages(out_dir)
    if storage.is_local(out_dir):
        folder = storage.local_path(out_dir)
        for f in sorted(folder.glob("rows-*.f32")) if folder.is_dir() else []:
            f.unlink(missing_ok=True)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(out_dir)
    for f in fs.glob(storage.join(path, "rows-*.f32")):
        fs.rm(f)
