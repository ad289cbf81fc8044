"""bench/cuda_check.py, the prepared script for a lent GPU: its ``--cpu`` dry run runs every
section here, so that the script cannot rot before a GPU runs it."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "cuda_check.py"
SECTIONS = ["== environment", "== codes", "== resume", "== training samples/s",
            "== streamed training, layer 2", "== batch encoding", "== serving runtime"]  # fmt: skip


def _module():
    spec = importlib.util.spec_from_file_location("_cuda_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_section_and_passes():
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu"], capture_output=True,
                          text=True, timeout=600, cwd=REPO)  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    positions = [out.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    for setup in ("AMP + autograd", "fp32 autograd", "fp32 fast path", "CPU fast path"):
        assert setup in out
    assert "codes of the tiled rows repeat" in out and "== 0 failure(s)" in out
    assert "[FAIL]" not in out


def test_a_nan_or_a_mismatch_is_a_failure():
    report = _module().Report()
    assert report.finite("loss", [0.1, 0.2]) and not report.failures
    assert not report.finite("loss", [0.1, float("nan")])
    assert not report.close("codes", np.zeros(3), np.array([0.0, 0.0, 0.1]))
    assert not report.close("codes", np.zeros(3), np.zeros(4))
    assert len(report.failures) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_the_full_run_says_why_and_exits_non_zero(capsys):
    assert _module().main([]) == 2
    assert "no CUDA: " in capsys.readouterr().out
