"""The models outside this repository: a fresh environment with only their requirements, MLflow's
scoring server on the champion, the Dockerfile MLflow writes, and the alias-following service.

The environment is built once by MLflow itself (``mlflow models prepare-env --env-manager
virtualenv``: ``python -m venv`` + ``pip install -r requirements.txt``; pip takes the CPU torch
wheel from /opt/wheels through the machine's pip config) under
``~/.cache/sae-pipeline/mlflow-envs`` (or ``$SAE_MLFLOW_ENV_ROOT``); MLflow names env folders
by a hash of the requirements, so every test here and every later run, fresh clones included,
reuses it. The first build takes one to two minutes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
# Outside the checkout, so that fresh clones on the same machine (CI) reuse the environment.
ENV_ROOT = Path(
    os.environ.get("SAE_MLFLOW_ENV_ROOT") or Path.home() / ".cache" / "sae-pipeline" / "mlflow-envs"
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def mlflow_env(registered) -> dict[str, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered["uri"],
        "MLFLOW_ENV_ROOT": str(ENV_ROOT),
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",  # a pickled model would not load
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="session")
def model_env(registered) -> Path:
    """The champion's own virtual environment, built by MLflow (or found from an earlier run)."""
    uri = f"models:/{registered['encoder_name']}@champion"
    t0 = time.perf_counter()
    ENV_ROOT.mkdir(parents=True, exist_ok=True)
    # MLflow reuses any folder it finds, so a build that was interrupted (or is still running in
    # another test process) would be taken as ready: one builder at a time, and a folder that
    # cannot import the model's packages is removed and built again.
    with open(ENV_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for env in ENV_ROOT.glob("mlflow-*"):
            if not env_imports(env):
                shutil.rmtree(env)
        subprocess.run(
            [sys.executable, "-m", "mlflow", "models", "prepare-env", "-m", uri,
             "--env-manager", "virtualenv"],
            check=True, env=mlflow_env(registered), capture_output=True, timeout=900,
        )  # fmt: skip
    envs = sorted(ENV_ROOT.glob("mlflow-*/bin/python"), key=lambda p: p.stat().st_mtime)
    assert envs, f"no environment under {ENV_ROOT}"
    assert env_imports(envs[-1].parents[1]), (
        f"{envs[-1].parents[1]} cannot import the model's packages"
    )
    print(f"model environment ready in {time.perf_counter() - t0:.1f} s: {envs[-1].parents[1]}")
    return envs[-1].parents[1]


def env_imports(env: Path) -> bool:
    """Whether an environment folder can import what the model's runtime needs."""
    python = env / "bin" / "python"
    check = "import mlflow, numpy, pandas, torch"  # cwd "/": not this checkout's mlflow/ folder
    return (
        python.exists()
        and subprocess.run(
            [python, "-c", check], cwd="/", capture_output=True, timeout=300
        ).returncode
        == 0
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a fresh environment with the model's requirements only -------------------------------------
LOAD = """
import importlib.util, json, sys, time
import mlflow.pyfunc, numpy as np, pandas as pd
assert importlib.util.find_spec("sae_pipeline") is None, "sae_pipeline is importable"
# read_json turns the digits' whole-number floats into int64; the signature says double, and
# MLflow refuses int64 -> double as unsafe (docs/service.md, Signature): the training type
frame = pd.read_json(sys.argv[2], orient="split").astype("float64")
t = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter() - t
out = model.predict(frame, params=json.loads(sys.argv[3]))
np.save(sys.argv[4], out.to_numpy(dtype=np.float64))
print(json.dumps({"load_s": loaded, "columns": list(out.columns)}))
"""


def run_in_env(env_dir: Path, registered, uri: str, params: dict, tmp_path: Path):
    rows = tmp_path / "rows.json"
    registered["frame"].head(200).to_json(rows, orient="split")
    out = tmp_path / "out.npy"
    result = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", LOAD, uri, str(rows), json.dumps(params), str(out)],
        cwd=tmp_path,  # nothing of this repository on sys.path
        env=mlflow_env(registered),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out), json.loads(result.stdout.strip().splitlines()[-1])


def test_a_fresh_env_loads_the_champion_encoder_and_gives_the_same_codes(
    model_env, registered, tmp_path
):
    reqs = (model_env / "lib").glob("python3*/site-packages/*.dist-info")
    installed = {p.name.split("-")[0].lower() for p in reqs}
    assert {"mlflow", "torch", "numpy", "pandas"} <= installed
    assert not {"sae_pipeline", "apache_airflow", "evidently"} & installed  # sklearn: mlflow's
    assert not any(n.startswith("nvidia") for n in installed)  # the CPU wheel, no CUDA build
    uri = f"models:/{registered['encoder_name']}@champion"
    got, info = run_in_env(model_env, registered, uri, {"output": "all"}, tmp_path)
    want = registered["encoder"].transform(registered["frame"].head(200), "all")
    assert info["columns"] == list(want.columns)
    np.testing.assert_allclose(got, want.to_numpy(), rtol=1e-5, atol=1e-6)
    print(f"fresh-env load_model: {info['load_s']:.2f} s")


def test_a_fresh_env_loads_the_champion_scaler_bit_equal(model_env, registered, tmp_path):
    uri = f"models:/{registered['scaler_name']}@champion"
    got, _ = run_in_env(model_env, registered, uri, {}, tmp_path)
    x = registered["frame"].head(200).to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(got, registered["encoder"].scaler.transform(x))


# ---- MLflow's scoring server, in the model's own environment ------------------------------------
def post(url: str, body: bytes, content_type: str | None) -> tuple[int, str]:
    """POST ``body``; with ``content_type`` None the request has no Content-Type header
    (urllib would add a form one)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", parts.path)
        if content_type is not None:
            conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        assert proc.poll() is None, "the server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return time.perf_counter() - t0
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no /ping answer after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def check_serving(url: str, registered) -> None:
    """Digits rows in as JSON and CSV, the encoder's codes out."""
    frame = registered["frame"].head(50)
    want = registered["encoder"].transform(frame, "all")
    body = json.dumps(
        {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
        | {"params": {"output": "all"}}
    )
    status, text = post(url, body.encode(), "application/json")
    assert status == 200, text
    got = [[r[c] for c in want.columns] for r in json.loads(text)["predictions"]]
    np.testing.assert_allclose(got, want.to_numpy(), rtol=1e-5, atol=1e-6)
    status, text = post(url, frame.to_csv(index=False).encode(), "text/csv")
    assert status == 200, text
    codes = registered["encoder"].code_columns
    got = [[r[c] for c in codes] for r in json.loads(text)["predictions"]]
    np.testing.assert_allclose(got, want[codes], rtol=1e-5, atol=1e-6)


def bad_requests(registered, plain: bool = False) -> dict[str, tuple[bytes, str | None, str]]:
    """name -> (body, content type, text the answer must contain). ``plain``: MLflow's own
    server, which checks the input schema before the model (docs/service.md, Signature)."""
    frame = registered["frame"].head(2)
    cols = list(frame.columns)
    split = json.loads(frame.to_json(orient="split", index=False))
    missing = {"columns": cols[1:], "data": [r[1:] for r in split["data"]]}
    text = [[*r] for r in split["data"]]
    text[1][3] = "abc"
    return {
        "missing column": (
            json.dumps({"dataframe_split": missing}).encode(),
            "application/json",
            f"Model is missing inputs ['{cols[0]}']"
            if plain
            else f"input lacks 1 feature column(s): {cols[0]}",
        ),
        "non-numeric value": (
            json.dumps({"dataframe_split": {"columns": cols, "data": text}}).encode(),
            "application/json",
            f"Failed to convert column {cols[3]} to type 'float64'"
            if plain
            else f"non-numeric value(s) in feature column(s): {cols[3]} (row 1: 'abc')",
        ),
        "non-numeric value (csv)": (
            frame.to_csv(index=False).replace("\n0.0,", "\nx,", 1).encode(),
            "text/csv",
            "Failed to parse input" if plain else "non-numeric value(s) in feature column(s)",
        ),
        "empty body": (b"", "application/json", "valid JSON"),
        "wrong content type": (b"pixel_0=1", "text/plain", "content type"),
    }


def check_bad_requests(
    url: str, registered, extra: dict | None = None, plain: bool = False
) -> dict[str, tuple]:
    answers = {}
    cases = bad_requests(registered, plain) | (extra or {})
    for name, (body, ctype, expected) in cases.items():
        status, text = post(url, body, ctype)
        answers[name] = (status, text[:300])
        assert 400 <= status < 500, (name, status, text[:500])
        assert expected.lower() in text.lower(), (name, text[:500])
        if plain and name == "non-numeric value (csv)":
            continue  # MLflow's CSV parser error carries its stack trace (docs/service.md)
        assert "stack_trace" not in text and "Traceback" not in text, (name, text[:500])
    return answers


def test_mlflow_models_serve_in_the_models_env_answers_codes_and_clean_4xx(
    model_env, registered, tmp_path
):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve",
         "-m", f"models:/{registered['encoder_name']}@champion",
         "--env-manager", "virtualenv", "-h", "127.0.0.1", "-p", str(port)],
        env=mlflow_env(registered), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        ready = wait_ready(proc, port)
        print(f"mlflow models serve --env-manager virtualenv: ready after {ready:.1f} s")
        url = f"http://127.0.0.1:{port}/invocations"
        check_serving(url, registered)
        for name, answer in check_bad_requests(url, registered, plain=True).items():
            print(f"{name}: {answer}")
        check_serving(url, registered)  # still serving after the bad requests
    finally:
        stop(proc)
        log.close()


def test_generate_dockerfile_installs_nothing_from_this_repository(registered, tmp_path):
    out = tmp_path / "docker"
    subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "generate-dockerfile",
         "-m", f"models:/{registered['encoder_name']}@champion", "-d", str(out)],
        check=True, env=mlflow_env(registered), capture_output=True, timeout=300,
    )  # fmt: skip
    dockerfile = (out / "Dockerfile").read_text()
    assert "sae-pipeline" not in dockerfile and "sae_pipeline" not in dockerfile
    context = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "model_dir/requirements.txt" in context
    assert not [p for p in context if p.endswith((".pkl", ".joblib", "pyproject.toml", "uv.lock"))]
    reqs = (out / "model_dir" / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in reqs] == ["mlflow", "torch", "numpy", "pandas"]
    code = [p for p in context if p.endswith(".py")]
    assert sorted(code) == ["model_dir/code/sae_model_runtime.py", "model_dir/encoder_model.py"]


