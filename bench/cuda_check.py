"""The one prepared check for a machine with a GPU (about 10 minutes on one), end to end.

It prints, and checks where there is a right answer:

1. the environment: torch and its CUDA runtime, the device, the driver, matmul precision;
2. codes of the same rows (``np.tile`` of the digits) on CUDA and on the CPU, from a model
   fitted on CUDA: within ``TOL``;
3. resume: a phase killed mid-way resumes from its checkpoint on CUDA (equal to the
   uninterrupted run within ``TOL``), and the CUDA checkpoint resumes on the CPU (finite losses);
   with and without dropout (the fast path and autograd);
4. warmed-up training samples/s at batch 64 and 1024, side by side: AMP + autograd, fp32
   autograd, the fp32 fast path (all CUDA) and the CPU fast path; then a wide network, where
   ``engine.device.AMP_MIN_WIDTH`` says AMP pays, with TF32 too; the fast path and autograd
   must reach the same loss;
5. streamed training of layer 2 at steady state (2,097,152 rows from a row cache, 2 epochs)
   as a share of the same training in memory (``STREAM_MIN_SHARE``);
6. batch encoding rows/s (``engine.batch_encoding.encode_shard``) on the CPU and on CUDA, the
   two outputs equal within ``TOL``, and the cached encoder left on the CPU;
7. the serving runtime's codes (the registered bundle's ``EncoderBundle``) against the
   trainer's.

It exits 1 on any mismatch, NaN or failed check, and lists them. ``--cpu`` is a dry run of
every section on the CPU with small sizes (the test suite runs it, so the script cannot rot):

    .venv/bin/python bench/cuda_check.py          # needs CUDA; exits 2 without it
    .venv/bin/python bench/cuda_check.py --cpu    # every section, small, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from sae_pipeline import StackedAutoencoder
from sae_pipeline.config import ModelConfig, PhaseConfig
from sae_pipeline.engine import device as device_policy
from sae_pipeline.engine import trainer
from sae_pipeline.engine.net import Architecture, build_net

TOL = 1e-3  # |codes on CUDA - codes on the CPU|, fp32 with TF32 off
STREAM_MIN_SHARE = 0.5  # streamed / in-memory samples/s below this fails the check
SIZES = {  # full: about 10 minutes on one GPU; cpu: the dry run, a few seconds per section
    "full": dict(tile=200, pre=5, fine=20, resume_rows=1024, resume_epochs=6, warm=100,
                 steps=1000, cpu_steps=200, wide=(512, (2048, 256)), wide_steps=300,
                 stream_rows=2_097_152, stream_buffer=131_072, encode_rows=2_000_000),
    "cpu": dict(tile=3, pre=1, fine=1, resume_rows=256, resume_epochs=3, warm=2, steps=6,
                cpu_steps=6, wide=(32, (64, 8)), wide_steps=2, stream_rows=6144,
                stream_buffer=4096, encode_rows=10_000),
}  # fmt: skip
CPU = torch.device("cpu")


class Report:
    """Failed checks, collected; every check also prints its line."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}")
        if not ok:
            self.failures.append(f"{name}: {detail}" if detail else name)
        return ok

    def finite(self, name: str, values) -> bool:
        arr = np.asarray(values, dtype=np.float64)
        return self.check(f"{name} finite", bool(arr.size) and bool(np.isfinite(arr).all()),
                          f"{arr.size} value(s), last {arr.reshape(-1)[-1]:.5g}" if arr.size
                          else "no values")  # fmt: skip

    def close(self, name: str, a, b, tol: float = TOL) -> bool:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            return self.check(name, False, f"shapes {a.shape} vs {b.shape}")
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        ok = bool(np.isfinite(a).all() and np.isfinite(b).all()) and diff <= tol
        return self.check(name, ok, f"max |diff| {diff:.2e} (tolerance {tol:.0e})")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def digits() -> np.ndarray:
    return (load_digits().data / 16.0).astype(np.float32)  # (1797, 64) in [0, 1]


