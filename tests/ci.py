"""Skips that cannot hide: what CI provides is required there.

``.ci/run`` exports ``CI=true`` and provides PostgreSQL and Redis (started with the machine),
Chromium and a Compose CLI (installed when missing). A test that needs one of them calls
``unavailable(reason)`` when it is missing: a skip on a developer's machine, a failure under
CI, so a missing service or install step shows as red instead of as a quiet skip.
tests/test_skips.py checks that no test skips any other way.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def under_ci() -> bool:
    """Whether this run is CI's (``CI`` set to anything but empty, 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Skip saying ``reason``; under CI, which must provide it, fail instead."""
    if under_ci():
        pytest.fail(f"CI must provide this, but {reason}", pytrace=False)
    pytest.skip(reason)
