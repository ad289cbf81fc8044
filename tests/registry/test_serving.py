"""The service app (registry/serving.py) on an encoder bundle: bodies, limits, batching, metrics.

In-process (Starlette's test client, or the ASGI app called directly where the test must see
how much of a body the app pulled); no registry and no server process.
"""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from sae_pipeline.registry import _wire, bundle, serving
from sae_pipeline.registry._model_code import sae_model_runtime as runtime
from sae_pipeline.registry.client import to_arrow
from tests.registry.conftest import make_encoder

MARK = "SECRET-ROW-MARKER"  # a request value that no answer may echo


@pytest.fixture(scope="module")
def served(digits, tmp_path_factory):
    files = bundle.write_encoder_bundle(make_encoder(digits), tmp_path_factory.mktemp("b"))
    return runtime.EncoderBundle.load(files["config"], files["weights"])


@pytest.fixture(scope="module")
def rows(digits):
    return digits.drop(columns="target").head(40).reset_index(drop=True)


def client(app):
    from starlette.testclient import TestClient

    return TestClient(app)


def app_of(served, **limits):
    return serving.create_app(served, "enc", "7", serving.Limits(**limits))


def split(frame: pd.DataFrame, **extra) -> bytes:
    return json.dumps(
        {"dataframe_split": {"columns": list(frame.columns), "data": frame.values.tolist()}} | extra
    ).encode()


