"""The training part as row-major float32 files: written whole or not at all, read back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from sae_pipeline import storage
from sae_pipeline.data import row_cache


def _chunks(rng, sizes, features=5):
    return [rng.normal(size=(n, features)).astype(np.float32) for n in sizes]


def test_rows_come_back_in_order_in_files_of_the_set_size(tmp_path):
    chunks = _chunks(np.random.default_rng(0), [7, 30, 1, 12])  # 50 rows, ragged chunks
    cache = row_cache.write(str(tmp_path / "c"), chunks, 5, file_rows=16)
    assert [n for _, n in cache.files] == [16, 16, 16, 2]
    opened = row_cache.RowCache.open(str(tmp_path / "c"))
    assert opened == cache and opened.rows == 50
    np.testing.assert_array_equal(np.concatenate(list(opened.iter_chunks())), np.vstack(chunks))
    name, n = opened.files[1]
    out = np.empty((n, 5), np.float32)
    opened.read_into(name, out)
    np.testing.assert_array_equal(out, np.vstack(chunks)[16:32])


def test_slices_cover_every_row_once_in_an_order_set_by_the_seed(tmp_path):
    chunks = _chunks(np.random.default_rng(0), [50])
    cache = row_cache.write(str(tmp_path / "c"), chunks, 5, file_rows=16)  # 16, 16, 16, 2
    pieces = cache.slices_in_order(3, 6)
    assert pieces == cache.slices_in_order(3, 6) and pieces != cache.slices_in_order(4, 6)
    assert sorted(n for _, _, n in pieces) == [2] + [4] * 3 + [6] * 6
    rows = []
    for name, start, n in pieces:
        out = np.empty((n, 5), np.float32)
        cache.read_into(name, out, start)
        rows.append(out)
    got = np.concatenate(rows)
    np.testing.assert_array_equal(got[np.lexsort(got.T)], chunks[0][np.lexsort(chunks[0].T)])


def test_a_killed_writer_leaves_no_cache_and_the_next_one_replaces_it(tmp_path):
    out = str(tmp_path / "c")
    good = _chunks(np.random.default_rng(1), [10, 10])

    def dies():
        yield good[0]
        raise KeyboardInterrupt  # the worker is killed mid-write

    with pytest.raises(KeyboardInterrupt):
        row_cache.write(out, dies(), 5, file_rows=4)
    assert row_cache.RowCache.open(out) is None
    assert not list((tmp_path / "c").iterdir())  # the staging folder is gone too
    cache = row_cache.write(out, good, 5, file_rows=4)
    np.testing.assert_array_equal(np.concatenate(list(cache.iter_chunks())), np.vstack(good))


def test_a_short_file_is_a_clear_error(tmp_path):
    cache = row_cache.write(str(tmp_path / "c"), _chunks(np.random.default_rng(2), [8]), 5, 8)
    name, n = cache.files[0]
    path = storage.local_path(storage.join(cache.uri, name))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(OSError, match="is short"):
        cache.read_into(name, np.empty((n, 5), np.float32))


def test_a_rebuild_removes_what_a_killed_writer_left(tmp_path):
    """A killed writer's _staging-* folder of partial .f32 files, and files of an earlier
    attempt that the new index does not name, do not survive the rebuild (issue 28 item 8)."""
    out = tmp_path / "c"
    (out / "_staging-0123456789ab").mkdir(parents=True)
    (out / "_staging-0123456789ab" / "rows-00000.f32").write_bytes(b"\0" * 40)
    (out / "rows-00009.f32").write_bytes(b"\0" * 40)
    cache = row_cache.write(str(out), _chunks(np.random.default_rng(3), [7]), 5, 4)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([row_cache.INDEX, *(name for name, _ in cache.files)])
