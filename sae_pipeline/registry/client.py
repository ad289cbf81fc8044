"""A client of the encoder service: a DataFrame in, the codes as a DataFrame out, over Arrow.

    from sae_pipeline.registry.client import encode
    codes = encode("http://127.0.0.1:5001", frame)                  # code_0 ... code_<k-1>
    both = encode("http://127.0.0.1:5001", frame, output="all")     # + reconstruction_error ...

The frame travels as one Arrow IPC stream (``application/vnd.apache.arrow.stream``) and the
answer comes back the same way: no JSON on either side, float32 codes bit for bit as the
service computed them. Needs only pandas and pyarrow; the service's limits apply (split larger
frames, ``SAE_SERVE_MAX_ROWS`` rows and ``SAE_SERVE_MAX_BODY_MB`` per request).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import pandas as pd
import pyarrow as pa

from sae_pipeline.errors import RegistryError

ARROW = "application/vnd.apache.arrow.stream"


def to_arrow(frame: pd.DataFrame) -> bytes:
    """``frame`` (its columns; not its index) as an Arrow IPC stream."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def encode(url: str, frame: pd.DataFrame, output: str = "codes", timeout: float = 60):
    """The service's answer for ``frame`` as a DataFrame with ``frame``'s index.

    ``url`` is the service's root (``/invocations`` is added) or its ``/invocations`` URL;
    ``output`` as ``params.output`` (``codes``, ``reconstruction_error``, ``all``, ...). A
    refusal raises ``RegistryError`` with the service's status and one-line message."""
    base = url.rstrip("/")
    if not base.endswith("/invocations"):
        base += "/invocations"
    request = urllib.request.Request(
        f"{base}?{urllib.parse.urlencode({'output': output})}",
        data=to_arrow(frame),
        headers={"Content-Type": ARROW, "Accept": ARROW},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read()).get("message", "")
        except ValueError:
            message = ""
        raise RegistryError(f"the service answered {err.code}: {message}") from None
    out = pa.ipc.open_stream(pa.py_buffer(body)).read_all().to_pandas()
    out.index = frame.index
    return out
