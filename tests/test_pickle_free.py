"""No pickle is read in the load and resume paths: a grep over the package and the DAGs.

Registered models load from JSON + npz (``allow_pickle=False``), the steps keep the scaler as
JSON, and every ``torch.load`` (checkpoints, layer weights) passes ``weights_only=True``. The
one exception is ``registry/migrate.py``: the hand-run command that reads a legacy version's
scikit-learn scaler once to re-register it without pickle.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXEMPT = {"sae_pipeline/registry/migrate.py"}
FORBIDDEN = re.compile(
    r"\bimport (?:cloud)?pickle\b|\bpickle\.loads?\(|cloudpickle|joblib\.load\b|read_pickle"
    r"|weights_only\s*=\s*False|allow_pickle\s*=\s*True|serialization_format\s*="
)
TORCH_LOAD = re.compile(r"torch\.load\((?P<args>[^()]*(?:\([^()]*\)[^()]*)*)\)")


def sources() -> list[Path]:
    files = sorted([*(REPO / "sae_pipeline").rglob("*.py"), *(REPO / "dags").glob("*.py")])
    return [p for p in files if p.relative_to(REPO).as_posix() not in EXEMPT]


def offences(text: str) -> list[str]:
    found = [m.group(0) for m in FORBIDDEN.finditer(text)]
    found += [m.group(0) for m in TORCH_LOAD.finditer(text) if "weights_only=True" not in m["args"]]
    return found


def test_no_pickle_in_the_load_and_resume_paths():
    bad = {
        p.relative_to(REPO).as_posix(): hits for p in sources() if (hits := offences(p.read_text()))
    }
    assert bad == {}
    assert len(sources()) > 40  # the walk found the package


def test_the_check_can_fail():
    assert offences("import joblib\nx = joblib.load(f)")
    assert offences("torch.load(path, map_location=dev)")
    assert offences("torch.load(io.BytesIO(b), weights_only=False)")
    assert offences("import cloudpickle")
    assert not offences("torch.load(io.BytesIO(read(uri)), map_location='cpu', weights_only=True)")
    assert not offences("np.load(path, allow_pickle=False)  # pickle-free")
