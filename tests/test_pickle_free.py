"""No pickle is read in the load and resume paths: a syntax-tree check of the package and the DAGs.

Registered models load from JSON + npz (``allow_pickle=False``), the steps keep the scaler as
JSON, and every ``torch.load`` (checkpoints, layer weights) passes ``weights_only=True``. The
one exception is ``registry/migrate.py``: the hand-run command that reads a legacy version's
scikit-learn scaler once to re-register it without pickle.

The check parses each file with ``ast`` and follows import aliases (``import torch as t``,
``from torch import load``), so a call is found at any nesting depth of its arguments and
whatever name it goes by.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXEMPT = {"sae_pipeline/registry/migrate.py"}

# Modules whose import alone is an offence: each exists to (un)pickle.
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
# Calls that unpickle whatever their arguments.
UNPICKLING_CALLS = {"pandas.read_pickle", "numpy.load_pickle", "torch.serialization._load"}
# MLflow flavours whose load_model unpickles (pyfunc models-from-code load Python code instead).
PICKLING_FLAVOURS = {"sklearn", "pytorch", "keras", "xgboost", "lightgbm", "statsmodels"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def _is_const(node: ast.expr, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class _Checker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.aliases: dict[str, str] = {"pd": "pandas", "np": "numpy"}
        self.found: list[str] = []

    def _full(self, node: ast.expr) -> str | None:
        name = _dotted(node)
        if name is None:
            return None
        head, _, rest = name.partition(".")
        full = self.aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    def _flag(self, node: ast.AST, what: str) -> None:
        self.found.append(f"line {getattr(node, 'lineno', '?')}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] in PICKLE_MODULES:
                self._flag(node, f"import {a.name}")
            self.aliases[a.asname or a.name.split(".")[0]] = (
                a.name if a.asname else a.name.split(".")[0]
            )
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in PICKLE_MODULES:
            self._flag(node, f"from {module} import ...")
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{module}.{a.name}"
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self._full(node.func) or ""
        kwargs = {k.arg: k.value for k in node.keywords}
        if name in {"importlib.import_module", "__import__"} and node.args:
            target = node.args[0]
            if isinstance(target, ast.Constant) and str(target.value).split(".")[0] in (
                PICKLE_MODULES
            ):
                self._flag(node, f"{name}({target.value!r})")
        if name in UNPICKLING_CALLS or name.endswith(".read_pickle") or name == "read_pickle":
            self._flag(node, name)
        parts = name.split(".")
        if parts[::2] == ["mlflow", "load_model"] and parts[1] in PICKLING_FLAVOURS:
            self._flag(node, name)
        if name in TORCH_LOADS and not _is_const(
            kwargs.get("weights_only", ast.Constant(None)), True
        ):
            self._flag(node, f"{name} without weights_only=True")
        for key, value in kwargs.items():
            if key == "weights_only" and not _is_const(value, True):
                self._flag(node, "weights_only other than True")
            elif key == "allow_pickle" and not _is_const(value, False):
                self._flag(node, "allow_pickle other than False")
            elif key in {"serialization_format", "pickle_module"}:
                self._flag(node, f"{key}=")
        self.generic_visit(node)


def offences(text: str) -> list[str]:
    """Every way ``text`` (Python source) may read a pickle, one line each."""
    checker = _Checker()
    checker.visit(ast.parse(text))
    return checker.found


def sources() -> list[Path]:
    files = sorted([*(REPO / "sae_pipeline").rglob("*.py"), *(REPO / "dags").glob("*.py")])
    return [p for p in files if p.relative_to(REPO).as_posix() not in EXEMPT]


def test_no_pickle_in_the_load_and_resume_paths():
    bad = {
        p.relative_to(REPO).as_posix(): hits for p in sources() if (hits := offences(p.read_text()))
    }
    assert bad == {}
    assert len(sources()) > 40  # the walk found the package


def test_the_check_can_fail():
    for bad in (
        "import joblib\nx = joblib.load(f)",
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import loads",
        "from _pickle import loads as l",
        "import importlib\nimportlib.import_module('pickle')",
        "import torch\ntorch.load(path, map_location=dev)",
        "import torch\ntorch.load(io.BytesIO(read_bytes(uri)), map_location='cpu')",
        "import torch\nf(g(h(torch.load(io.BytesIO(read(uri))))))",
        "import torch\ntorch.load(io.BytesIO(b), weights_only=False)",
        "import torch as t\nt.load(p)",
        "from torch import load\nload(p, weights_only=flag)",
        "import torch\ntorch.load(p, **options)",
        "import mlflow\nmlflow.sklearn.load_model(uri)",
        "import mlflow.pytorch\nmlflow.pytorch.load_model(uri)",
        "from mlflow import sklearn\nsklearn.load_model(uri)",
        "import pandas as pd\npd.read_pickle(p)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "mlflow.pytorch.log_model(m, 'x', serialization_format='pickle')",
    ):
        assert offences(bad), bad
    for good in (
        "import torch\ntorch.load(io.BytesIO(read(uri)), map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(path, allow_pickle=False)  # pickle-free",
        "import mlflow\nmlflow.pyfunc.load_model(uri)",
        "import json\njson.loads(s)",
    ):
        assert not offences(good), good


def test_the_check_finds_pickle_put_back_into_the_real_storage_module():
    """The check run on ``storage.py`` as it is, then with each way back to pickle put in."""
    text = (REPO / "sae_pipeline" / "storage.py").read_text()
    assert "weights_only=True" in text and not offences(text)
    assert offences(text.replace(", weights_only=True", ""))
    assert offences(text.replace("\nimport ", "\nfrom pickle import loads\nimport ", 1))
    assert offences(text.replace("allow_pickle=False", "allow_pickle=True"))
