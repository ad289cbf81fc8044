"""A small headless-Chromium driver over the DevTools protocol, for tests that need a browser.

Starts Debian's ``chromium`` with a fresh profile and ``--remote-debugging-port``, attaches to
its page target through ``websockets`` (already in the lock), and offers what the report tests
need: navigate and wait for the load event, evaluate JavaScript, collect console errors and
uncaught exceptions, take a screenshot. ``unavailable()`` says why no browser can run here.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "headless_shell")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--allow-file-access-from-files",
    "--window-size=1400,1000",
)


def executable() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    exe = executable()
    if exe is None:
        return (
            "no Chromium found (looked for " + ", ".join(CANDIDATES) + "); install Debian's "
            "`chromium` package (`apt-get install -y chromium`; .ci/run does it as root)"
        )
    try:
        import websockets.sync.client  # noqa: F401
    except ImportError:
        return "the `websockets` package is missing from the environment"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout
        self.port = _free_port()
        self.profile = tempfile.mkdtemp(prefix="sae-chromium-")
        self.proc: subprocess.Popen | None = None
        self.ws = None
        self._next_id = 0
        self.console_errors: list[str] = []
        self.exceptions: list[str] = []
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Browser:
        exe = executable()
        if exe is None:
            raise RuntimeError(unavailable())
        self.proc = subprocess.Popen(
            [
                exe,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                f"--remote-debugging-port={self.port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        target = self._page_target()
        from websockets.sync.client import connect

        self.ws = connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=self.timeout)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        return self

    def __exit__(self, *exc) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _page_target(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        url = f"http://127.0.0.1:{self.port}/json/list"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {err}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    return pages[0]
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"chromium's DevTools endpoint {url} did not answer")

    # ---- the protocol -------------------------------------------------------------------------
    def _record(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console_errors.append(
                " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            )
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.console_errors.append(params["entry"].get("text", ""))
        elif method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
        self._events.append(msg)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        my_id = self._next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._record(msg)

    def wait_event(self, method: str) -> dict[str, Any]:
        for i, msg in enumerate(self._events):
            if msg.get("method") == method:
                return self._events.pop(i)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self._record(msg)
            if msg.get("method") == method:
                self._events.remove(msg)
                return msg

    # ---- what tests use -----------------------------------------------------------------------
    def open(self, url: str, settle: float = 1.0) -> None:
        """Navigate, wait for the load event, then let the page's scripts render."""
        self._events.clear()
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"could not open {url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired")
        end = time.monotonic() + settle
        while time.monotonic() < end:  # drain console messages written while rendering
            with contextlib.suppress(TimeoutError):
                self._record(json.loads(self.ws.recv(timeout=0.1)))

    def evaluate(self, expression: str) -> Any:
        got = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in got:
            raise RuntimeError(f"{expression!r} raised {got['exceptionDetails']}")
        return got["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path
