"""The trust boundary for locations and secrets: what a run may point at, parsed once.

Every place a trigger, a request or a flag names (artifact root, config file, data source, batch
files, output folder) comes through ``check_location`` before it is used. It is parsed with
fsspec's rules (protocol, then path), normalised once (local paths made absolute with ``..`` and
symlinks resolved; URL paths with ``.``/``..`` folded, encoded separators refused), compared with
the operator's allow-list entries of the same protocol by whole path segments, and only the
normalised value is handed on. Chained URLs (``a::b``) and passwords in URLs are refused
whatever the lists say. Unset lists allow any location (the embedded demo).

Secrets: ``find_secret`` names a password in a URL (userinfo or query key); ``mask_secrets``
hides them wherever text holding URLs is recorded (params, stored config, errors).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple
from urllib.parse import parse_qsl

from sae_pipeline.errors import ConfigError

ARTIFACT_ROOTS = "SAE_ALLOWED_ARTIFACT_ROOTS"
CONFIG_DIRS = "SAE_ALLOWED_CONFIG_DIRS"
DATA_SOURCES = "SAE_ALLOWED_DATA_SOURCES"

LOCAL = "file"
SQL_SCHEMES = {"postgresql", "postgres", "mysql", "sqlite", "mssql", "oracle", "mariadb"}
_ALIASES = {"local": LOCAL, "postgres": "postgresql"}
_PROTOCOL = re.compile(r"[a-z][a-z0-9+.-]*\Z")
# Escapes a server could decode into a separator, a dot segment, another escape or a control.
_RISKY_ESCAPE = re.compile(r"%(?:2e|2f|5c|25|[01][0-9a-f]|7f)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Location(NamedTuple):
    """A normalised location: ``uri`` is what is used; ``protocol`` and ``key`` are compared."""

    protocol: str
    key: tuple[str, ...]  # path segments (a URL's first one is its host, lower-cased)
    uri: str


# ---- secrets ----------------------------------------------------------------------------------
_SECRET_KEYS = {"pass", "passwd", "pwd", "sig", "auth", "apikey", "api_key", "key"}
_SECRET_PARTS = ("password", "secret", "token", "signature", "credential", "private")
# ``scheme://user:`` then everything up to the *last* ``@`` of the token: a password holding
# ``@`` or ``/`` is hidden whole, never split where a parser would split it.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*:)[^\s'\"]*@")
_QUERY_VALUE = re.compile(r"(?P<key>[?&;][^=&#\s'\"]+)=(?P<value>[^&#\s'\"]*)")


def is_secret_key(key: str) -> bool:
    """Whether a URL query key carries a secret (``password``, ``token``, ``X-Amz-Signature``)."""
    k = key.strip().lower().removeprefix("x-amz-").removeprefix("x-goog-").removeprefix("x-ms-")
    return k in _SECRET_KEYS or any(part in k for part in _SECRET_PARTS)


def find_secret(url: str) -> str | None:
    """Where ``url`` holds a secret ("a password", "the query key 'token'"), else None."""
    if _USERINFO.search(url):
        return "a password"
    _, _, query = url.partition("?")
    for key, _value in parse_qsl(query.partition("#")[0], keep_blank_values=True):
        if is_secret_key(key):
            return f"the query key {key!r}"
    return None


def mask_secrets(text: str) -> str:
    """``text`` with every URL password and secret query value shown as ``***``."""
    text = _USERINFO.sub(r"\g<head>***@", text)
    return _QUERY_VALUE.sub(
        lambda m: f"{m['key']}=***" if is_secret_key(m["key"][1:]) else m[0], text
    )


# ---- parsing ----------------------------------------------------------------------------------
def _refuse(what: str, raw: str, why: str) -> ConfigError:
    return ConfigError(f"{what} {mask_secrets(raw)!r} is refused: {why}")


def parse_location(raw: str, what: str = "location") -> Location:
    """Parse and normalise one location; ConfigError naming it when it cannot be trusted."""
    from fsspec.core import split_protocol

    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{what} must be a non-empty path or URL, got {raw!r}")
    raw = raw.strip()
    if _CONTROL.search(raw):
        raise _refuse(what, raw, "it holds a control character")
    if "::" in raw:
        raise _refuse(what, raw, "chained URLs (a::b) are not accepted; name one location")
    secret = find_secret(raw)
    if secret:
        raise _refuse(
            what,
            raw,
            f"it holds {secret}, which would be stored with the run; write it without and give "
            "the secret through the environment (data.source_password_env for a database)",
        )
    protocol, path = split_protocol(raw)
    if protocol is None:
        return _local(raw)
    protocol = _ALIASES.get(protocol.lower(), protocol.lower())
    if not _PROTOCOL.match(protocol):  # ``/srv/x://``: not a URL, and no path either
        raise _refuse(what, raw, f"{protocol!r} is not a protocol name")
    if protocol == LOCAL:
        from fsspec.implementations.local import LocalFileSystem

        return _local(LocalFileSystem._strip_protocol(f"file://{path}"))
    if protocol.split("+")[0] in SQL_SCHEMES:
        return _sql(raw, what)
    return _url(protocol, path, raw, what)


def _segments(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s)


def _local(path: str) -> Location:
    real = os.path.realpath(path)  # absolute, ``..`` and symlinks resolved
    return Location(LOCAL, _segments(real), real)


def _url(protocol: str, path: str, raw: str, what: str) -> Location:
    if "#" in path or "\\" in path:
        raise _refuse(what, raw, "a fragment (#) or backslash has no place in a location")
    if _RISKY_ESCAPE.search(path):
        raise _refuse(what, raw, "percent-encoded dots, separators or escapes are not accepted")
    path, sep, query = path.partition("?")
    parts: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if len(parts) <= 1:  # would climb above the host (or bucket)
                raise _refuse(what, raw, "'..' climbs above the URL's host")
            parts.pop()
            continue
        parts.append(seg)
    uri = f"{protocol}://{'/'.join(parts)}" + (sep + query if query else "")
    key = list(parts)
    if key:  # compare the host, not who logs in: user@host and host are the same place
        key[0] = key[0].rpartition("@")[2]
        if protocol in ("http", "https", "ftp", "sftp", "ssh", "webdav"):
            key[0] = key[0].lower()
    return Location(protocol, tuple(key), uri)


def _sql(raw: str, what: str) -> Location:
    import sqlalchemy

    try:
        url = sqlalchemy.make_url(raw)
    except Exception:  # any parse error is a refusal naming the value
        raise _refuse(what, raw, "it is not a database URL SQLAlchemy can parse") from None
    if url.password is not None or "@" in (url.host or ""):
        shown = url.render_as_string(hide_password=True)  # a quote or space defeats the regex
        raise ConfigError(
            f"{what} {shown!r} is refused: it holds a password; "
            "set data.source_password_env instead"
        )
    for key in url.query:
        if is_secret_key(key):
            raise _refuse(what, raw, f"it holds a secret in the query key {key!r}")
    protocol = url.drivername.split("+")[0].lower()
    protocol = _ALIASES.get(protocol, protocol)
    if protocol == "sqlite":
        db = url.database
        if db and db != ":memory:" and not db.startswith("file:"):
            url = url.set(database=os.path.realpath(db))
        key = _segments(url.database or "")
    else:
        host = (url.host or "").lower() + (f":{url.port}" if url.port else "")
        key = (host, url.database) if url.database else (host,)  # a name, not a path
    return Location(protocol, key, url.render_as_string(hide_password=False))


# ---- allow-lists ------------------------------------------------------------------------------
def allow_list(env: str) -> list[Location] | None:
    """The entries of the comma-separated list ``$env``; None when it is unset (allow all).

    An entry is a root (an absolute path or a URL: it and everything under it) or a protocol
    written ``name://`` (``sklearn://``, ``s3://``: everything of that protocol).
    """
    raw = [v.strip() for v in os.environ.get(env, "").split(",") if v.strip()]
    if not raw:
        return None
    entries = []
    for entry in raw:
        name = entry.removesuffix("://").lower()
        if entry.endswith("://") and _PROTOCOL.match(name):
            entries.append(Location(_ALIASES.get(name, name), (), entry))
        else:
            entries.append(parse_location(entry, f"{env} entry"))
    return entries


def is_under(loc: Location, root: Location) -> bool:
    """Same protocol, and ``root``'s path segments begin ``loc``'s."""
    return loc.protocol == root.protocol and loc.key[: len(root.key)] == root.key


def check_location(raw: str, env: str, what: str) -> str:
    """The normalised ``raw``, once it lies under an entry of ``$env`` (any, when unset)."""
    loc = parse_location(raw, what)
    entries = allow_list(env)
    if entries is not None and not any(is_under(loc, e) for e in entries):
        raise ConfigError(
            f"{what} {mask_secrets(raw)!r} is outside the allowed locations "
            f"({', '.join(mask_secrets(e.uri) for e in entries)}; {env})"
        )
    return loc.uri


def artifact_location(raw: str, what: str = "artifacts_root") -> str:
    """A place the pipeline writes to: under ``$SAE_ALLOWED_ARTIFACT_ROOTS``."""
    return check_location(raw, ARTIFACT_ROOTS, what)


def config_location(raw: str, what: str = "config_path") -> str:
    """A YAML file the pipeline reads settings from: under ``$SAE_ALLOWED_CONFIG_DIRS``."""
    return check_location(raw, CONFIG_DIRS, what)


def data_location(raw: str, what: str = "data_source") -> str:
    """A data source or batch the pipeline reads: under ``$SAE_ALLOWED_DATA_SOURCES``."""
    return check_location(raw, DATA_SOURCES, what)