def _net(hidden=(256, 64, 10), features: int = 64, seed: int = 0):
    return build_net(Architecture(features, list(hidden), output_activation="sigmoid"), seed=seed)


# ---- 1. environment ---------------------------------------------------------------------------
def environment(dev: torch.device) -> None:
    print("== environment")
    print(f"  torch {torch.__version__}, CUDA runtime {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version() if torch.version.cuda else None}")  # fmt: skip
    print(f"  driver {device_policy.driver_version()}, device {device_policy.describe(dev)}")
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        print(f"  capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
              f"{p.multi_processor_count} SMs")  # fmt: skip
    print(f"  float32 matmul precision {torch.get_float32_matmul_precision()}, "
          f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, CPU threads "
          f"{torch.get_num_threads()}")  # fmt: skip


# ---- 2. codes on the device against the CPU ---------------------------------------------------
def codes(dev: torch.device, size: dict, report: Report) -> StackedAutoencoder:
    print(f"== codes: fitted on {dev.type}, the same rows encoded on {dev.type} and the CPU")
    x = digits()
    t0 = time.perf_counter()
    sae = StackedAutoencoder(pretrain_epochs=size["pre"], finetune_epochs=size["fine"],
                             device=dev.type, random_state=0).fit(x)  # fmt: skip
    print(f"  fit (64-256-64-10, AMP per the rule): {time.perf_counter() - t0:.1f} s")
    report.finite("fine-tune val loss", sae.finetune_history_["val_loss"])
    report.finite("pretraining val losses", [h["val_loss"] for h in sae.pretrain_history_])
    big = np.tile(x, (size["tile"], 1))  # every digit, `tile` times over, in order
    on_cpu = trainer.encode_array(sae.network, big)
    net_dev = copy.deepcopy(sae.network).to(dev)  # the fitted network itself stays on the CPU
    trainer.encode_array(net_dev, big[:8192])  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    on_dev = trainer.encode_array(net_dev, big)
    _sync(dev)
    secs = time.perf_counter() - t0
    print(f"  encode_array on {dev.type}: {len(big) / secs:,.0f} rows/s ({len(big):,} rows)")
    report.close(f"codes {dev.type} vs cpu ({len(big):,} rows)", on_dev, on_cpu)
    report.close("codes of the tiled rows repeat", on_dev[-len(x) :], on_dev[: len(x)], 0.0)
    report.check("the fitted network stayed on the CPU",
                 next(sae.network.parameters()).device.type == "cpu")  # fmt: skip
    return sae


# ---- 3. resume --------------------------------------------------------------------------------
def _phase(x, dev, ckpt, epochs, dropout, stop_at=None):
    net = _net((32, 8), seed=1).to(dev)

    def on_epoch(epoch, *_):
        if epoch == stop_at:
            raise KeyboardInterrupt

    hist = trainer.finetune(net, x, None, PhaseConfig(epochs=epochs, batch_size=64),
                            ModelConfig(dropout=dropout), 3, checkpoint=ckpt, checkpoint_every=1,
                            checkpoint_every_steps=3, on_epoch=on_epoch)  # fmt: skip
    return net, hist