def test_every_content_type_answers_the_bundles_outputs(served, rows):
    app = client(app_of(served))
    want = served.predict(rows, {"output": "all"})
    r = app.post("/invocations", content=split(rows, params={"output": "all"}),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 200, r.text
    got = pd.DataFrame(r.json()["predictions"])  # MLflow's records
    np.testing.assert_array_equal(got[want.columns].to_numpy(float), want.to_numpy(float))
    codes = want[served.code_columns].to_numpy()
    for ctype, body in (
        ("text/csv", rows.to_csv(index=False).encode()),
        ("application/vnd.apache.parquet", rows.to_parquet(index=False)),
        ("application/json", json.dumps({"dataframe_records": rows.to_dict("records")}).encode()),
        ("application/json", json.dumps({"inputs": rows.values.tolist()}).encode()),  # unnamed
        ("application/json", json.dumps({"instances": rows.to_dict("list")}).encode()),
    ):
        r = app.post("/invocations", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, (ctype, r.text)
        got = pd.DataFrame(r.json()["predictions"])[served.code_columns].to_numpy()
        np.testing.assert_allclose(got, codes, rtol=1e-6)
    # Arrow in: Arrow out (float32 codes, bit-equal); Accept picks CSV or JSON instead
    r = app.post("/invocations", content=to_arrow(rows),
                 headers={"Content-Type": _wire.ARROW})  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"].startswith(_wire.ARROW)
    table = pa.ipc.open_stream(r.content).read_all()
    np.testing.assert_array_equal(table.to_pandas().to_numpy(), codes)
    r = app.post("/invocations", content=to_arrow(rows),
                 headers={"Content-Type": _wire.ARROW, "Accept": "text/csv"})  # fmt: skip
    assert r.headers["content-type"].startswith("text/csv")
    np.testing.assert_allclose(pd.read_csv(io.StringIO(r.text)).to_numpy(), codes, rtol=1e-6)


def test_a_body_over_the_limit_is_refused_before_it_is_read(served, rows):
    """Content-Length over the limit: 413 before one chunk is pulled. A streamed body with no
    length: 413 as soon as the count passes the limit, the rest never pulled, no prediction."""
    app = app_of(served, max_body_bytes=3000)
    calls = []

    def predict(*args, **kwargs):
        calls.append(1)
        raise AssertionError("predicted")

    served_predict, served.prepare = served.prepare, predict
    try:
        for length in ("10000000000", None):
            status, body, pulled = asyncio.run(asgi_post(app, length, chunks=50, size=1000))
            assert status == 413, body
            assert body["message"].startswith("request body is over 0.00286")
            assert body["message"].endswith("MB (SAE_SERVE_MAX_BODY_MB): split it")
            assert pulled == (0 if length else 4)  # 4 x 1000 bytes > 3000
        assert calls == []
    finally:
        served.prepare = served_predict
    small = client(app).post("/invocations", content=split(rows.head(1)),
                             headers={"Content-Type": "application/json"})  # fmt: skip
    assert small.status_code == 200


async def asgi_post(app, length, chunks: int, size: int):
    """POST ``chunks`` x ``size`` bytes straight through ASGI; (status, body, chunks pulled)."""
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", length.encode()))
    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers,
             "query_string": b"", "http_version": "1.1", "scheme": "http", "root_path": "",
             "server": ("t", 80), "client": ("c", 1)}  # fmt: skip
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        if pulled == chunks:
            await asyncio.sleep(3600)  # a client still sending
        pulled += 1
        return {"type": "http.request", "body": b"[" * size, "more_body": pulled < chunks}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def test_too_many_rows_get_413_for_every_content_type(served, rows):
    app = client(app_of(served, max_rows=10))
    for ctype, body in (
        ("application/json", split(rows)),
        ("application/json", json.dumps({"dataframe_records": rows.to_dict("records")}).encode()),
        ("text/csv", rows.to_csv(index=False).encode()),
        (_wire.ARROW, to_arrow(rows)),
        (_wire.PARQUET, rows.to_parquet(index=False)),
    ):
        r = app.post("/invocations", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 413, (ctype, r.text)
        assert r.json()["message"] == (
            "request has 40 rows; the limit is 10 (SAE_SERVE_MAX_ROWS): split it"
        )


def test_malformed_bodies_get_a_400_that_echoes_nothing(served, rows):
    app = client(app_of(served))
    row = rows.iloc[0].tolist()
    cols = list(rows.columns)
    cases = {
        "nested 200,000 deep": (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),
        "5,000-digit integer": (
            b'{"dataframe_split": {"columns": ["a"], "data": [[' + b"7" * 5000 + b"]]}}",
            "not valid JSON",
        ),
        "output as a list": (
            split(rows.head(2), params={"output": [MARK, row]}),
            "params.output must be a string",
        ),
        "output as an object": (
            split(rows.head(2), params={"output": {MARK: row}}),
            "params.output must be a string",
        ),
        "params as a list": (split(rows.head(2), params=[MARK]), "params must be an object"),
        "unknown key": (json.dumps({MARK: 1}).encode(), "exactly one of dataframe_split"),
        "ragged rows": (
            json.dumps(
                {"dataframe_split": {"columns": cols, "data": [row, [*row, MARK]]}}
            ).encode(),
            "dataframe_split: row 1 has 65 values; expected 64 (one per column)",
        ),
        "1e39": (
            json.dumps({"dataframe_split": {"columns": cols, "data": [[1e39, *row[1:]]]}}).encode(),
            "value(s) out of range after scaling in feature column(s): pixel_0 (first at row 0)",
        ),
        "not json": (b'{"dataframe_split": ' + MARK.encode(), "not valid JSON"),
    }
    for name, (body, message) in cases.items():
        r = app.post("/invocations", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (name, r.status_code, r.text[:300])
        assert message in r.json()["message"], (name, r.text[:300])
        assert MARK not in r.text and "\n" not in r.json()["message"], name
    for ctype, body in ((None, split(rows.head(1))), ("text/plain", b"x")):
        r = app.post("/invocations", content=body, headers={"Content-Type": ctype} if ctype else {})
        assert r.status_code == 415 and "application/vnd.apache.arrow.stream" in r.text


def test_a_ragged_csv_row_gets_a_400_naming_the_first_bad_row(served, rows):
    """pandas would move a longer row's leading fields into the index: other features, 200."""
    app = client(app_of(served))
    lines = rows.head(4).to_csv(index=False).splitlines()
    for i, change in ((2, ",7"), (1, "")):
        bad = list(lines)
        bad[i + 1] = bad[i + 1] + change if change else bad[i + 1].rsplit(",", 1)[0]
        r = app.post("/invocations", content="\n".join(bad).encode(),
                     headers={"Content-Type": "text/csv"})  # fmt: skip
        assert r.status_code == 400, r.text
        fields = 65 if change else 63
        assert r.json()["message"] == (
            f"CSV row {i} has {fields} fields; the header has 64 "
            "(rows count from 0 after the header)"
        )
    all_longer = [lines[0]] + [line + ",7" for line in lines[1:]]  # pandas: index shift
    r = app.post("/invocations", content="\n".join(all_longer).encode(),
                 headers={"Content-Type": "text/csv"})  # fmt: skip
    assert r.status_code == 400 and r.json()["message"].startswith("CSV row 0 has 65 fields")


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows(served, digits):
    """32 clients at once, each with its own rows (1 to 5); one sends a text cell. Batches
    merge requests (the metrics show it), every good client gets its own rows' codes in order,
    and only the bad one fails."""
    import httpx

    app = app_of(served, batch_max_wait_s=0.05, batch_max_rows=64)
    frame = digits.drop(columns="target")
    jobs = [frame.iloc[10 * i : 10 * i + 1 + i % 5] for i in range(32)]
    bad = 13
    bodies = [split(j) for j in jobs]
    bad_rows = jobs[bad].astype(object)
    bad_rows.iloc[0, 3] = "abc"
    bodies[bad] = split(bad_rows)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            h = {"Content-Type": "application/json"}
            answers = await asyncio.gather(*(c.post("/invocations", content=b, headers=h)
                                             for b in bodies))  # fmt: skip
            return answers, (await c.get("/metrics")).text

    answers, metrics = asyncio.run(go())
    for i, (job, r) in enumerate(zip(jobs, answers, strict=True)):
        if i == bad:
            assert r.status_code == 400
            assert "non-numeric value(s) in feature column(s): pixel_3 (row 0: 'abc')" in r.text
            continue
        assert r.status_code == 200, (i, r.text)
        got = pd.DataFrame(r.json()["predictions"]).to_numpy()
        # float32 sums in another batch shape may differ in the last bit; other rows by far more
        np.testing.assert_allclose(got, served.predict(job).to_numpy(), rtol=1e-5, atol=1e-6)
    batches = metric(metrics, "sae_serve_batch_requests_count")
    assert batches < 31, f"no two requests were merged ({batches} batches for 31 requests)"
    assert metric(metrics, "sae_serve_batch_requests_sum") == 31
    assert metric(metrics, 'sae_serve_requests_total{content_type="json",status="200"}') == 31
    assert metric(metrics, 'sae_serve_requests_total{content_type="json",status="400"}') == 1
    assert 'sae_serve_model_info{name="enc",version="7"} 1.0' in metrics
    assert "sae_serve_request_seconds_bucket" in metrics and "sae_serve_rows_total" in metrics


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_limits_come_from_the_environment_and_bad_ones_are_refused():
    limits = serving.Limits.from_env({"SAE_SERVE_MAX_BODY_MB": "2", "SAE_SERVE_MAX_ROWS": "5"})
    assert limits.max_body_bytes == 2 << 20 and limits.max_rows == 5
    assert serving.Limits.from_env({}) == serving.Limits()
    assert serving.Limits().max_body_bytes == 64 << 20
    with pytest.raises(ValueError, match="SAE_SERVE_MAX_ROWS='many' is not a number"):
        serving.Limits.from_env({"SAE_SERVE_MAX_ROWS": "many"})


@pytest.fixture
def live(served):
    """The app on a real uvicorn server (in a thread), small limits; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = app_of(served, max_body_bytes=1_000_000, max_rows=500)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_client_sends_a_frame_as_arrow_and_gets_the_codes_back(live, served, digits):
    from sae_pipeline.errors import RegistryError
    from sae_pipeline.registry.client import encode

    frame = digits.drop(columns="target").iloc[100:400]
    codes = encode(live, frame)
    assert codes.index.equals(frame.index) and list(codes.columns) == served.code_columns
    np.testing.assert_array_equal(codes.to_numpy(), served.predict(frame).to_numpy())
    both = encode(live + "/invocations", frame.head(3), output="all")
    assert list(both.columns) == [*served.code_columns, "reconstruction_error"]
    with pytest.raises(RegistryError, match=r"^the service answered 413: request has 600 rows"):
        encode(live, digits.drop(columns="target").head(600))
    with pytest.raises(RegistryError, match="answered 400: input lacks 1 feature column"):
        encode(live, frame.drop(columns="pixel_9"))


def test_a_real_server_answers_413_to_a_declared_length_without_reading_the_body(live):
    """The client declares 100 MB and sends 10 bytes: the answer comes at once (no waiting
    for the rest), and the server keeps serving."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(live)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Type", "text/csv")
    conn.putheader("Content-Length", str(100 << 20))
    conn.endheaders(b"pixel_0\n1\n")
    r = conn.getresponse()
    assert r.status == 413 and b"SAE_SERVE_MAX_BODY_MB" in r.read()
    conn.close()
    with urllib_open(live + "/ping") as ok:
        assert ok.status == 200


def urllib_open(url):
    import urllib.request

    return urllib.request.urlopen(url, timeout=10)


def test_batching_can_be_turned_off_and_answers_the_same(served, rows):
    limits = serving.Limits.from_env({"SAE_SERVE_BATCH_MAX_ROWS": "0"})
    app = client(serving.create_app(served, "enc", "7", limits))
    r = app.post("/invocations", content=split(rows), headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    got = pd.DataFrame(r.json()["predictions"]).to_numpy()
    np.testing.assert_array_equal(got, served.predict(rows).to_numpy().astype(np.float64))
    assert metric(app.get("/metrics").text, "sae_serve_batch_requests_count") == 0
