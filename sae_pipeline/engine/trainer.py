"""Training loops: greedy layer-wise pretraining and end-to-end fine-tuning.

One generic loop (``train_phase``) trains "an autoencoder" given a forward function and the
parameters to update; ``pretrain_layer`` and ``finetune`` only choose those. The loop is
deterministic on CPU for a given seed, uses CUDA when present (fp32 and the fast path; bf16
autocast only for wide layers, ``device.amp_pays``), stops early on validation loss and
restores the best weights, and can checkpoint every few epochs so that a killed task resumes
where it stopped, on any device (``_checkpoint``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_pipeline.config import ModelConfig, PhaseConfig
from sae_pipeline.engine import _checkpoint
from sae_pipeline.engine._fastpath import FusedAdamStep, Layer, ManualChain
from sae_pipeline.engine._progress import _Progress
from sae_pipeline.engine.device import amp_pays, resolve_device
from sae_pipeline.engine.net import StackedAutoencoderNet

log = logging.getLogger(__name__)

# the fast path and the device policy, re-exported
__all__ = ["FusedAdamStep", "Layer", "ManualChain", "resolve_device"]

ForwardFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class History:
    """Per-epoch losses of one phase; ``best_epoch`` is the one whose weights were kept."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0
    step_seconds: float = 0.0  # time inside optimisation steps only (throughput measurements)
    samples_seen: int = 0

    @property
    def best_val_loss(self) -> float:
        return self.val_loss[self.best_epoch] if self.best_epoch >= 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "best_epoch": self.best_epoch,
            "seconds": self.seconds,
            "step_seconds": self.step_seconds,
            "samples_seen": self.samples_seen,
        }


def as_tensor(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)


# ---- regularisers ----------------------------------------------------------------------------
def corrupt(x: torch.Tensor, model: ModelConfig, gen: torch.Generator) -> torch.Tensor:
    """Denoising input (Vincent et al. 2010): Gaussian noise or masking; training only."""
    if model.noise == "gaussian":
        return x + model.noise_level * torch.randn(x.shape, generator=gen, device=x.device)
    if model.noise == "masking":
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= model.noise_level
        return x * keep
    return x


def sparsity_penalty(code: torch.Tensor, model: ModelConfig) -> torch.Tensor | float:
    if model.sparsity == "l1":
        return model.sparsity_weight * code.abs().mean()
    if model.sparsity == "kl":
        rho = model.sparsity_target
        rho_hat = code.float().mean(dim=0).clamp(1e-6, 1 - 1e-6)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        return model.sparsity_weight * kl.sum()
    return 0.0


# ---- optimisation ----------------------------------------------------------------------------
def make_optimizer(params: list[torch.nn.Parameter], phase: PhaseConfig) -> torch.optim.Optimizer:
    lr, wd = phase.learning_rate, phase.weight_decay
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if phase.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    cls = torch.optim.AdamW if phase.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel updates every parameter in one call: on small models the per-step
    # optimizer overhead is a large share of the step.
    return cls(params, lr=lr, weight_decay=wd, fused=True)


