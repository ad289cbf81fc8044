"""Skips that cannot hide (issue 27): under CI a missing service, browser or CLI is a failure.

Every test that needs something CI provides goes through ``tests.ci.unavailable``: a skip on a
developer's machine, a failure under CI. The only other skips allowed are about CUDA (CI has no
accelerator: a test that needs one cannot run there, one that needs a machine without it
always does). ``.ci/run`` exports ``CI=true`` and installs what it provides.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests import ci

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SKIPPING = {"skip", "skipif", "importorskip", "xfail"}


def offending_skips(text: str) -> list[str]:
    """Each call of ``skip``/``skipif``/``importorskip``/``xfail`` in ``text`` (however it was
    imported) that is not about CUDA, as ``line: source``."""
    bad = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in SKIPPING:
            continue
        source = ast.get_source_segment(text, node) or ""
        if "cuda" not in source.lower():
            bad.append(f"{node.lineno}: {source.splitlines()[0]}")
    return bad


def test_no_test_skips_except_through_the_ci_helper():
    bad = [
        f"{p.relative_to(REPO)}:{hit}"
        for p in sorted(TESTS.rglob("*.py"))
        if p != TESTS / "ci.py"
        for hit in offending_skips(p.read_text())
    ]
    assert bad == [], "skip through tests.ci.unavailable instead:\n" + "\n".join(bad)


def test_the_skip_check_can_fail():
    for bad in (
        "pytest.skip('no server')",
        "pytest.importorskip('psycopg2')",
        "@pytest.mark.skipif(not ok, reason='x')\ndef test(): pass",
        "from pytest import skip\ndef f():\n    skip('x')",
        "pytestmark = [pytest.mark.xfail(reason='flaky')]",
    ):
        assert offending_skips(bad), bad
    ok = "@pytest.mark.skipif(torch.cuda.is_available(), reason='needs no CUDA')\ndef t(): pass"
    assert offending_skips(ok) == []


def test_unavailable_skips_here_and_fails_under_ci(monkeypatch):
    for value in ("", "0", "false"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="no server"):
            ci.unavailable("no server")
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="CI must provide this, but no server"):
            ci.unavailable("no server")


def test_ci_run_exports_ci_and_installs_what_the_tests_need():
    script = (REPO / ".ci" / "run").read_text()
    lines = [line.split("#")[0].strip() for line in script.splitlines()]
    exported = lines.index("export CI=true")
    assert exported < lines.index("make test")
    assert "apt-get install" in script
    for package in ("chromium", "docker-compose"):  # each added to what is installed
        assert re.search(rf"missing\+=\({package}\)", script), package
