"""The encoder service against the same model in-process: latency, concurrency, bulk, memory.

Measured in one run on the same digits rows and the same registered model:

- **service**: ``sae-pipeline serve``'s app (``registry/serving.py``) in its own process, with
  adaptive batching on (the defaults) and off (``SAE_SERVE_BATCH_MAX_ROWS=0``);
- **mlflow models serve**: MLflow's scoring server on the same model (``--env-manager local``);
- **in-process predict**: ``mlflow.pyfunc.load_model(uri).predict(frame)`` in this process;
- **bare forward**: the network's encoder on rows already scaled (float32 tensors): the floor.

Reported, as one markdown table: single-row latency p50/p99 (sequential JSON requests);
32 concurrent single-row clients (keep-alive connections, a fixed number of requests each):
rows/s and p99; rows/s for 10,000-row requests as JSON, CSV and Arrow; the server's peak RSS.
Bodies are built before the clock starts; the clock covers the request and reading the
answer (JSON parsed, Arrow read into a table).

    .venv/bin/python bench/bench_service.py --threads 1    # starts each server itself
    .venv/bin/python bench/bench_service.py --peak-rss      # one maximum-size body, peak RSS

Without ``--model-uri`` it serves the config's encoder ``@champion``; if the registry has
none, it registers an untrained encoder of the default architecture (64 -> 256 -> 64 -> 10;
speed does not depend on training) in a scratch store under .cache/.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ARROW = "application/vnd.apache.arrow.stream"


class Client:
    """One keep-alive connection to a service's ``/invocations``."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def post(self, body: bytes, ctype: str, accept: str | None = None):
        headers = {"Content-Type": ctype, **({"Accept": accept} if accept else {})}
        self.conn.request("POST", "/invocations", body, headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {data[:300]!r}")
        if r.getheader("Content-Type", "").startswith(ARROW):
            import pyarrow as pa

            return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        return json.loads(data)["predictions"]


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def concurrent(port: int, body: bytes, clients: int, each: int) -> tuple[float, list[float]]:
    """``clients`` threads, each with its own connection, send ``each`` requests in a row;
    (requests/s over the whole, every request's latency)."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client():
        c = Client(port)
        c.post(body, "application/json")  # connect and warm up
        mine = []
        start.wait()
        for _ in range(each):
            t = time.perf_counter()
            c.post(body, "application/json")
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return clients * each / (time.perf_counter() - t0), latencies


def scratch_champion(tracking_uri: str | None) -> tuple[str, str]:
    """(tracking URI, model URI) of a champion: the configured one, or a scratch registration."""
    import mlflow

    from sae_pipeline.config import build_config
    from sae_pipeline.registry import tracking

    cfg = build_config({}, {"registry.tracking_uri": tracking_uri} if tracking_uri else {})
    uri = tracking.tracking_uri(cfg)
    name = cfg.registry.encoder_model_name
    if tracking.alias_version(tracking.client(cfg), name, "champion") is not None:
        return uri, f"models:/{name}@champion"
    root = REPO / ".cache" / "bench-service"
    cfg = build_config(
        {},
        {"artifacts_root": str(root), "registry.tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
    )
    c = tracking.client(cfg)
    if tracking.alias_version(c, name, "champion") is None:
        from sae_pipeline.data.contract import Contract
        from sae_pipeline.data.scaling import fit_scaler
        from sae_pipeline.data.sources import load_sklearn
        from sae_pipeline.engine.encoder import Encoder
        from sae_pipeline.engine.net import Architecture, build_net

        frame = load_sklearn("digits").drop(columns="target")
        cols = list(frame.columns)
        net = build_net(Architecture(len(cols), [256, 64, 10]), seed=0).eval()
        encoder = Encoder(
            Contract(cols, dict.fromkeys(cols, "float64")),
            fit_scaler("minmax", frame.to_numpy(dtype=np.float64)),
            net,
        )
        run = tracking.find_or_create_run(cfg, "bench-service", {})
        versions = tracking.register_encoder(cfg, run, "bench-service", encoder, frame.head(20), {})
        tracking.set_alias(cfg, name, "champion", versions["encoder"])
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    return tracking.tracking_uri(cfg), f"models:/{name}@champion"


def peak_rss(pid: int, invocations: str, limit_mb: float = 64) -> str:
    """Post the largest JSON body under the limit (full-precision floats; the worst case per
    byte) and read the server's peak RSS (VmHWM) before and after."""
    import http.client
    from urllib.parse import urlsplit

    def status(key: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    rng = np.random.default_rng(0)
    cols = [f"pixel_{i}" for i in range(64)]
    per_row = len(json.dumps(rng.random((1000, 64)).tolist())) / 1000
    n = int(limit_mb * 2**20 * 0.98 / per_row)
    body = json.dumps({"dataframe_split": {"columns": cols, "data": rng.random((n, 64)).tolist()}})
    body = body.encode()
    idle = status("VmRSS")
    url = urlsplit(invocations)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    t = time.perf_counter()
    conn.request("POST", url.path, body, {"Content-Type": "application/json"})
    answer = conn.getresponse()
    answer.read()
    took = time.perf_counter() - t
    peak = status("VmHWM")
    return (
        f"{len(body) / 2**20:.1f} MB JSON body ({n:,} rows): status {answer.status} in "
        f"{took:.1f} s; server RSS idle {idle / 2**20:.0f} MB, peak {peak / 2**20:.0f} MB "
        f"(+{(peak - idle) / len(body):.1f}x the body)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, alias: str, env: dict[str, str], plain: bool = False):
    """A supervised server (``sae-pipeline serve``'s child) on a free port, ready."""
    import mlflow

    from sae_pipeline.registry import service

    os.environ.update(env)
    try:
        logs = Path(tempfile.mkdtemp(prefix="bench-service-"))
        sup = service.Supervisor(name, alias=alias, port=free_port(), plain=plain, log_dir=logs)
        t0 = time.perf_counter()
        if not sup.step(mlflow.MlflowClient()):
            raise SystemExit(f"the server did not start (logs in {logs})")
    finally:
        for k in env:
            os.environ.pop(k, None)
    print(f"{'plain' if plain else env or 'service'}: ready after "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)  # fmt: skip
    return sup


def vm(pid: int, key: str) -> int:
    """The largest ``key`` (VmHWM, VmRSS) of ``pid`` and its descendants: ``mlflow models
    serve`` answers from a uvicorn process below the CLI process the supervisor started."""
    with open(f"/proc/{pid}/status") as f:
        own = next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    return max([own, *(vm(int(c), key) for c in children)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-uri", help="the model to serve (default: the champion)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    p.add_argument("--latency-requests", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="timed repeats of 10,000-row requests")
    p.add_argument("--clients", type=int, default=32, help="concurrent single-row clients")
    p.add_argument("--each", type=int, default=10, help="requests per concurrent client")
    p.add_argument(
        "--threads", type=int,
        help="torch threads, here and in the servers it starts (default: torch's own choice)",
    )  # fmt: skip
    p.add_argument(
        "--peak-rss", action="store_true",
        help="only post one maximum-size JSON body to a server started here; print its peak RSS",
    )  # fmt: skip
    args = p.parse_args()
    if args.threads:  # before torch is imported here and in the server processes
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import mlflow
    import pandas as pd
    import torch

    from sae_pipeline.data.sources import load_sklearn
    from sae_pipeline.registry import bundle
    from sae_pipeline.registry.client import to_arrow

    if args.model_uri and args.tracking_uri:
        tracking_uri, model_uri = args.tracking_uri, args.model_uri
    else:
        tracking_uri, found = scratch_champion(args.tracking_uri)
        model_uri = args.model_uri or found
    mlflow.set_tracking_uri(tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    alias = alias or "champion"

    if args.peak_rss:
        sup = start(name, alias, {})
        try:
            url = f"http://127.0.0.1:{sup.live.port}/invocations"
            print(peak_rss(sup.live.proc.pid, url))
        finally:
            sup.live.stop()
        return 0

    model = mlflow.pyfunc.load_model(model_uri)
    encoder = bundle.load_encoder(model_uri, tracking_uri)
    digits = load_sklearn("digits")[encoder.contract.feature_columns]
    frames = {n: pd.concat([digits] * (n // len(digits) + 1), ignore_index=True).iloc[:n]
              for n in (1, 10_000)}  # fmt: skip
    xs = {n: torch.from_numpy(encoder.scaler.transform(f.to_numpy()).astype(np.float32))
          for n, f in frames.items()}  # fmt: skip

    def json_body(f):
        return json.dumps({"dataframe_split": json.loads(f.to_json(orient="split"))}).encode()

    bodies = {
        n: {
            "JSON": (json_body(f), "application/json", None),
            "CSV": (f.to_csv(index=False).encode(), "text/csv", None),
            "Arrow": (to_arrow(f), ARROW, ARROW),
        }
        for n, f in frames.items()
    }
    want = encoder.transform(frames[10_000]).to_numpy()
    cols = ["service, batching on", "service, batching off", "mlflow models serve",
            "in-process predict", "bare forward"]  # fmt: skip
    cell: dict[tuple[str, str], str] = {}

    def ms(v: list[float], q: float) -> str:
        return f"{np.quantile(v, q) * 1000:.2f} ms"

    def forward(n):
        with torch.inference_mode():
            encoder.net.encode(xs[n])

    rates: dict = {}
    for col, fn in (("in-process predict", model.predict), ("bare forward", None)):
        one = (lambda: forward(1)) if fn is None else (lambda fn=fn: fn(frames[1]))
        bulk = (lambda: forward(10_000)) if fn is None else (lambda fn=fn: fn(frames[10_000]))
        lat = timed(one, args.latency_requests)
        cell["p50", col], cell["p99", col] = ms(lat, 0.5), ms(lat, 0.99)
        rates[col] = rate = 10_000 / statistics.median(timed(bulk, args.repeat))
        for kind in ("JSON", "CSV", "Arrow"):
            cell[kind, col] = f"{rate:,.0f}"

    servers = (
        ("service, batching on", {}, False),
        ("service, batching off", {"SAE_SERVE_BATCH_MAX_ROWS": "0"}, False),
        ("mlflow models serve", {}, True),
    )
    for col, env, plain in servers:
        sup = start(name, alias, env, plain)
        try:
            c = Client(sup.live.port)
            got = c.post(bodies[10_000]["JSON"][0], "application/json")
            np.testing.assert_allclose(pd.DataFrame(got).to_numpy(), want, rtol=1e-4, atol=1e-5)
            if col != "service, batching off":
                lat = timed(lambda c=c: c.post(*bodies[1]["JSON"][:2]), args.latency_requests)
                cell["p50", col], cell["p99", col] = ms(lat, 0.5), ms(lat, 0.99)
                for kind, (body, ctype, accept) in bodies[10_000].items():
                    if plain and kind == "Arrow":
                        cell[kind, col] = "not offered"
                        continue
                    t = timed(lambda c=c, b=body, ct=ctype, a=accept: c.post(b, ct, a),
                              args.repeat)  # fmt: skip
                    rates[kind, col] = 10_000 / statistics.median(t)
                    cell[kind, col] = f"{rates[kind, col]:,.0f}"
            rps, lat = concurrent(sup.live.port, bodies[1]["JSON"][0], args.clients, args.each)
            rates["concurrent", col] = rps
            cell["crate", col], cell["cp99", col] = f"{rps:,.0f}", ms(lat, 0.99)
            cell["rss", col] = f"{vm(sup.live.proc.pid, 'VmHWM') / 2**20:,.0f} MB"
        finally:
            sup.live.stop()

    rows = (
        ("p50", "1-row latency p50 (sequential, JSON)"),
        ("p99", "1-row latency p99 (sequential, JSON)"),
        ("crate", f"{args.clients} concurrent 1-row clients: rows/s"),
        ("cp99", f"{args.clients} concurrent 1-row clients: latency p99"),
        ("JSON", "rows/s, 10,000-row requests, JSON"),
        ("CSV", "rows/s, 10,000-row requests, CSV"),
        ("Arrow", "rows/s, 10,000-row requests, Arrow"),
        ("rss", "server peak RSS (VmHWM, largest process) over the run"),
    )
    lines = ["| measure | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(cell.get((key, c), "-") for c in cols) + " |"
              for key, label in rows]  # fmt: skip
    print(f"model {model_uri} ({encoder.net.arch.dims}), tracking {tracking_uri}\n")
    print("\n".join(lines))
    on, plain_col = "service, batching on", "mlflow models serve"
    arrow = rates["Arrow", on] / rates["in-process predict"]
    conc = rates["concurrent", on] / rates["concurrent", plain_col]
    print(f"\nArrow 10,000-row requests / in-process predict: {arrow:.2f} (aim 0.5)")
    off = rates["concurrent", "service, batching off"] / rates["concurrent", plain_col]
    print(f"{args.clients} concurrent clients / mlflow models serve: batching on {conc:.1f}x "
          f"(aim 3x), batching off {off:.1f}x")  # fmt: skip
    print(f"1-row p50 with batching on: {cell['p50', on]} (aim 3 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
