#!/usr/bin/env bash
# Creates the Python environment for sae-pipeline. Used by `make`, by CI and by the images in
# docker/, so that every place installs the same pinned tree (requirements.lock).
#
#   VENV            where the environment goes (default: .venv)
#   EXTRAS          optional extras (default: dev,distributed)
#   TORCH_INDEX_URL where torch comes from; unset: pip's default. On the dev machines a CPU wheel
#                   of torch lies in pip's find-links, so no multi-GB CUDA build is downloaded.
#                   The CPU image sets https://download.pytorch.org/whl/cpu, the CUDA image a
#                   CUDA index.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,distributed}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.lock)

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# torch first, and from pip: uv does not look at local wheel folders and would fetch a CUDA
# build. With torch installed, the locked resolve below finds it satisfied and leaves it.
torch_args=("torch==$TORCH_VERSION")
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    torch_args+=(--index-url "$TORCH_INDEX_URL")
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check "${torch_args[@]}" "uv==0.13.9"
"$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" \
    --constraints requirements.lock -e ".[$EXTRAS]"
echo "environment ready: $VENV"
