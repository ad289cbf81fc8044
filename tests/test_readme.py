"""The README's commands, run as a new user would: from a project folder, each in a new process.

``test_your_own_data_walkthrough`` follows the "Your own data" section end to end (a CSV with
ids and a label, the config as written there, train, the Python snippet, serve and a request,
encode and drift on a shifted batch); ``test_champion_snippet_and_mlflow_serve`` runs the
snippet at the top and MLflow's own server. Run with ``-s`` to see the walkthrough's transcript.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.ci import unavailable
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
VENV = Path(sys.executable).parents[1]


def section(title: str) -> str:
    """The README's text under ``## title``, up to the next ``## `` heading."""
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[str]:
    """The block's command lines, comments dropped, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in joined.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


@pytest.fixture
def project(tmp_path):
    """A user's folder: the environment as ``.venv``, and nothing of MLflow's in the env."""
    if shutil.which("curl") is None:
        unavailable("curl is not installed (the README's requests use it)")
    (tmp_path / ".venv").symlink_to(VENV)
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SAE_"))}
    env["PYTHONPATH"] = str(REPO)  # this checkout's code, as installed in .venv
    return env


def sh(project: Path, script: str, transcript: list[str], timeout: float = 600) -> str:
    proc = subprocess.run(
        ["bash", "-ec", script], cwd=project, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    transcript.append(f"$ {script}\n{proc.stdout}")
    assert proc.returncode == 0, f"{script}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(project: Path, line: str, request: str, port: int, transcript: list[str]):
    """Start a README server line in the background, wait for it, run ``request``, stop it."""
    proc = subprocess.Popen(
        ["bash", "-c", line], cwd=project, env=_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{line} exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                time.sleep(2)
        return json.loads(sh(project, request, transcript))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _tables(n: int = 2000, shift_new: float = 1.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows and a new batch (its first four features shifted), ids and a label."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(n, 3))
    x = z @ rng.normal(size=(3, 12)) + 0.1 * rng.normal(size=(n, 12))
    frame = pd.DataFrame(x.round(4), columns=[f"f{i}" for i in range(12)])
    frame.insert(0, "id", [f"c{i:05d}" for i in range(n)])
    frame["label"] = (z[:, 0] > 0).astype(int)
    train, new = frame.iloc[:1500], frame.iloc[1500:].copy()
    new[["f0", "f1", "f2", "f3"]] += shift_new
    return train, new


@pytest.mark.system
@pytest.mark.slow
def test_your_own_data_walkthrough(project):
    text, transcript = section("Your own data"), []
    train, new = _tables()
    assert list(train.columns) == blocks(text, "")[0].splitlines()[0].split(",")
    train.to_csv(project / "mydata.csv", index=False)
    new.to_csv(project / "new.csv", index=False)
    config = blocks(text, "yaml")[0]
    (project / "my.yaml").write_text(config)
    transcript.append(f"$ cat my.yaml\n{config}")

    setup, use = (commands(b) for b in blocks(text, "bash"))
    sh(project, setup[0], transcript)  # config
    trained = json.loads(sh(project, setup[1], transcript))  # train
    assert trained["promote"]["promoted"] and trained["register"]["encoder_version"] == "1"
    export = setup[2]
    assert export.startswith("export MLFLOW_TRACKING_URI=")
    assert (
        sh(project, f"{export}; echo $MLFLOW_TRACKING_URI", []).strip() == (trained["tracking_uri"])
    )  # the line the README gives is the URI train printed

    # The Python snippet, in a new process with only that variable set.
    (project / "snippet.py").write_text(blocks(text, "python")[0])
    out = sh(project, f"{export}; .venv/bin/python snippet.py", transcript)
    assert out.split(")")[0] == f"({len(new)}, 8"
    assert not (project / "mlflow.db").exists()

    # serve and a request, then encode and drift on the shifted batch.
    port = _free_port()
    serve_line, curl = (ln.replace("5001", str(port)) for ln in use[:2])
    answer = serve_and_ask(project, serve_line.rstrip("& "), curl, port, transcript)
    codes = pd.DataFrame(answer["predictions"])
    assert codes.shape == (3, 8) and np.isfinite(codes.to_numpy()).all()  # head -4: 3 rows
    sh(project, use[2], transcript)  # CSV -> Parquet
    encoded = json.loads(sh(project, use[3] + " -q 2>/dev/null", transcript))
    assert (encoded["rows_in"], encoded["rows_encoded"]) == (len(new), len(new))
    drift = json.loads(sh(project, use[4] + " -q 2>/dev/null", transcript))["check"]
    assert drift["drift_detected"] and drift["rows_valid"] == len(new)
    assert not (project / "mlflow.db").exists()
    print("\n".join(transcript))


@pytest.mark.system
@pytest.mark.slow
def test_champion_snippet_and_mlflow_serve(project, capsys):
    """The README's first snippet and its ``mlflow models serve`` line, after ``train``."""
    sets = " ".join(f"--set {k}={json.dumps(v).replace(' ', '')}" for k, v in TINY.items())
    transcript: list[str] = []
    trained = json.loads(sh(project, f".venv/bin/sae-pipeline train {sets} 2>/dev/null", []))
    intro = README.split("## The two commands", 1)[0]
    from sklearn.datasets import load_digits

    digits = pd.DataFrame(load_digits().data, columns=[f"pixel_{i}" for i in range(64)])
    digits.head(7).to_csv(project / "rows.csv", index=False)  # the README's rows.csv
    export = commands(blocks(intro, "bash")[0])[0]
    assert export.startswith("export MLFLOW_TRACKING_URI="), "README: how to find the registry"
    assert (
        sh(project, f"{export}; echo $MLFLOW_TRACKING_URI", []).strip() == (trained["tracking_uri"])
    )
    # The snippet's `frame`: raw digits rows with the feature names training saw.
    prelude = f"import pandas as pd\nframe = pd.read_csv({str(project / 'rows.csv')!r}).head(7)\n"
    snippet = blocks(intro, "python")[0] + "print(codes.shape, errors.shape)\n"
    (project / "snippet.py").write_text(prelude + snippet)
    out = sh(project, f"{export}; .venv/bin/python snippet.py", transcript)
    assert out.strip() == "(7, 4) (7, 1)"
    assert not (project / "mlflow.db").exists()

    port = _free_port()
    serve = next(ln for ln in commands(blocks(intro, "bash")[2]) if "mlflow models serve" in ln)
    curl = next(ln for ln in commands(blocks(intro, "bash")[1]) if ln.startswith("curl"))
    answer = serve_and_ask(
        project, f"{export}; {serve.replace('5001', str(port))}",
        curl.replace("5001", str(port)), port, transcript,
    )  # fmt: skip
    assert pd.DataFrame(answer["predictions"]).shape == (7, 4)
    assert not (project / "mlflow.db").exists()
