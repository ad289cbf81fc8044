"""Trainer speed, side by side in one run: our trainer vs a plain eager PyTorch loop.

1. A 64->128->64 autoencoder layer at batch 64 (overhead-bound): samples/s of each to reach
   the plain loop's final validation loss.
2. A 784->1000->784 layer at batch 128 (compute-bound): achieved FLOP/s as a share of the
   float32 matmul peak measured here.

    .venv/bin/python bench/bench_trainer.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sae_pipeline.config import ModelConfig, PhaseConfig
from sae_pipeline.engine import trainer
from sae_pipeline.engine.net import Architecture, build_net

CPU = torch.device("cpu")
PLAIN = ModelConfig(noise="none")  # the plain loop has no denoising either


def digits_like(n: int, seed: int = 0) -> np.ndarray:
    """``n`` jittered copies of digits images scaled to [0, 1]: 64 real-looking features."""
    x = load_digits().data / 16.0
    rng = np.random.default_rng(seed)
    rows = x[rng.integers(0, len(x), n)] + rng.normal(0, 0.05, (n, 64))
    return np.clip(rows, 0, 1).astype(np.float32)


def plain_loop(x, x_val, epochs, batch, lr, seed):
    """The loop from a PyTorch tutorial: default Adam, shuffled indices, zero_grad/backward/step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Sigmoid())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n, seen, times, vals = len(x), 0, [], []
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n - batch + 1, batch):
            xb = x[perm[i : i + batch]]
            opt.zero_grad()
            loss = F.mse_loss(model(xb), xb)
            loss.backward()
            opt.step()
            seen += batch
        with torch.no_grad():
            vals.append(F.mse_loss(model(x_val), x_val).item())
        times.append((time.perf_counter() - t0, seen))
    return vals, times


def time_to(target, marks):
    """(seconds, samples) when validation loss first reached ``target``."""
    for t, seen, val in marks:
        if val <= target:
            return t, seen
    return None


def peak_gemm(n: int = 2048, reps: int = 10, trials: int = 5) -> float:
    """Best of several timed runs of a large square float32 matmul."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def training_gemms(batch: int = 128, n_in: int = 784, n_hidden: int = 1000, reps: int = 100):
    """FLOP/s of the five GEMMs of one training step alone (no optimizer, no elementwise
    work): the ceiling any trainer of this layer can reach on this machine."""
    x, w1, w2 = torch.rand(batch, n_in), torch.rand(n_hidden, n_in), torch.rand(n_in, n_hidden)
    b1, b2 = torch.rand(n_hidden), torch.rand(n_in)
    h, o = torch.empty(batch, n_hidden), torch.empty(batch, n_in)
    g1, g2, gh = torch.empty(n_hidden, n_in), torch.empty(n_in, n_hidden), torch.empty_like(h)

    def step():
        torch.addmm(b1, x, w1.t(), out=h)  # encoder forward
        torch.addmm(b2, h, w2.t(), out=o)  # decoder forward
        torch.mm(o.t(), h, out=g2)  # decoder weight grad
        torch.mm(o, w2, out=gh)  # decoder input grad
        torch.mm(gh.t(), x, out=g1)  # encoder weight grad

    for _ in range(10):
        step()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 5 * 2 * batch * n_in * n_hidden / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument(
        "--threads", type=int, default=1,
        help="intra-op threads for part 1 (a 64x128 GEMM gains nothing from more; part 2 "
        "uses every core)",
    )  # fmt: skip
    args = ap.parse_args()
    cores = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.from_numpy(digits_like(args.rows))
    x_val = torch.from_numpy(digits_like(2000, seed=1))

    # -- 1. overhead-bound layer ---------------------------------------------------------------
    lr, batch = 1e-3, 64
    vals, times = plain_loop(x, x_val, args.epochs, batch, lr, 0)
    target = vals[-1]
    base_t, base_seen = times[-1]
    rows = [("plain eager loop", base_seen / base_t, base_t, target, 1.0)]
    for fast in (False, True):
        marks = _ours_marks(x, x_val, args.epochs, batch, lr, fast)
        hit = time_to(target * 1.0001, marks)
        name = "sae trainer (fast path)" if fast else "sae trainer (autograd)"
        if hit is None:
            t, seen = marks[-1][0], marks[-1][1]
            rows.append((name + " [target not reached]", seen / t, t, marks[-1][2], None))
        else:
            t, seen = hit
            rows.append((name, seen / t, t, target, (seen / t) / (base_seen / base_t)))
    print(
        f"\n64->128->64 layer, batch {batch}, Adam lr {lr}, {args.rows} rows, "
        f"{args.threads} thread(s), no noise, "
        f"target = plain loop's val MSE after {args.epochs} epochs ({target:.6f})"
    )
    print(f"{'trainer':<38}{'samples/s':>12}{'seconds':>10}{'val MSE':>11}{'speed-up':>10}")
    for name, sps, t, val, ratio in rows:
        r = f"{ratio:.2f}x" if ratio else "-"
        print(f"{name:<38}{sps:>12,.0f}{t:>10.2f}{val:>11.6f}{r:>10}")

    # -- 2. compute-bound layer ----------------------------------------------------------------
    torch.set_num_threads(cores)
    peak = peak_gemm()
    big = torch.rand(8192, 784)
    net = build_net(Architecture(784, [1000], output_activation="sigmoid"), seed=0)
    warmup = PhaseConfig(epochs=1, batch_size=128, learning_rate=1e-3, patience=0)
    trainer.pretrain_layer(net, 0, big, None, warmup, PLAIN, 0)  # thread pool, allocator
    phase = PhaseConfig(epochs=5, batch_size=128, learning_rate=1e-3, patience=0)
    hist = trainer.pretrain_layer(net, 0, big, None, phase, PLAIN, 0)
    sps = hist.samples_seen / hist.step_seconds
    # forward: 2 GEMMs of 2*784*1000; backward: weight grads of both + the decoder's input grad.
    flops = 2 * 784 * 1000 * (2 + 3)
    ceiling = training_gemms()
    print(
        f"\n784->1000->784 layer, batch 128: {sps:,.0f} samples/s x {flops / 1e6:.2f} MFLOP "
        f"= {sps * flops / 1e9:.1f} GFLOP/s; float32 GEMM peak here {peak / 1e9:.1f} GFLOP/s "
        f"-> {sps * flops / peak:.0%} of roofline ({cores} threads)"
    )
    print(
        f"  the five GEMMs of a step alone, at these shapes: {ceiling / 1e9:.1f} GFLOP/s "
        f"= {ceiling / peak:.0%} of peak (the ceiling for any trainer); the trainer reaches "
        f"{sps * flops / ceiling:.0%} of it (the rest: Adam update, gathers, activations)"
    )


def _ours_marks(x, x_val, epochs, batch, lr, fast):
    net = build_net(Architecture(64, [128], output_activation="sigmoid"), seed=0)
    marks, seen = [], [0]
    t0 = time.perf_counter()
    per_epoch = (len(x) // batch) * batch

    def on_epoch(epoch, train, val):
        seen[0] += per_epoch
        marks.append((time.perf_counter() - t0, seen[0], val))

    phase = PhaseConfig(epochs=epochs, batch_size=batch, learning_rate=lr, patience=0)

    def forward(h):
        code = net.encode_layer(0, h)
        return net.decode_layer(0, code), code

    trainer.train_phase(
        net, forward, net.layer_parameters(0), x, x_val, phase, PLAIN, 0,
        on_epoch=on_epoch, chain=trainer._dense_chain(net, [0]), fast=fast,
    )  # fmt: skip
    return marks


if __name__ == "__main__":
    main()
