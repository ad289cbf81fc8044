"""Phase checkpoints that resume on any device.

A checkpoint is read onto the CPU whatever device wrote it (``load``): the network and
optimizer states then go to the parameters' device through ``load_state_dict``, and the
random generators' states stay where PyTorch accepts them, as CPU byte tensors. Loading with
``map_location=<cuda>`` moved those onto the GPU, where ``torch.set_rng_state`` refuses them
(a retried GPU task never recovered).

Each checkpoint records the device type that wrote it and the states of the phase's generator,
of torch's CPU generator and, on CUDA, of the CUDA generator (dropout draws from it there).
A state resumes only on the device type that made it: a CPU generator's state (the Mersenne
Twister, 5,056 bytes) means nothing to a CUDA generator (Philox: seed and offset), and the
other way round. Where a state cannot carry over, the run reseeds from (seed, epoch, step),
so the resumed run is still a pure function of its checkpoint, and logs that it did.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_CPU_STATE_BYTES = 5056  # torch.Generator("cpu").get_state(): mt19937 state + extras


def load(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` with every tensor on the CPU (or left on ``meta``)."""
    # Tensors and plain containers only (optimizer state, RNG states as byte tensors,
    # history as lists): the restricted unpickler reads it, no arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """What a checkpoint keeps of the generators: all CPU byte tensors, plus the device type."""
    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "gen": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None,
    }


def saved_device(state: dict[str, Any]) -> str:
    """The device type that wrote ``state``; older checkpoints by their generator's size."""
    if "device" in state:
        return state["device"]
    gen = state.get("gen")
    return "cpu" if gen is not None and gen.numel() == _CPU_STATE_BYTES else "cuda"


def _usable(t: Any) -> torch.Tensor | None:
    """``t`` as a CPU byte tensor, or None where it holds no data (``meta``) or is no state."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.device.type == "meta":
        return None
    return t.cpu()


def reseed(seed: int, epoch: int, step: int) -> int:
    """The seed a resumed run uses where saved states cannot carry over: (seed, epoch, step)."""
    return int(np.random.default_rng([seed, epoch, step]).integers(2**62))


def restore_rng(
    state: dict[str, Any], gen: torch.Generator, device: torch.device, seed: int, desc: str
) -> torch.Tensor | None:
    """Restore the generators from ``state`` where they carry over to ``device``, reseed the
    rest from (seed, epoch, step); return the epoch-start state of ``gen`` for a mid-epoch
    resume, or None when it could not carry over (the epoch's order is then reseeded too)."""
    written_on = saved_device(state)
    same = written_on == device.type
    epoch, step = state.get("epoch", 0), state.get("step", 0)
    fresh = reseed(seed, epoch, step)
    lost = []

    cpu_rng = _usable(state.get("torch_rng"))
    if cpu_rng is not None and cpu_rng.numel() == _CPU_STATE_BYTES:
        torch.set_rng_state(cpu_rng)
    else:
        torch.manual_seed(fresh)  # also seeds CUDA: restored just below where it can be
        lost.append("torch")
    gen_state = _usable(state.get("gen")) if same else None
    try:
        if gen_state is None:
            raise ValueError
        gen.set_state(gen_state)
    except (RuntimeError, ValueError):
        gen.manual_seed(fresh)
        lost.append("phase generator")
    if device.type == "cuda":
        cuda_rng = _usable(state.get("cuda_rng")) if same else None
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        else:
            torch.cuda.manual_seed(fresh)
            lost.append("cuda")
    carried = same and "phase generator" not in lost
    epoch_state = _usable(state.get("gen_epoch")) if carried else None
    if lost:
        log.warning(
            "%s: checkpoint written on %s resumed on %s; %s state(s) could not carry over, "
            "reseeded with %d (from seed %d, epoch %d, step %d)",
            desc, written_on, device.type, ", ".join(lost), fresh, seed, epoch, step,
        )  # fmt: skip
    return epoch_state
