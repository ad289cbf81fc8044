"""The trust boundary (sae_pipeline/boundary.py): parsing, allow-lists, secrets; a property test.

Issue 22 items 1-3: whatever the boundary accepts lies under an allowed root of the same
protocol, and what it hands on is the normalised value.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import unquote

import pytest
import sqlalchemy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_pipeline import boundary, storage
from sae_pipeline.boundary import check_location, find_secret, mask_secrets, parse_location
from sae_pipeline.errors import ConfigError

ENV = "SAE_TEST_ALLOWED_LOCATIONS"
REMOTE_ROOTS = {  # protocol -> the allowed root's path segments
    "memory": ("bucket", "root"),
    "s3": ("bucket", "data"),
    "http": ("h", "allowed"),
    "postgresql": ("db:5432",),
}


# ---- parsing and normalising ------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        "/srv/allowed/../outside/victim.csv::memory://y",  # item 1: a chain
        "/etc/passwd::x.csv",  # item 2: a chain that defeats the suffix guess
        "simplecache::s3://bucket/data/x",
        "/srv/allowed/x://",  # item 1: the trailing :// once turned into a local "x:"
        "relative/x://y",
        "http://h/allowed/%2e%2e/secret",
        "http://h/allowed/%252e%252e/secret",
        "http://h/allowed/a%2Fb",
        "http://h/allowed\\..\\x",
        "http://h/allowed#frag",
        "s3://bucket/../other",
        "memory://x\n/y",
        "",
        "   ",
        "postgresql://u:p@ss@db/x",  # item 3
        "postgresql://etl@host:5432/sales?password=hunter2",  # item 3
        "https://h/x.csv?X-Amz-Signature=abc",
        "https://h/x.csv?x-amz-signature=abc",
        "https://h/x.csv?sig=abc",
        "https://h/x.csv?access_token=abc",
        "https://u:pw@h/x.csv",
    ],
)
def test_unsafe_locations_are_refused_with_one_line_naming_them(raw):
    with pytest.raises(ConfigError) as err:
        parse_location(raw, "data_source")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data_source")
    for secret in ("hunter2", "p@ss", "ss@db", "abc'", "pw@"):
        assert secret not in msg


def test_locations_are_normalised_once_and_the_normalised_value_handed_on(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real = str((tmp_path / "real").resolve())
    assert parse_location(str(tmp_path / "link" / "a" / ".." / "b")).uri == f"{real}/b"
    assert parse_location(f"file://{tmp_path}/link/b").uri == f"{real}/b"
    assert parse_location("memory:///x//y/./z/../w/").uri == "memory://x/y/w"
    assert parse_location("S3://bucket/k/").uri == "s3://bucket/k"
    loc = parse_location("http://User@H:8080/a/../b?x=1")
    assert (loc.protocol, loc.key, loc.uri) == ("http", ("h:8080", "b"), "http://User@H:8080/b?x=1")
    assert parse_location("sklearn://digits").uri == "sklearn://digits"
    sql = parse_location("postgresql+psycopg://etl@DB:5432/sales?sslmode=require")
    assert (sql.protocol, sql.key) == ("postgresql", ("db:5432", "sales"))
    assert parse_location("postgres://etl@db/x").protocol == "postgresql"
    assert parse_location("sqlite:///rel.db").uri == f"sqlite:///{os.path.realpath('rel.db')}"
    # storage no longer strips a URL down to "x:" (item 1)
    assert storage.normalize_root("memory://x/") == "memory://x"
    assert storage.normalize_root("/srv/a/x://") == "/srv/a/x://"


def test_allow_lists_compare_protocol_and_whole_path_segments(monkeypatch, tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (tmp_path / "allowed-evil").mkdir()
    (allowed / "out").symlink_to(tmp_path)
    monkeypatch.setenv(ENV, f"{allowed},s3://bucket/data,sklearn://,postgresql://db:5432")
    ok = {
        str(allowed / "sub" / "x.csv"): str(allowed.resolve() / "sub" / "x.csv"),
        f"file://{allowed}/x": str(allowed.resolve() / "x"),
        "s3://bucket/data/a/../b": "s3://bucket/data/b",
        "sklearn://wine": "sklearn://wine",
        "postgresql+psycopg://etl@DB:5432/w": "postgresql+psycopg://etl@DB:5432/w",
    }
    for raw, want in ok.items():
        assert check_location(raw, ENV, "data_source") == want
    refused = [
        str(tmp_path / "allowed-evil" / "x"),  # a string prefix, not a segment prefix
        str(allowed / ".." / "x"),
        str(allowed / "out" / "x"),  # a symlink out of the root
        "s3://bucket/database/x",
        "s3://bucket/data/../x",
        "memory://bucket/data/x",  # the same path under another protocol
        "gs://bucket/data/x",
        "postgresql://etl@db:5433/w",
        "mysql://etl@db:5432/w",
        "http://127.0.0.1:8000/metadata.csv",
    ]
    for raw in refused:
        with pytest.raises(ConfigError, match=f"outside the allowed locations.*{ENV}"):
            check_location(raw, ENV, "data_source")
    monkeypatch.delenv(ENV)  # unset: the embedded demo allows any location...
    assert check_location("gs://bucket/x", ENV, "data_source") == "gs://bucket/x"
    with pytest.raises(ConfigError, match="chained"):  # ...but never a chain or a secret
        check_location("/etc/passwd::x.csv", ENV, "data_source")


# ---- secrets ----------------------------------------------------------------------------------
def test_secrets_are_found_and_masked_whole():
    assert mask_secrets("postgresql://u:p@ss@db/x") == "postgresql://u:***@db/x"  # item 3
    assert mask_secrets("postgresql://u:p/ss@db/x") == "postgresql://u:***@db/x"
    assert mask_secrets("see https://u:p@h/a.csv and s3://b/k") == (
        "see https://u:***@h/a.csv and s3://b/k"
    )
    masked = mask_secrets("postgresql://etl@host:5432/sales?sslmode=require&PassWord=hunter2")
    assert masked == "postgresql://etl@host:5432/sales?sslmode=require&PassWord=***"
    assert "abc" not in mask_secrets("'https://h/x?X-Amz-Signature=abc&X-Amz-Date=1'")
    assert mask_secrets("https://h/x?page=2") == "https://h/x?page=2"
    assert find_secret("postgresql://etl@host/sales?password=x") == "the query key 'password'"
    assert find_secret("https://h/x?token=") == "the query key 'token'"
    assert find_secret("postgresql://etl@db/x") is None
    assert find_secret("http://user@host/path:x@y") is None


# ---- the property -----------------------------------------------------------------------------
SEGMENTS = st.sampled_from(
    ["allowed", "allowed-evil", "outside", "sub", "..", ".", "", "link-out", "link-in",
     "%2e%2e", "%2F", "%252e", "a%20b", "x::memory://y", "a://", "a:", "bucket", "root",
     "data", "h", "H", "x.csv", "~", "\\..", "?q=1", "#f", "@h"]
)  # fmt: skip
PREFIXES = st.sampled_from(
    ["{tmp}/", "{tmp}/allowed/", "file://{tmp}/", "file://{tmp}/allowed/", "local://{tmp}/",
     "", "./", "memory://", "memory:///", "memory://bucket/root/", "s3://", "s3://bucket/data/",
     "S3://bucket/data/", "gs://bucket/data/", "http://h/allowed/", "http://H/allowed/",
     "https://h/allowed/", "http://u@h/allowed/", "ftp://h/allowed/", "data:", "sklearn://",
     "simplecache::s3://bucket/data/", "{tmp}/allowed/x::", "postgresql://etl@DB:5432/",
     "postgresql+psycopg://etl@db:5432/", "postgresql://u:p@db:5432/", "mysql://etl@db:5432/",
     "sqlite:///{tmp}/allowed/"]
)  # fmt: skip
SUFFIXES = st.sampled_from(["", "/", "://", "?v=1", "::", "/.."])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """allowed/ (with sub/, a link out and a link in), allowed-evil/, outside/."""
    tmp = tmp_path_factory.mktemp("tree")
    allowed = tmp / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (tmp / "allowed-evil").mkdir()
    (tmp / "outside").mkdir()
    (allowed / "link-out").symlink_to(tmp / "outside")
    (allowed / "link-in").symlink_to(allowed / "sub")
    (tmp / "link-to-allowed").symlink_to(allowed)
    return tmp


def _under_remote(uri: str) -> bool:
    """An independent check of an accepted URL: a known protocol, no dot segments, no escapes,
    and the allowed root's segments begin its path."""
    protocol, _, rest = uri.partition("://")
    path = rest.partition("?")[0]
    segments = path.split("/")
    assert "" not in segments[1:] and "." not in segments and ".." not in segments, uri
    assert posixpath.normpath(path) == path, uri
    assert "::" not in uri and "\\" not in uri, uri
    for seg in segments:  # what a server decodes is no separator and no dot segment either
        decoded = unquote(unquote(seg))
        assert decoded not in (".", "..") and "/" not in decoded and "\\" not in decoded, uri
    segments[0] = segments[0].rpartition("@")[2].lower()
    root = REMOTE_ROOTS[protocol]
    return tuple(segments[: len(root)]) == root