def resume(dev: torch.device, size: dict, report: Report, tmp: Path) -> None:
    print(f"== resume: a killed phase resumes on {dev.type}, and its checkpoint on the CPU")
    x_np, epochs = digits()[: size["resume_rows"]], size["resume_epochs"]
    for dropout in (0.0, 0.1):
        path = "fast path" if dropout == 0 else "autograd (dropout)"
        x = trainer.as_tensor(x_np, dev)
        ref, ref_hist = _phase(x, dev, None, epochs, dropout)
        ckpt = tmp / f"resume-{dropout}.ckpt"
        with contextlib.suppress(KeyboardInterrupt):  # killed in its last-but-one epoch
            _phase(x, dev, ckpt, epochs, dropout, stop_at=epochs - 2)
        shutil.copy(ckpt, tmp / "for-cpu.ckpt")
        net, hist = _phase(x, dev, ckpt, epochs, dropout)
        report.finite(f"{path}: resumed losses on {dev.type}", hist.val_loss)
        report.close(f"{path}: resumed on {dev.type} vs uninterrupted, val loss",
                     hist.val_loss, ref_hist.val_loss, 1e-5)  # fmt: skip
        ref_w = torch.cat([p.detach().float().cpu().reshape(-1) for p in ref.parameters()])
        got_w = torch.cat([p.detach().float().cpu().reshape(-1) for p in net.parameters()])
        report.close(f"{path}: resumed on {dev.type} vs uninterrupted, weights",
                     got_w.numpy(), ref_w.numpy(), 1e-4)  # fmt: skip
        state = torch.load(tmp / "for-cpu.ckpt", map_location="cpu", weights_only=True)
        report.check(f"{path}: checkpoint records its device", state.get("device") == dev.type,
                     repr(state.get("device")))  # fmt: skip
        _, cpu_hist = _phase(trainer.as_tensor(x_np, CPU), CPU, tmp / "for-cpu.ckpt", epochs,
                             dropout)  # fmt: skip
        report.finite(f"{path}: {dev.type} checkpoint resumed on the CPU", cpu_hist.val_loss)
        report.check(f"{path}: CPU resume ran every epoch", len(cpu_hist.val_loss) == epochs,
                     f"{len(cpu_hist.val_loss)} of {epochs}")  # fmt: skip


# ---- 4. training speed ------------------------------------------------------------------------
def _speed(x_np, hidden, dev, batch, steps, warm, amp, fast, tf32=False) -> tuple[float, float]:
    """(samples/s after a warm-up, final train loss) of fine-tuning ``hidden`` on ``x_np``."""
    x = trainer.as_tensor(x_np, dev)
    net = _net(hidden, x_np.shape[1]).to(dev)
    model = ModelConfig()
    saved = device_policy.AMP_MIN_WIDTH, torch.backends.cuda.matmul.allow_tf32
    device_policy.AMP_MIN_WIDTH = 0 if amp else 10**9  # force the setup whatever the rule says
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for n in (warm, steps):
            phase = PhaseConfig(epochs=1, batch_size=batch, max_steps=n, lr_schedule="constant")
            hist = trainer.finetune(net, x, x[:4096], phase, model, 0, amp=amp, fast=fast)
    finally:
        device_policy.AMP_MIN_WIDTH, torch.backends.cuda.matmul.allow_tf32 = saved
    return hist.samples_seen / hist.step_seconds, hist.train_loss[-1]


def speed(dev: torch.device, size: dict, report: Report) -> None:
    print("== training samples/s (fine-tuning 64-256-64-10, warmed up)")
    x_np = np.tile(digits(), (40, 1))  # 71,880 rows
    setups = [
        ("AMP + autograd", dev, True, False),
        ("fp32 autograd", dev, False, False),
        ("fp32 fast path", dev, False, True),
        ("CPU fast path", CPU, False, True),
    ]
    print(f"  {'setup':<18}{'device':>8}{'batch 64':>14}{'batch 1024':>14}")
    losses = {}
    for name, d, amp, fast in setups:
        steps = size["cpu_steps"] if d.type == "cpu" else size["steps"]
        row = []
        for batch in (64, 1024):
            sps, loss = _speed(x_np, (256, 64, 10), d, batch, steps, size["warm"], amp, fast)
            row.append(sps)
            losses[name, batch] = loss
            report.finite(f"{name} batch {batch} loss", [loss])
        print(f"  {name:<18}{d.type:>8}{row[0]:>14,.0f}{row[1]:>14,.0f}")
    for batch in (64, 1024):
        a, f = losses["fp32 autograd", batch], losses["fp32 fast path", batch]
        same = abs(a - f) <= 1e-3 * abs(a) + 1e-6
        report.check(f"fast path and autograd reach the same loss (batch {batch})", same,
                     f"{a:.6f} vs {f:.6f}")  # fmt: skip
    features, hidden = size["wide"]
    wide = np.random.default_rng(0).random((16_384, features), dtype=np.float32)
    dims = "-".join(map(str, (features, *hidden)))
    print(f"  wide {dims}, batch 1024 (AMP_MIN_WIDTH {device_policy.AMP_MIN_WIDTH}):")
    wide_speed = {}
    for name, amp, fast, tf32 in (("AMP + autograd", True, False, False),
                                  ("fp32 fast path", False, True, False),
                                  ("fp32 fast path, TF32", False, True, True)):  # fmt: skip
        sps, loss = _speed(wide, hidden, dev, 1024, size["wide_steps"], size["warm"], amp,
                           fast, tf32)  # fmt: skip
        wide_speed[name] = sps
        report.finite(f"wide {name} loss", [loss])
        print(f"    {name:<22}{sps:>14,.0f}")
    if dev.type == "cuda":  # a finding to act on, not a failure: the rule is a threshold
        rule = device_policy.amp_pays(True, dev, [torch.empty(hidden[0], features)])
        faster = wide_speed["AMP + autograd"] > wide_speed["fp32 fast path"]
        verdict = "agrees" if rule == faster else "DISAGREES: revisit AMP_MIN_WIDTH"
        print(f"  the rule picks AMP here: {rule}; AMP measured faster: {faster} ({verdict})")


