"""The encoder service against the same model in-process: latency and throughput, side by side.

Three ways to get codes from the champion, measured in one run on the same digits rows:

- **service**: HTTP POST to the running scoring server's ``/invocations`` (JSON
  ``dataframe_split`` and CSV bodies, serialised before the clock starts; the clock covers
  the request, the answer and parsing its JSON);
- **in-process predict**: ``mlflow.pyfunc.load_model(uri).predict(frame)``, the same model
  files in this process (validation, scaling, network, frame out);
- **bare forward**: the network's encoder on rows already scaled, as float32 tensors: the floor.

Reported: single-row latency p50/p99, and rows/s for 1-, 100- and 10,000-row requests, as a
markdown table. Aim: for 10,000-row requests the service reaches at least half of in-process
predict throughput.

    .venv/bin/python bench/bench_service.py                       # starts a server itself
    .venv/bin/python bench/bench_service.py --url http://127.0.0.1:5001 --model-uri models:/...

Without ``--url`` it serves ``--model-uri`` (default: the config's encoder ``@champion``) with
``sae-pipeline serve``'s server on a free port; if the registry has no champion, it registers
an untrained encoder of the default architecture (64 -> 256 -> 64 -> 10; speed does not
depend on training) in a scratch store under .cache/.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def post(url: str, body: bytes, content_type: str) -> list:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["predictions"]


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


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


def server_stages(model, frame, bodies: tuple[bytes, bytes]) -> dict[str, float]:
    """Median seconds of each stage the scoring server runs for one request."""
    import io

    from mlflow.pyfunc import scoring_server as ss

    out = model.predict(frame)
    stages = {
        "parse JSON": lambda: ss.infer_and_parse_data(json.loads(bodies[0])),
        "parse CSV": lambda: ss.parse_csv_input(io.StringIO(bodies[1].decode())),
        "predict": lambda: model.predict(frame),
        "write JSON answer": lambda: ss.predictions_to_json(out, io.StringIO()),
    }
    return {k: statistics.median(timed(fn, 3)) for k, fn in stages.items()}


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running service (default: start one)")
    p.add_argument("--model-uri", help="the model the service serves (default: the champion)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    p.add_argument("--latency-requests", type=int, default=200)
    p.add_argument("--repeat", type=int, default=5, help="timed repeats per batch size")
    p.add_argument(
        "--peak-rss", action="store_true",
        help="only post one maximum-size JSON body to a server started here; print its peak RSS",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int,
        help="torch threads, here and in the server it starts (default: torch's own choice)",
    )  # fmt: skip
    args = p.parse_args()
    if args.threads:  # before torch is imported here and in the server process
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    import mlflow
    import pandas as pd
    import torch

    from sae_pipeline.data.sources import load_sklearn
    from sae_pipeline.registry import bundle, service

    if args.model_uri and args.tracking_uri:
        tracking_uri, model_uri = args.tracking_uri, args.model_uri
    else:
        tracking_uri, found = scratch_champion(args.tracking_uri)
        model_uri = args.model_uri or found
    mlflow.set_tracking_uri(tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri

    sup = None
    url = args.url
    if url is None:
        port = free_port()
        name, _, version = model_uri.removeprefix("models:/").partition("@")
        logs = Path(tempfile.mkdtemp(prefix="bench-service-"))
        sup = service.Supervisor(name, alias=version or "champion", port=port, log_dir=logs)
        t0 = time.perf_counter()
        if not sup.step(mlflow.MlflowClient()):
            raise SystemExit(f"the service did not start (logs in {sup.log_dir})")
        print(f"service on :{port} ready after {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        url = f"http://127.0.0.1:{port}"
    invocations = url.rstrip("/") + "/invocations"
    if args.peak_rss:
        try:
            print(peak_rss(sup.live.proc.pid, invocations))
        finally:
            sup.live.stop()
        return 0
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        encoder = bundle.load_encoder(model_uri)
        digits = load_sklearn("digits")[encoder.contract.feature_columns]
        frames = {
            n: pd.concat([digits] * (n // len(digits) + 1), ignore_index=True).iloc[:n]
            for n in (1, 100, 10_000)
        }
        xs = {n: torch.from_numpy(encoder.scaler.transform(f.to_numpy()).astype(np.float32))
              for n, f in frames.items()}  # fmt: skip

        def json_body(f):
            return json.dumps({"dataframe_split": json.loads(f.to_json(orient="split"))}).encode()

        bodies = {n: (json_body(f), f.to_csv(index=False).encode()) for n, f in frames.items()}
        check = np.array(
            [list(r.values()) for r in post(invocations, bodies[100][0], "application/json")]
        )
        np.testing.assert_allclose(
            check, encoder.transform(frames[100]).to_numpy(), rtol=1e-4, atol=1e-5
        )

        def forward(n):
            with torch.inference_mode():
                encoder.net.encode(xs[n])

        ways = {
            "service (JSON)": lambda n: post(invocations, bodies[n][0], "application/json"),
            "service (CSV)": lambda n: post(invocations, bodies[n][1], "text/csv"),
            "in-process predict": lambda n: model.predict(frames[n]),
            "bare forward": forward,
        }
        lat = {w: timed(lambda fn=fn: fn(1), args.latency_requests) for w, fn in ways.items()}
        stages = server_stages(model, frames[10_000], bodies[10_000])
        rate = {}
        for w, fn in ways.items():
            for n in frames:
                reps = args.repeat if n > 1 else args.latency_requests
                rate[w, n] = n / statistics.median(timed(lambda fn=fn, n=n: fn(n), reps))
    finally:
        if sup is not None and sup.live is not None:
            sup.live.stop()

    def ms(v: list[float], q: float) -> str:
        return f"{np.quantile(v, q) * 1000:.2f} ms"

    cols = list(ways)
    lines = [
        "| measure | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| 1-row latency p50 | " + " | ".join(ms(lat[w], 0.5) for w in cols) + " |",
        "| 1-row latency p99 | " + " | ".join(ms(lat[w], 0.99) for w in cols) + " |",
    ]
    for n in frames:
        lines.append(
            f"| rows/s, {n:,}-row requests | "
            + " | ".join(f"{rate[w, n]:,.0f}" for w in cols)
            + " |"
        )
    best = max(rate["service (JSON)", 10_000], rate["service (CSV)", 10_000])
    ratio = best / rate["in-process predict", 10_000]
    print(f"model {model_uri} ({encoder.net.arch.dims}), tracking {tracking_uri}\n")
    print("\n".join(lines))
    print(
        "\nWhere a 10,000-row request's time goes in MLflow's scoring server (its own functions,"
        " timed here): " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items())
    )
    print(
        f"\n10,000-row requests: service / in-process predict = {ratio:.2f} "
        f"({'meets' if ratio >= 0.5 else 'misses'} the 0.5 aim)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