@settings(
    max_examples=2500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(PREFIXES, st.lists(SEGMENTS, max_size=6), SUFFIXES, st.booleans())
def test_whatever_the_boundary_accepts_lies_under_an_allowed_root(
    tree, monkeypatch, prefix, segments, suffix, via_link
):
    allowed = tree / ("link-to-allowed" if via_link else "allowed")
    entries = [str(allowed)] + [f"{p}://{'/'.join(r)}" for p, r in REMOTE_ROOTS.items()]
    monkeypatch.setenv(ENV, ",".join(entries))
    raw = prefix.format(tmp=tree) + "/".join(segments) + suffix
    try:
        got = check_location(raw, ENV, "location")
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert check_location(got, ENV, "location") == got  # normalised once: a fixed point
    loc = parse_location(got)
    if loc.protocol == boundary.LOCAL:
        assert got == os.path.realpath(got)  # absolute, no "..", no symlink left
        assert Path(got).is_relative_to((tree / "allowed").resolve()), raw
    elif loc.protocol == "postgresql":
        url = sqlalchemy.make_url(got)
        assert (url.host.lower(), url.port, url.password) == ("db", 5432, None), raw
    else:
        assert got.startswith(f"{loc.protocol}://") and _under_remote(got), raw


# ---- exact messages, cases and keys (mutation testing: each line below kills a mutant) -------
def _refusal(raw: str, what: str = "data_source") -> str:
    with pytest.raises(ConfigError) as err:
        parse_location(raw, what)
    return str(err.value)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("memory://x\ty", "data_source 'memory://x\\ty' is refused: it holds a control character"),
        ("a::b", "data_source 'a::b' is refused: chained URLs (a::b) are not accepted; name one "
         "location"),
        ("https://h/x?token=t", "data_source 'https://h/x?token=***' is refused: it holds the "
         "query key 'token', which would be stored with the run; write it without and give the "
         "secret through the environment (data.source_password_env for a database)"),
        ("/srv/x://", "data_source '/srv/x://' is refused: '/srv/x' is not a protocol name"),
        ("http://h/a#f", "data_source 'http://h/a#f' is refused: a fragment (#) or backslash has "
         "no place in a location"),
        ("http://h/a%2fb", "data_source 'http://h/a%2fb' is refused: percent-encoded dots, "
         "separators or escapes are not accepted"),
        ("s3://b/..", "data_source 's3://b/..' is refused: '..' climbs above the URL's host"),
        ("postgresql://db:notaport/x", "data_source 'postgresql://db:notaport/x' is refused: it "
         "is not a database URL SQLAlchemy can parse"),
        ("postgresql://u:p'w@db/x", "data_source 'postgresql://u:***@db/x' is refused: it holds "
         "a password; set data.source_password_env instead"),  # the regex stops at the quote
        ("postgresql://u:p w@db/x", "data_source 'postgresql://u:***@db/x' is refused: it holds "
         "a password; set data.source_password_env instead"),
    ],
)  # fmt: skip
def test_each_refusal_is_one_exact_line_naming_the_value_and_the_reason(raw, want):
    assert _refusal(raw) == want


