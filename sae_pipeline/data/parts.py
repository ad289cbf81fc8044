"""The train/validation/test parts of a snapshot, streamed from its shards.

For data too large to hold, the split is a pure function of a row's position in the snapshot:
``u = hash(seed, row) / 2**64`` is uniform in [0, 1); a row is test when ``u < test_fraction``,
validation when ``u < test_fraction + val_fraction``, training otherwise. No index array of
every row exists, any reader can tell the part of any row on its own, and the parts are
disjoint and cover every row by construction. Their sizes are binomial around the fractions
(not exact), and there is no stratification by label: that stays on the in-memory path
(``contract.split_indices``), which small data keeps using.

``iter_part`` streams one part's features as float64 chunks, full precision until scaled (row
groups in a seeded order per epoch, so that a shuffling buffer downstream mixes rows from
across the snapshot);
``sample_part`` keeps a fixed-size, seeded sample of one part (the rows of smallest second
hash: a uniform sample without replacement, the same at every call), for the evaluation,
probes and references whose cost must not grow with the data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae_pipeline import storage
from sae_pipeline.data import batches
from sae_pipeline.errors import DataError

PARTS = ("train", "val", "test")
_PART_CODE = {"train": 0, "val": 1, "test": 2}
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose output bits look independent."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_uniform(seed: int, rows: np.ndarray, stream: int = 0) -> np.ndarray:
    """A uniform in [0, 1) per row position, a pure function of (seed, stream, row)."""
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(stream))
        z = _mix(np.asarray(rows, dtype=np.uint64) * _GOLDEN + key)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class HashSplit:
    """The streamed split: which part each row position belongs to."""

    seed: int
    val_fraction: float
    test_fraction: float

    def parts_of(self, rows: np.ndarray) -> np.ndarray:
        """0 (train), 1 (val) or 2 (test) for each row position."""
        u = row_uniform(self.seed, rows)
        out = np.zeros(len(u), dtype=np.int8)
        out[u < self.test_fraction + self.val_fraction] = 1
        out[u < self.test_fraction] = 2
        return out

    def mask(self, part: str, start: int, n: int) -> np.ndarray:
        """Which of rows ``start .. start+n-1`` belong to ``part``."""
        return self.parts_of(np.arange(start, start + n, dtype=np.uint64)) == _PART_CODE[part]

    def counts(self, n_rows: int, chunk: int = 1 << 18) -> dict[str, int]:
        """Rows of each part among ``n_rows`` (no data read: positions only)."""
        total = np.zeros(3, dtype=np.int64)
        for start in range(0, n_rows, chunk):
            rows = np.arange(start, min(n_rows, start + chunk), dtype=np.uint64)
            total += np.bincount(self.parts_of(rows), minlength=3)
        return {p: int(total[_PART_CODE[p]]) for p in PARTS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "hash",
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
        }


# ---- the snapshot's shards --------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One row group of one shard, and the position of its first row in the snapshot."""

    file: str
    group: int
    first_row: int
    rows: int


def units(files: Sequence[str]) -> list[Unit]:
    """Every row group of the snapshot's shards, in snapshot order (metadata only)."""
    out, first = [], 0
    for f in files:
        with batches.open_parquet(f) as pf:
            md = pf.metadata
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                out.append(Unit(f, g, first, n))
                first += n
    return out


def features(rb, columns: Sequence[str]) -> np.ndarray:
    """(rows, features) float64 from an Arrow record batch of validated rows: full precision
    until scaled (a timestamp of 1.7e9 has 128 s between float32 neighbours)."""
    return batches.feature_matrix(rb, columns)


def iter_batches(
    plan: list[Unit],
    columns: Sequence[str],
    split: HashSplit | None,
    part: str,
    chunk_rows: int = 65_536,
    order_seed: int | None = None,
) -> Iterator[tuple[Any, np.ndarray | None]]:
    """(Arrow record batch, positions in it of ``part``'s rows, or None for all of them).

    ``order_seed`` visits the row groups in a seeded random order (one per epoch); None keeps
    snapshot order. ``split`` None means every row is in the part. Batches holding none of
    the part's rows are skipped.
    """
    order = list(range(len(plan)))
    if order_seed is not None:
        np.random.default_rng(order_seed).shuffle(order)
    for i in order:
        u = plan[i]
        start = u.first_row
        for rb in batches.iter_chunks([u.file], columns, chunk_rows, {u.file: [u.group]}):
            keep = None
            if split is not None:
                keep = np.flatnonzero(split.mask(part, start, rb.num_rows))
            start += rb.num_rows
            if keep is None or len(keep):
                yield rb, keep
        if start - u.first_row != u.rows:  # the file changed since the plan was read
            raise DataError(
                f"snapshot file {u.file} changed while it was read: row group {u.group} had "
                f"{u.rows} rows when planned, {start - u.first_row} read"
            )


