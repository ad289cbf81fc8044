"""Which files under a data folder are data.

A path with any component starting with ``_`` or ``.`` is not: Spark's ``_temporary/`` task
output and ``_SUCCESS`` marker, ``.crc`` checksums, the hidden ``.part-*`` files of a write in
progress. Every reader of a folder (sources and batches, local and fsspec) asks here.
"""

from __future__ import annotations

from collections.abc import Sequence


def is_hidden(relative: str) -> bool:
    """Whether a path relative to a data folder is hidden (a component starts with _ or .)."""
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def data_files(fs, root: str, suffixes: Sequence[str]) -> list[str]:
    """The files under ``root`` of an fsspec filesystem with one of ``suffixes``, not hidden,
    sorted by path."""
    base = root.rstrip("/") + "/"
    return sorted(
        p
        for p in fs.find(root)
        if p.endswith(tuple(suffixes)) and not is_hidden(p.removeprefix(base))
    )


def file_stamp(fs, path: str) -> tuple:
    """What changes when a file is rewritten: its size, modification time and, on object
    stores, its ETag or checksum."""
    try:
        info = fs.info(path)
    except OSError:
        return (None,)
    keys = ("size", "mtime", "LastModified", "last_modified", "ETag", "etag", "md5Hash", "crc32c")
    return tuple(str(info.get(k)) for k in keys)