def test_an_empty_location_and_a_sql_query_secret_name_the_field_and_key(monkeypatch):
    assert _refusal("  ", "batch") == "batch must be a non-empty path or URL, got '  '"
    with pytest.raises(ConfigError) as err:
        parse_location(None, "batch")  # type: ignore[arg-type]
    assert str(err.value) == "batch must be a non-empty path or URL, got None"
    monkeypatch.setattr(boundary, "find_secret", lambda url: None)  # reach the SQL check itself
    assert _refusal("postgresql://db/x?sslmode=a&Api_Key=k") == (
        "data_source 'postgresql://db/x?sslmode=a&Api_Key=***' is refused: it holds a secret in "
        "the query key 'Api_Key'"
    )
    assert _refusal("postgresql://u:pw@db/x") == (
        "data_source 'postgresql://u:***@db/x' is refused: it holds a password; set "
        "data.source_password_env instead"
    )


def test_outside_the_allow_list_is_one_line_listing_the_masked_entries(monkeypatch):
    monkeypatch.setenv(ENV, "s3://b/data, sklearn://")
    with pytest.raises(ConfigError) as err:
        check_location("gs://b/data/x?q=1", ENV, "batch")
    assert str(err.value) == (
        "batch 'gs://b/data/x?q=1' is outside the allowed locations "
        f"(s3://b/data, sklearn://; {ENV})"
    )
    monkeypatch.setenv(ENV, "::")
    with pytest.raises(ConfigError, match=f"^{ENV} entry '::' is refused: chained"):
        check_location("s3://b/x", ENV, "batch")


