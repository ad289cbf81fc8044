#!/usr/bin/env python3
"""The mlflow service's healthcheck: the server answers, and its artifact folder takes a write.

A server whose artifact store is not writable answers /health all the same while every upload
(models, plots, drift reports) fails; so the check writes and removes a probe file there too
(a local MLFLOW_ARTIFACTS_DESTINATION; an s3:// store is left to the server).
"""

import os
import sys
import urllib.request
import uuid
from pathlib import Path


def main() -> int:
    url = os.environ.get("MLFLOW_HEALTH_URL") or (
        f"http://localhost:{os.environ.get('MLFLOW_PORT', '5000')}/health"
    )
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except Exception as err:  # any failure to answer is unhealthy
        print(f"unhealthy: {url}: {err}", file=sys.stderr)
        return 1
    dest = os.environ.get("MLFLOW_ARTIFACTS_DESTINATION", "")
    if dest and ("://" not in dest or dest.startswith("file://")):
        probe = Path(dest.removeprefix("file://")) / f".healthcheck-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            print(f"unhealthy: artifact folder {dest} is not writable: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