# ---- 5. streaming -----------------------------------------------------------------------------
def _layer2(dev, rows, x_val, stream=None, x_train=None) -> float:
    """Steady-state samples/s of pretraining layer 2 for 2 epochs (the first quarter of the
    steps left out: the read-ahead filling, allocations, the first buffers)."""
    net = _net().to(dev)
    phase = PhaseConfig(epochs=2, batch_size=1024, max_samples=2 * rows)
    budget = trainer.step_budget(phase, rows, 1024, stream is not None)
    mark = {}

    def on_step(step):
        if step == budget // 4:
            _sync(dev)
            mark["t"] = time.perf_counter()

    trainer.pretrain_layer(net, 1, x_train, x_val, phase, ModelConfig(), 0, stream=stream,
                           on_step=on_step)  # fmt: skip
    _sync(dev)
    return (budget - budget // 4) * 1024 / (time.perf_counter() - mark["t"])


def streaming(dev: torch.device, size: dict, report: Report, tmp: Path) -> None:
    import pandas as pd

    from sae_pipeline.data import parts, row_cache
    from sae_pipeline.engine.streaming import ShardStream

    rows = size["stream_rows"]
    print(f"== streamed training, layer 2, {rows:,} rows x 2 epochs, batch 1024, on {dev.type}")
    rng = np.random.default_rng(0)
    x = np.tile(digits(), (rows // 1797 + 1, 1))[:rows]
    x += rng.normal(0, 0.01, x.shape).astype(np.float32)  # no two rows alike
    cols = [f"p{j}" for j in range(64)]
    path = tmp / "part-0.parquet"
    pd.DataFrame(x, columns=cols).to_parquet(path, row_group_size=65_536)
    cache = row_cache.write(str(tmp / "rows"), (x[i : i + 65_536] for i in range(0, rows, 65_536)),
                            64)  # fmt: skip
    ones, zeros = np.ones(64, np.float32), np.zeros(64, np.float32)
    x_val = trainer.as_tensor(x[:4096], dev)
    speed = {"in memory": _layer2(dev, rows, x_val, x_train=trainer.as_tensor(x, dev))}
    for name, c in (("streamed, row cache", cache), ("streamed, Parquet", None)):
        stream = ShardStream(parts.units([str(path)]), cols, None, "train", rows, ones, zeros,
                             1024, 0, dev, buffer_rows=size["stream_buffer"], cache=c,
                             chunk_rows=min(65_536, size["stream_buffer"]),
                             slice_rows=min(16_384, size["stream_buffer"] // 2))  # fmt: skip
        speed[name] = _layer2(dev, rows, x_val, stream=stream)
    for name, sps in speed.items():
        share = sps / speed["in memory"]
        print(f"  {name:<22}{sps:>14,.0f} samples/s  {share:>5.0%} of in memory")
    share = speed["streamed, row cache"] / speed["in memory"]
    if size is SIZES["full"]:
        report.check("streamed (row cache) share of in-memory", share >= STREAM_MIN_SHARE,
                     f"{share:.0%} (at least {STREAM_MIN_SHARE:.0%})")  # fmt: skip


# ---- 6. batch encoding, 7. serving ------------------------------------------------------------
def encoding(dev: torch.device, sae, size: dict, report: Report, tmp: Path) -> None:
    import pandas as pd

    from sae_pipeline.data.contract import Contract
    from sae_pipeline.data.scaling import apply_scaler, fit_scaler
    from sae_pipeline.engine import batch_encoding
    from sae_pipeline.engine.encoder import Encoder
    from sae_pipeline.registry._model_code import sae_model_runtime as runtime
    from sae_pipeline.registry.bundle import write_encoder_bundle

    rows = size["encode_rows"]
    print(f"== batch encoding, {rows:,} rows (encode_shard)")
    cols = [f"p{j}" for j in range(64)]
    x = np.tile(digits(), (rows // 1797 + 1, 1))[:rows].astype(np.float64) * 16.0
    path = tmp / "batch.parquet"
    pd.DataFrame(x, columns=cols).to_parquet(path, row_group_size=65_536)
    contract = Contract(cols, dict.fromkeys(cols, "float64"))
    encoder = Encoder(contract, fit_scaler("minmax", x[:1797]), sae.network)
    (shard,) = batch_encoding.plan([str(path)], shard_rows=rows + 1)
    out = {}
    for d in dict.fromkeys([CPU, dev]):
        part = tmp / f"codes-{d.type}.parquet"
        t0 = time.perf_counter()
        batch_encoding.encode_shard(encoder, shard, str(part), str(tmp / f"q-{d.type}.parquet"),
                                    device=d)  # fmt: skip
        secs = time.perf_counter() - t0
        out[d.type] = pd.read_parquet(part)[encoder.code_columns].to_numpy()
        print(f"  {d.type}: {rows / secs:,.0f} rows/s")
    report.close(f"batch codes {dev.type} vs cpu", out[dev.type], out["cpu"])
    report.check("the cached encoder stayed on the CPU",
                 next(encoder.net.parameters()).device.type == "cpu")  # fmt: skip

    print("== serving runtime against the trainer")
    files = write_encoder_bundle(encoder, tmp / "bundle")
    served = runtime.EncoderBundle.load(files["config"], files["weights"])
    frame = pd.DataFrame(x[:5000], columns=cols)
    got = served.predict(frame)[encoder.code_columns].to_numpy()
    want = trainer.encode_array(encoder.net_on(dev), apply_scaler(encoder.scaler, x[:5000]))
    report.close(f"served codes vs the trainer's on {dev.type}", got, want)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU, small sizes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  log: %(name)s: %(message)s")
    if args.cpu:
        dev, size = CPU, SIZES["cpu"]
    elif torch.cuda.is_available():
        dev, size = torch.device("cuda", 0), SIZES["full"]
    else:
        print(f"no CUDA: {device_policy.cuda_unavailable_reason()} (--cpu: the dry run)")
        return 2
    report, t0 = Report(), time.perf_counter()
    environment(dev)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        sae = codes(dev, size, report)
        sections = [
            lambda: resume(dev, size, report, Path(tmp)),
            lambda: speed(dev, size, report),
            lambda: streaming(dev, size, report, Path(tmp)),
            lambda: encoding(dev, sae, size, report, Path(tmp)),
        ]
        for section in [lambda: None, *sections]:
            section()
            print(f"  ({time.perf_counter() - t:.1f} s)")
            t = time.perf_counter()
    print(f"== {len(report.failures)} failure(s) in {time.perf_counter() - t0:.0f} s")
    for failure in report.failures:
        print(f"  FAIL {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