@pytest.mark.parametrize("protocol", ["http", "https", "ftp", "sftp", "ssh", "webdav"])
def test_host_names_are_compared_case_blind_for_every_host_protocol(protocol, monkeypatch):
    loc = parse_location(f"{protocol.upper()}://Me@Host.Example:22/Dir/F")
    assert loc == (
        protocol,
        ("host.example:22", "Dir", "F"),
        f"{protocol}://Me@Host.Example:22/Dir/F",
    )
    monkeypatch.setenv(ENV, f"{protocol}://HOST.example:22/Dir")
    assert check_location(f"{protocol}://host.EXAMPLE:22/Dir/x", ENV, "d").endswith("/Dir/x")
    with pytest.raises(ConfigError, match="outside"):  # the path stays case-sensitive
        check_location(f"{protocol}://host.example:22/dir/x", ENV, "d")


def test_bucket_names_keep_their_case_and_local_is_an_alias_of_file(tmp_path):
    assert parse_location("s3://Bucket/K").key == ("Bucket", "K")
    assert parse_location("memory://u@B/k").key == ("B", "k")  # the login is dropped, not the case
    assert parse_location(f"local://{tmp_path}/x") == (
        "file",
        (*Path(tmp_path).resolve().parts[1:], "x"),
        f"{Path(tmp_path).resolve()}/x",
    )
    assert parse_location("s3://b/k/..").uri == "s3://b"  # one step down, one up: the bucket
    assert parse_location("s3://b/./k?v=1").uri == "s3://b/k?v=1"
    assert parse_location("s3://b/k?").uri == "s3://b/k"


def test_database_urls_are_keyed_by_host_port_and_name_or_by_the_sqlite_file(tmp_path):
    assert parse_location("postgresql://etl@DB:5432/Sales").key == ("db:5432", "Sales")
    assert parse_location("mysql+pymysql://etl@DB/Sales").key == ("db", "Sales")
    assert parse_location("MSSQL://etl@db").key == ("db",)
    db = tmp_path / "a.db"
    sqlite = parse_location(f"sqlite:///{tmp_path}/x/../a.db")
    assert sqlite == ("sqlite", Path(db).resolve().parts[1:], f"sqlite:///{Path(db).resolve()}")
    assert parse_location("sqlite://").key == ()
    for name in (":memory:", "file:x.db"):  # kept as written, never made a local path
        loc = parse_location(f"sqlite:///{name}?mode=ro")
        assert (loc.key, sqlalchemy.make_url(loc.uri).database) == ((name,), name)
        assert loc.uri.endswith("?mode=ro")