def learning_rate(phase: PhaseConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` under the phase's schedule (a pure function of epoch,
    so a resumed run needs no scheduler state)."""
    lr = phase.learning_rate
    if phase.lr_schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, phase.epochs)))
    if phase.lr_schedule == "step":
        return lr * 0.3 ** (epoch // max(1, phase.epochs // 3))
    return lr


@torch.no_grad()
def mean_loss(forward: ForwardFn, x: torch.Tensor, batch: int = 4096) -> float:
    """Mean squared reconstruction error over all of ``x`` (no noise, eval mode)."""
    total = 0.0
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        recon, _ = forward(xb)
        total += F.mse_loss(recon.float(), xb, reduction="sum").item()
    return total / max(1, x.numel())


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---- the generic loop ------------------------------------------------------------------------
AUTO_MAX_SAMPLES = 20_000_000  # a streamed phase's budget when the config sets none


def step_budget(phase: PhaseConfig, rows: int, batch: int, streamed: bool) -> int:
    """Optimisation steps a phase may take: ``epochs`` over ``rows``, capped by ``max_steps``
    and ``max_samples``; streamed data with neither set is capped at ``AUTO_MAX_SAMPLES``."""
    caps = [phase.epochs * (rows // max(1, batch))]
    if phase.max_steps is not None:
        caps.append(phase.max_steps)
    if phase.max_samples is not None:
        caps.append(math.ceil(phase.max_samples / batch))
    if streamed and phase.max_steps is None and phase.max_samples is None:
        caps.append(math.ceil(AUTO_MAX_SAMPLES / batch))
    return min(caps)


def train_phase(
    net: StackedAutoencoderNet,
    forward: ForwardFn,
    params: list[torch.nn.Parameter],
    x_train: torch.Tensor | None,
    x_val: torch.Tensor | None,
    phase: PhaseConfig,
    model: ModelConfig,
    seed: int,
    *,
    desc: str = "train",
    amp: bool = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 5,
    checkpoint_every_steps: int | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    chain: tuple[list[Layer], int] | None = None,
    fast: bool = True,
    stream: Any = None,
    prep: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> History:
    """Train ``params`` to reconstruct the training rows through ``forward``; return the history.

    ``forward(x)`` gives ``(reconstruction, code)``. The rows are ``x_train`` (in memory,
    reshuffled each epoch) or ``stream`` (``engine.streaming.ShardStream``: shuffled batches
    read from a snapshot's shards), each batch passed through ``prep`` first (layer inputs).
    With ``checkpoint`` set, state is saved every ``checkpoint_every`` epochs and every
    ``checkpoint_every_steps`` steps (mid-epoch), and a run finding the file resumes from it.
    ``chain`` (the dense layers ``forward`` applies, and the index of the code layer) enables
    the autograd-free fast path where the configuration allows it; ``fast=False`` turns it off.
    """
    device = x_train.device if stream is None else next(net.parameters()).device
    torch.manual_seed(seed)  # dropout draws from the global generator
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = make_optimizer(params, phase)
    hist = History()
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs, start_epoch, start_step, total_steps = 0, 0, 0, 0
    running0, gen_epoch = 0.0, None
    n = len(x_train) if stream is None else stream.rows
    bs = min(phase.batch_size, n)
    budget = step_budget(phase, n, bs, stream is not None)
    x_check = x_val if x_val is not None and len(x_val) else x_train
    use_amp = amp_pays(amp, device, params)  # bf16 only for wide layers on CUDA (device.py)

    if checkpoint is not None and checkpoint.exists():
        state = _checkpoint.load(checkpoint)  # on the CPU, whatever device wrote it
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])  # moves its tensors to the parameters' device
        gen_epoch = _checkpoint.restore_rng(state, gen, device, seed, desc)
        hist = History(**state["history"])
        best_state, bad_epochs, start_epoch = state["best"], state["bad_epochs"], state["epoch"]
        start_step, total_steps = state.get("step", 0), state.get("total_steps", 0)
        running0 = state.get("running", 0.0)
        log.info(
            "%s resumed from %s at epoch %d step %d", desc, checkpoint, start_epoch, start_step
        )

    def save(epoch_next: int, step: int, running: float, gen_start) -> None:
        hist.seconds = time.perf_counter() - t0
        _atomic_torch_save(
            {
                "epoch": epoch_next, "step": step, "total_steps": total_steps,
                "running": running, "gen_epoch": gen_start,
                "net": net.state_dict(), "opt": opt.state_dict(),
                **_checkpoint.rng_state(gen, device), "history": hist.to_dict(),
                "best": best_state, "bad_epochs": bad_epochs,
            },
            checkpoint,
        )  # fmt: skip

    manual, opt_step = None, opt.step
    if fast and chain is not None and ManualChain.supported(model, use_amp):
        manual = ManualChain(chain[0], bs, chain[1], model)
        if FusedAdamStep.supported(opt):
            opt_step = FusedAdamStep(opt).step
    progress = _Progress(phase.epochs, desc)
    t0 = time.perf_counter() - hist.seconds
    for epoch in range(start_epoch, phase.epochs):
        if total_steps >= budget:
            log.info("%s: step budget of %d steps reached", desc, budget)
            break
        net.train()
        for group in opt.param_groups:
            group["lr"] = learning_rate(phase, epoch)
        skip, start_step = start_step, 0
        if stream is None:
            # mid-epoch resume: the epoch's permutation, then the generator as saved (or,
            # where the states could not carry over, both from the reseeded generator)
            replay = skip and gen_epoch is not None
            if replay:
                now = gen.get_state()
                gen.set_state(gen_epoch)
            gen_start = gen.get_state()
            perm = torch.randperm(n, generator=gen, device=device)
            if replay:
                gen.set_state(now)
            batches = (x_train[perm[i : i + bs]] for i in range(skip * bs, n - bs + 1, bs))
        else:
            gen_start = None
            batches = stream.epoch(epoch, skip)
        running, steps = torch.zeros((), device=device) + running0, skip
        running0 = 0.0
        t_steps = time.perf_counter()
        for xb in batches:  # the ragged last batch is dropped: steady step cost
            if prep is not None:
                xb = prep(xb)
            if manual is not None:
                loss = manual.step(corrupt(xb, model, gen), xb)
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    recon, code = forward(corrupt(xb, model, gen))
                    loss = F.mse_loss(recon.float(), xb)
                    total = loss + sparsity_penalty(code, model)
                opt.zero_grad(set_to_none=True)
                total.backward()
            opt_step()
            running += loss.detach()
            steps += 1
            total_steps += 1
            if on_step is not None:
                on_step(total_steps)
            if total_steps >= budget:
                break
            every = checkpoint_every_steps
            if checkpoint is not None and every and total_steps % every == 0:
                save(epoch, steps, running.item(), gen_start)
        if stream is not None:
            batches.close()  # stops the read-ahead thread when the budget ends the epoch early
        if device.type == "cuda":
            torch.cuda.synchronize()
        hist.step_seconds += time.perf_counter() - t_steps
        net.eval()
        train_loss = running.item() / max(1, steps)
        val_loss = mean_loss(forward, x_check)
        hist.train_loss.append(train_loss)
        hist.val_loss.append(val_loss)
        hist.samples_seen += steps * bs
        if hist.best_epoch < 0 or val_loss < hist.best_val_loss:
            hist.best_epoch, bad_epochs = epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            bad_epochs += 1
        progress.update(epoch, train_loss, val_loss)
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val_loss)
        stop = (phase.patience > 0 and bad_epochs >= phase.patience) or (
            total_steps >= budget and epoch + 1 < phase.epochs
        )
        if checkpoint is not None and ((epoch + 1) % checkpoint_every == 0 or stop):
            save(epoch + 1 if not stop else phase.epochs, 0, 0.0, None)
        if stop:
            log.info("%s stopped at epoch %d (best %d)", desc, epoch + 1, hist.best_epoch + 1)
            break
    progress.close()
    if best_state is not None:
        net.load_state_dict(best_state)  # early stopping keeps the best epoch, not the last
    net.eval()
    hist.seconds = time.perf_counter() - t0
    return hist


# ---- the two phases ---------------------------------------------------------------------------
def _dense_chain(net: StackedAutoencoderNet, layers: list[int]) -> tuple[list[Layer], int] | None:
    """The fast path's view of encoders ``layers`` then their decoders in reverse order."""
    if net.arch.batch_norm or net.arch.tied_weights:
        return None
    enc = [
        Layer(net.encoders[k].weight, net.encoders[k].bias, net.encoder_activation(k))
        for k in layers
    ]
    dec = [
        Layer(net.decoders[k].weight, net.decoders[k].bias, net.decoder_activation(k))
        for k in reversed(layers)
    ]
    return enc + dec, len(layers) - 1


@torch.no_grad()
def layer_inputs(net: StackedAutoencoderNet, k: int, x: torch.Tensor, batch: int = 8192):
    """Codes of the frozen layers 0..k-1 for ``x``: the training input of layer k."""
    net.eval()
    if k == 0:
        return x
    return torch.cat([net.encode(x[i : i + batch], upto=k) for i in range(0, len(x), batch)])


def pretrain_layer(
    net: StackedAutoencoderNet,
    k: int,
    x_train: torch.Tensor,
    x_val: torch.Tensor | None,
    phase: PhaseConfig,
    model: ModelConfig,
    seed: int,
    **kwargs: Any,
) -> History:
    """Greedy step: train layer k as an autoencoder on the codes of frozen layers 0..k-1."""
    h_train = layer_inputs(net, k, x_train) if x_train is not None else None
    h_val = layer_inputs(net, k, x_val) if x_val is not None else None
    if x_train is None and k > 0:  # streamed: each batch through the frozen layers below

        @torch.no_grad()
        def prep(xb: torch.Tensor) -> torch.Tensor:
            net.eval()
            h = net.encode(xb, upto=k)  # (batch, hidden_dims[k-1])
            net.train()
            return h

        kwargs["prep"] = prep
    params = net.layer_parameters(k)
    trainable = {id(p) for p in params}
    for p in net.parameters():
        p.requires_grad_(id(p) in trainable)

    def forward(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = net.encode_layer(k, h)
        return net.decode_layer(k, code), code

    try:
        return train_phase(
            net,
            forward,
            params,
            h_train,
            h_val,
            phase,
            model,
            seed,
            desc=f"layer {k + 1}",
            chain=_dense_chain(net, [k]),
            **kwargs,
        )
    finally:
        for p in net.parameters():
            p.requires_grad_(True)


def finetune(
    net: StackedAutoencoderNet,
    x_train: torch.Tensor,
    x_val: torch.Tensor | None,
    phase: PhaseConfig,
    model: ModelConfig,
    seed: int,
    **kwargs: Any,
) -> History:
    """End-to-end training of the whole stack on reconstruction of the input."""
    return train_phase(
        net, net, list(net.parameters()), x_train, x_val, phase, model, seed, desc="fine-tune",
        chain=_dense_chain(net, list(range(net.arch.n_layers))), **kwargs,
    )  # fmt: skip


@torch.no_grad()
def encode_array(net: StackedAutoencoderNet, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Codes for a float array, in eval mode, on the network's device."""
    device = next(net.parameters()).device
    net.eval()
    out = [
        net.encode(as_tensor(x[i : i + batch], device)).float().cpu()
        for i in range(0, len(x), batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, net.arch.hidden_dims[-1]), np.float32)


@torch.no_grad()
def reconstruct_array(net: StackedAutoencoderNet, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    device = next(net.parameters()).device
    net.eval()
    out = [
        net(as_tensor(x[i : i + batch], device))[0].float().cpu() for i in range(0, len(x), batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, net.arch.input_dim), np.float32)