def iter_part(
    plan: list[Unit],
    columns: Sequence[str],
    split: HashSplit | None,
    part: str,
    chunk_rows: int = 65_536,
    order_seed: int | None = None,
    extra: Sequence[str] = (),
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(float64 features, {extra column: values}) of ``part``'s rows, chunk by chunk, in the
    order of ``iter_batches``."""
    for rb, keep in iter_batches(plan, [*columns, *extra], split, part, chunk_rows, order_seed):
        x = features(rb, columns)
        cols = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in extra}
        if keep is not None:
            x = x[keep]
            cols = {c: v[keep] for c, v in cols.items()}
        yield x, cols


def sample_part(
    plan: list[Unit],
    columns: Sequence[str],
    split: HashSplit | None,
    part: str,
    n: int,
    seed: int,
    extra: Sequence[str] = (),
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A seeded uniform sample of at most ``n`` rows of ``part``, in snapshot order.

    Keeps the rows of smallest ``row_uniform(seed, row, stream=1)``: memory is O(n), and the
    sample is the same at every call and on every worker. Row groups none of whose keys could
    enter the sample are not read.
    """
    xs: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    cols: dict[str, list[np.ndarray]] = {c: [] for c in extra}
    bound = np.inf  # the n-th smallest key held so far
    for u in plan:
        key = row_uniform(seed, np.arange(u.first_row, u.first_row + u.rows, dtype=np.uint64), 1)
        if split is not None:
            key[~split.mask(part, u.first_row, u.rows)] = np.inf
        if not (key < bound).any():
            continue
        for rb in batches.iter_chunks([u.file], [*columns, *extra], 65_536, {u.file: [u.group]}):
            k, key = key[: rb.num_rows], key[rb.num_rows :]
            take = k < bound
            xs.append(features(rb, columns)[take])
            keys.append(k[take])
            for c in extra:
                cols[c].append(rb.column(c).to_numpy(zero_copy_only=False)[take])
        if sum(len(k) for k in keys) > 2 * n:  # keep memory O(n): only the n smallest
            xs, keys, cols = _smallest(xs, keys, cols, n)
            bound = keys[0].max()
    if not xs:
        return np.zeros((0, len(columns))), {c: np.zeros(0) for c in extra}
    xs, keys, cols = _smallest(xs, keys, cols, n)
    return xs[0], {c: v[0] for c, v in cols.items()}


def sample_positions(n_rows: int, n: int, seed: int, chunk: int = 1 << 18) -> np.ndarray:
    """The positions of a seeded uniform sample of ``n`` of ``n_rows`` rows, sorted.

    The rows of smallest ``row_uniform(seed, row, stream=1)``, as ``sample_part`` keeps them;
    found from positions alone (no data read), in O(n + chunk) memory.
    """
    best = np.zeros(0, dtype=np.int64)
    best_keys = np.zeros(0)
    for start in range(0, n_rows, chunk):
        rows = np.arange(start, min(n_rows, start + chunk), dtype=np.int64)
        keys = row_uniform(seed, rows.astype(np.uint64), 1)
        rows, keys = np.concatenate([best, rows]), np.concatenate([best_keys, keys])
        if len(keys) > n:
            keep = np.argpartition(keys, n - 1)[:n]
            rows, keys = rows[keep], keys[keep]
        best, best_keys = rows, keys
    return np.sort(best)


def read_positions(plan: list[Unit], columns: Sequence[str], positions: np.ndarray) -> np.ndarray:
    """(len(positions), features) float64 of the rows at sorted ``positions``, reading only the
    row groups that hold them."""
    out = np.empty((len(positions), len(columns)), dtype=np.float64)
    for u in plan:
        lo, hi = np.searchsorted(positions, [u.first_row, u.first_row + u.rows])
        if lo == hi:
            continue
        start = u.first_row
        for rb in batches.iter_chunks([u.file], columns, 65_536, {u.file: [u.group]}):
            a, b = np.searchsorted(positions, [start, start + rb.num_rows])
            if b > a:
                out[a:b] = batches.feature_matrix(rb, columns)[positions[a:b] - start]
            start += rb.num_rows
    return out


def _smallest(xs, keys, cols, n):
    """The ``n`` rows of smallest key, in the order they were appended (snapshot order)."""
    x, k = np.concatenate(xs), np.concatenate(keys)
    c = {name: np.concatenate(v) for name, v in cols.items()}
    if len(k) > n:
        keep = np.sort(np.argpartition(k, n - 1)[:n])
        x, k, c = x[keep], k[keep], {name: v[keep] for name, v in c.items()}
    return [x], [k], {name: [v] for name, v in c.items()}


def snapshot_files(snapshot_dir: str, manifest: dict[str, Any]) -> list[str]:
    """The shard URIs of a snapshot folder, in order."""
    files = manifest.get("snapshot_files") or [manifest["snapshot"]]
    return [f if f.startswith("/") or "://" in f else storage.join(snapshot_dir, f) for f in files]