def test_a_protocol_entry_allows_that_protocol_only(monkeypatch):
    monkeypatch.setenv(ENV, " S3:// ,local://,postgres://")
    got = boundary.allow_list(ENV)
    assert got == [("s3", (), "S3://"), ("file", (), "local://"), ("postgresql", (), "postgres://")]
    assert check_location("s3://any/x", ENV, "d") == "s3://any/x"
    assert check_location("postgresql://db/x", ENV, "d") == "postgresql://db/x"
    with pytest.raises(ConfigError, match="outside"):
        check_location("gs://any/x", ENV, "d")
    monkeypatch.setenv(ENV, " , ")
    assert boundary.allow_list(ENV) is None


SECRET_KEYS = [
    "pass", "passwd", "pwd", "sig", "auth", "apikey", "api_key", "key", "password", "secret",
    "token", "signature", "credential", "private", "client_secret", "id_token", "privateKey",
    "X-Amz-Signature", "x-amz-signature", "X-AMZ-SIGNATURE", "X-Amz-Credential",
    "X-Amz-Security-Token", "X-Amz-Key", "x-amz-sig", "X-Goog-Signature", "x-goog-key",
    "X-Goog-Credential", "x-ms-key", "X-Ms-Sig", " Pwd ", "AUTH",
]  # fmt: skip
PLAIN_KEYS = ["page", "X-Amz-Date", "X-Amz-Expires", "x-amz-keys", "sigma", "pa", "x-ms-",
              "authors", "mode", "x-foo-key", "keyword", "passes"]  # fmt: skip


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_every_secret_query_key_is_found_masked_and_refused(key):
    assert boundary.is_secret_key(key)
    url = f"https://h/x?a=1&{key.strip()}=s3cr3t&b=2"
    assert find_secret(url) == f"the query key {key.strip()!r}"
    assert mask_secrets(url) == f"https://h/x?a=1&{key.strip()}=***&b=2"
    assert "s3cr3t" not in _refusal(url)


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_query_keys_are_left_alone(key):
    url = f"https://h/x?{key}=v"
    assert not boundary.is_secret_key(key)
    assert (find_secret(url), mask_secrets(url), parse_location(url).uri) == (None, url, url)


def test_masking_covers_every_separator_and_only_the_value():
    assert mask_secrets("u?c=d&token=a;b&sig=b;c=d#sig=e") == "u?c=d&token=***&sig=***#sig=e"
    assert mask_secrets("u;sig=a&x=1") == "u;sig=***&x=1"
    assert mask_secrets("x 'https://h/?pwd=a' y") == "x 'https://h/?pwd=***' y"
    assert mask_secrets("ssh://me:p w@h") == "ssh://me:p w@h"  # a space ends the token
    assert mask_secrets("a+b.c-d://me:pw@h") == "a+b.c-d://me:***@h"
    assert find_secret("https://h/x?page=1#x&token=a") is None  # a fragment is no query
    assert find_secret("ssh://me:pw@h") == "a password"


def test_wrappers_name_their_field_and_list_and_a_bare_name_is_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, "srv")  # no "://": a (relative) local path, not a protocol
    assert boundary.allow_list(ENV) == [parse_location("srv")]
    with pytest.raises(ConfigError, match=r"^batch 'a::b' is refused"):
        check_location("a::b", ENV, "batch")
    assert parse_location("postgresql:///x").key == ("", "x")  # no host: an empty one
    for check, field, env in [
        (boundary.artifact_location, "artifacts_root", boundary.ARTIFACT_ROOTS),
        (boundary.config_location, "config_path", boundary.CONFIG_DIRS),
        (boundary.data_location, "data_source", boundary.DATA_SOURCES),
    ]:
        monkeypatch.setenv(env, "s3://")
        with pytest.raises(ConfigError, match=rf"^{field} 'gs://b' is outside .*; {env}\)$"):
            check("gs://b")
        assert check("s3://b/x/../y") == "s3://b/y"
