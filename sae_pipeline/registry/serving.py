"""The encoder service's HTTP app: MLflow's scoring protocol, with limits, batching and metrics.

``sae-pipeline serve`` runs this app (uvicorn) on a registered encoder. It keeps the contract of
MLflow's scoring server (``POST /invocations`` with JSON ``dataframe_split`` / ``dataframe_records``
/ ``instances`` / ``inputs`` and ``params``, CSV or Parquet; ``{"predictions": [...]}`` out;
``/ping``, ``/health``, ``/version``), so clients of ``mlflow models serve`` work unchanged, and
adds:

* **Arrow IPC stream** in and out (``application/vnd.apache.arrow.stream``), and CSV or Arrow
  answers on ``Accept``;
* **limits** on every content type: ``SAE_SERVE_MAX_BODY_MB`` (a larger ``Content-Length`` gets
  413 before a byte is read, a body streamed past it gets 413 as soon as it is), and
  ``SAE_SERVE_MAX_ROWS`` rows (413); malformed bodies (JSON nested past 1,024 levels, numbers
  past float64, ragged CSV rows) get 400;
* **adaptive batching** of concurrent requests (``batching.py``; ``SAE_SERVE_BATCH_MAX_ROWS``,
  ``SAE_SERVE_BATCH_MAX_WAIT_MS``);
* **Prometheus metrics** at ``/metrics``.

Every error body is ``{"error_code": ..., "message": <one line>}``; no message holds the
request's data beyond one cell's short repr where a value is named.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from sae_pipeline.registry import _wire
from sae_pipeline.registry._wire import RequestError

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_MB = 64
DEFAULT_MAX_ROWS = 100_000
DEFAULT_BATCH_MAX_ROWS = 4096
DEFAULT_BATCH_MAX_WAIT_MS = 0.0
INLINE_BYTES = 1 << 16  # bodies up to this size are parsed on the event loop, larger in a thread
KIND_LABELS = {_wire.JSON: "json", _wire.CSV: "csv", _wire.PARQUET: "parquet", _wire.ARROW: "arrow"}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20
    max_rows: int = DEFAULT_MAX_ROWS
    batch_max_rows: int = DEFAULT_BATCH_MAX_ROWS
    batch_max_wait_s: float = DEFAULT_BATCH_MAX_WAIT_MS / 1000

    @classmethod
    def from_env(cls, env=os.environ) -> Limits:
        """From ``SAE_SERVE_*``; an unset variable keeps its default, a bad one is refused."""

        def number(name: str, default: float, kind=int):
            raw = env.get(name)
            try:
                value = default if raw in (None, "") else kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None
            if value < 0 or (value == 0 and not name.startswith("SAE_SERVE_BATCH")):
                raise ValueError(f"{name}={raw!r} must be positive")
            return value

        return cls(
            max_body_bytes=int(number("SAE_SERVE_MAX_BODY_MB", DEFAULT_MAX_BODY_MB, float) * 2**20),
            max_rows=number("SAE_SERVE_MAX_ROWS", DEFAULT_MAX_ROWS),
            batch_max_rows=number("SAE_SERVE_BATCH_MAX_ROWS", DEFAULT_BATCH_MAX_ROWS),
            batch_max_wait_s=number("SAE_SERVE_BATCH_MAX_WAIT_MS", DEFAULT_BATCH_MAX_WAIT_MS, float)
            / 1000,
        )


class Metrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self, name: str, version: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        labels = ["content_type", "status"]
        self.requests = Counter(
            "sae_serve_requests", "/invocations requests by content type and status", labels,
            registry=r,
        )  # fmt: skip
        self.rows = Counter(
            "sae_serve_rows", "rows received, by content type and status", labels, registry=r
        )
        self.latency = Histogram(
            "sae_serve_request_seconds", "/invocations latency (body read to answer written)",
            ["content_type"], registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.batch_rows = Histogram(
            "sae_serve_batch_rows", "rows per forward pass of the batcher", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536),
        )  # fmt: skip
        self.batch_requests = Histogram(
            "sae_serve_batch_requests", "requests merged into one forward pass", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )  # fmt: skip
        info = Gauge("sae_serve_model_info", "the model version served (value 1)",
                     ["name", "version"], registry=r)  # fmt: skip
        info.labels(name=name, version=version).set(1)

    def batch(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)


async def read_body(request, limit: int) -> bytearray:
    """The body, refused with 413 as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return body