# ---- a new champion reaches the running service -------------------------------------------------
def test_the_service_follows_the_champion_alias_and_hides_server_leaks(registered, tmp_path):
    from mlflow import MlflowClient

    from sae_pipeline.registry import service, tracking

    os.environ["MLFLOW_TRACKING_URI"] = registered["uri"]  # read by the server processes
    client = MlflowClient(registered["uri"], registered["uri"])
    name = registered["encoder_name"]
    port = free_port()
    sup = service.Supervisor(name, port=port, live_file=tmp_path / "live", log_dir=tmp_path)
    url = f"http://127.0.0.1:{port}/invocations"
    frame = registered["frame"].head(3)
    body = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))})
    try:
        assert sup.step(client) and sup.live.version == "2"
        assert not sup.step(client)  # alias unchanged: nothing restarts
        status, text = post(url, body.encode(), "application/json")
        assert status == 200, text
        want = registered["encoders"]["2"].transform(frame).to_numpy()
        np.testing.assert_allclose(
            [list(r.values()) for r in json.loads(text)["predictions"]], want, rtol=1e-5
        )
        # the three leaks of MLflow's server, closed by the wrapper
        leaks = {
            "no content type": (body.encode(), None, "Content-Type header missing"),
            "empty body (csv)": (b"", "text/csv", "the CSV body is empty"),
            "malformed json": (b'{"dataframe_split": {', "application/json", "JSON"),
        }
        answers = check_bad_requests(url, registered, leaks)
        for leak in leaks:
            print(f"{leak}: {answers[leak]}")
        assert answers["no content type"][0] == 415
        assert "dataframe_split" not in answers["malformed json"][1]  # no echo of the body

        tracking.set_alias(registered["cfg"], name, tracking.CHAMPION, "1")
        t0 = time.perf_counter()
        assert sup.step(client) and sup.live.version == "1"
        print(f"switch to v1: {time.perf_counter() - t0:.1f} s")
        status, text = post(url, body.encode(), "application/json")
        assert status == 200, text
        want = registered["encoders"]["1"].transform(frame).to_numpy()
        got = [list(r.values()) for r in json.loads(text)["predictions"]]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert (tmp_path / "live").read_text().strip() == str(port)
    finally:
        tracking.set_alias(registered["cfg"], name, tracking.CHAMPION, "2")
        if sup.live is not None:
            sup.live.stop()
