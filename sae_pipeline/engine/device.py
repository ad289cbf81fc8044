"""The device policy: which device a task trains on, why CUDA is missing, and when AMP pays.

``training.device: cuda`` (configs/distributed.yaml) makes CUDA a requirement: a worker that
cannot give it fails at once with ``DeviceError``, naming the cause (a CPU-only PyTorch build,
``CUDA_VISIBLE_DEVICES`` hiding every GPU, the driver's own message), instead of training on
the CPU under the heavy tasks' long timeout. ``auto`` takes CUDA when present, else the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sae_pipeline.errors import DeviceError

# AMP (bf16 autocast) pays only where matrix products dominate a step: a network whose widest
# layer has at least this many units. Below it a step is bound by kernel launches, autocast
# only adds cast kernels, and it rules out the fp32 fast path (trainer.ManualChain). The
# threshold is where the arithmetic of one (batch x width) @ (width x width) product outgrows
# the fixed cost of a launch; bench/cuda_check.py times both sides on a GPU.
AMP_MIN_WIDTH = 1024

_HIDDEN = ("", "-1", "none", "NoDevFiles")  # CUDA_VISIBLE_DEVICES values that hide every GPU


def driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version, or None where none is loaded."""
    try:
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    words = line.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), line.strip())


def cuda_unavailable_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False here, in words an operator can act on."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "unset" if visible is None else repr(visible)
    driver = driver_version()
    where = (
        f"CUDA_VISIBLE_DEVICES {shown}, "
        f"driver {driver or 'not loaded (no /proc/driver/nvidia/version)'}"
    )
    if torch.version.cuda is None:
        return (
            f"this PyTorch ({torch.__version__}) is a CPU-only build; GPU workers need the "
            f"CUDA image (docker/Dockerfile, target cuda); {where}"
        )
    if visible is not None and visible.strip() in _HIDDEN:
        return f"CUDA_VISIBLE_DEVICES {shown} hides every GPU from this worker; {where}"
    try:
        torch.cuda.init()
    except Exception as err:  # the driver's own words: missing, too old for the runtime, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"the CUDA {torch.version.cuda} runtime cannot start: {first}; {where}"
    return f"no GPU is visible to the CUDA {torch.version.cuda} runtime; {where}"


def resolve_device(device: str = "auto") -> torch.device:
    """CUDA when asked for or (``auto``) when present, else CPU; ``cuda`` without a usable
    GPU raises ``DeviceError`` (not retryable: the same worker would fail the same way)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"training.device is 'cuda' but this worker cannot use CUDA: "
            f"{cuda_unavailable_reason()}"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def describe(device: torch.device) -> str:
    """The device a task used, for its MLflow tag: ``cpu`` or ``cuda:0 (<name>, CUDA x.y)``."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    return f"cuda:{index} ({name}, CUDA {torch.version.cuda}, driver {driver_version()})"


def amp_pays(amp: bool, device: torch.device, params: list[torch.Tensor]) -> bool:
    """Whether a phase trains under bf16 autocast: ``amp`` asked for, on CUDA, and a weight
    matrix at least ``AMP_MIN_WIDTH`` wide (the rule above); fp32 everywhere else."""
    if not amp or device.type != "cuda":
        return False
    return any(p.dim() == 2 and max(p.shape) >= AMP_MIN_WIDTH for p in params)