def _too_large(limit: int) -> RequestError:
    return RequestError(
        413, f"request body is over {limit / 2**20:g} MB (SAE_SERVE_MAX_BODY_MB): split it"
    )


def create_app(model, name: str = "", version: str = "", limits: Limits | None = None):
    """The Starlette app serving ``model`` (a loaded pyfunc, or an ``EncoderBundle``)."""
    import mlflow
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    limits = limits or Limits.from_env()
    metrics = Metrics(name, version)
    bundle = _bundle_of(model)
    batcher = None
    # batching off (SAE_SERVE_BATCH_MAX_ROWS=0), or a bundle older than prepare/finish: none
    if bundle is not None and hasattr(bundle, "prepare") and limits.batch_max_rows > 0:
        from sae_pipeline.registry.batching import Batcher

        batcher = Batcher(bundle, limits.batch_max_rows, limits.batch_max_wait_s, metrics.batch)

    def error(status: int, message: str) -> Response:
        code = {400: "BAD_REQUEST", 413: "REQUEST_TOO_LARGE", 415: "BAD_REQUEST"}.get(
            status, "INTERNAL_ERROR"
        )
        return Response(
            _wire.orjson.dumps({"error_code": code, "message": message}),
            status_code=status,
            media_type=_wire.JSON,
        )

    async def offload(fn, *args, size: int):
        return fn(*args) if size <= INLINE_BYTES else await asyncio.to_thread(fn, *args)

    inflight = [0]  # requests between their first byte and their answer

    async def predict(frame, params, size: int):
        if bundle is None:
            return await asyncio.to_thread(model.predict, frame, params)
        output = bundle.output_option(params)
        if batcher is None:
            return await offload(bundle.predict, frame, params, size=size)
        x, xs, index = await offload(bundle.prepare, frame, size=size)
        return await batcher.run(x, xs, index, output, alone=lambda: inflight[0] == 1)

    async def invocations(request):
        t0 = time.perf_counter()
        mime = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        label, rows = KIND_LABELS.get(mime, "other"), 0
        inflight[0] += 1
        try:
            if not mime:
                raise RequestError(415, "Content-Type header missing: use " + _types())
            if mime not in _wire.CONTENT_TYPES:
                raise RequestError(415, "unsupported content type: use " + _types())
            body = await read_body(request, limits.max_body_bytes)
            frame, params = await offload(_wire.parse, mime, body, limits.max_rows, size=len(body))
            rows = len(frame)
            if "output" in request.query_params:  # the one param of bodies other than JSON
                params = {**params, "output": request.query_params["output"]}
            out = await predict(frame, params, len(body))
            kind = _wire.answer_kind(mime, request.headers.get("accept"))
            answer = await offload(_wire.encode, kind, out, size=len(body))
            response = Response(answer, media_type=kind)
        except RequestError as err:
            response = error(err.status, err.message)
        except Exception as err:
            if getattr(err, "error_code", None) == "BAD_REQUEST" and hasattr(err, "message"):
                response = error(400, str(err.message).splitlines()[0][:500])
            else:
                log.exception("serve: %s while answering a request", type(err).__name__)
                response = error(500, f"internal error ({type(err).__name__}); see the log")
        finally:
            inflight[0] -= 1
        status = str(response.status_code)
        metrics.requests.labels(label, status).inc()
        metrics.rows.labels(label, status).inc(rows)
        metrics.latency.labels(label).observe(time.perf_counter() - t0)
        return response

    async def ping(request):
        return Response("\n", media_type=_wire.JSON)

    async def version_route(request):
        return Response(mlflow.__version__, media_type=_wire.JSON)

    async def metrics_route(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/ping", ping),
            Route("/health", ping),
            Route("/version", version_route),
            Route("/metrics", metrics_route),
        ]
    )


def _types() -> str:
    return ", ".join(_wire.CONTENT_TYPES)


def _bundle_of(model):
    """The ``EncoderBundle`` (or ``ScalerBundle``) behind a loaded pyfunc, or None."""
    if hasattr(model, "output_option"):
        return model
    try:
        inner = model.unwrap_python_model()
    except Exception:
        return None
    bundle = getattr(inner, "bundle", None)
    return bundle if hasattr(bundle, "output_option") else None
