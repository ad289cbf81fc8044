"""The CUDA path, end to end, in one short script (for machines with a GPU).

Trains a small SAE on CUDA with mixed precision (bf16 autocast), checks that the model moved
to the GPU, compares its codes with the same model run on the CPU, and times encoding. Then
the streaming path: batches read from Parquet shards through the shuffling buffer, pinned and
copied with non-blocking copies, trained on the device; samples/s against in memory.

    .venv/bin/python bench/cuda_check.py          # skips cleanly without CUDA
    .venv/bin/python bench/cuda_check.py --cpu    # the streaming check alone, on the CPU
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from sae_pipeline import StackedAutoencoder
from sae_pipeline.engine import trainer


def streaming_check(device: torch.device, rows: int = 200_000) -> float:
    """Fine-tune one epoch streamed from shards and one in memory; print both samples/s."""
    import tempfile
    from pathlib import Path

    import pandas as pd

    from sae_pipeline.config import ModelConfig, PhaseConfig
    from sae_pipeline.data import parts
    from sae_pipeline.engine.net import Architecture, build_net
    from sae_pipeline.engine.streaming import ShardStream

    x = np.tile((load_digits().data / 16.0).astype(np.float32), (rows // 1797 + 1, 1))[:rows]
    cols = [f"p{j}" for j in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part-0.parquet"
        pd.DataFrame(x, columns=cols).to_parquet(path, row_group_size=65_536)
        ones, zeros = np.ones(64, np.float32), np.zeros(64, np.float32)
        stream = ShardStream(parts.units([str(path)]), cols, None, "train", rows, ones, zeros,
                             1024, 0, device)  # fmt: skip
        phase, val = PhaseConfig(epochs=1, batch_size=1024), trainer.as_tensor(x[:4096], device)
        speed = {}
        for name, x_train, s in (("in memory", trainer.as_tensor(x, device), None),
                                 ("streaming", None, stream)):  # fmt: skip
            net = build_net(Architecture(64, [256, 64, 10], output_activation="sigmoid"), seed=0)
            hist = trainer.finetune(net.to(device), x_train, val, phase, ModelConfig(), seed=0,
                                    stream=s)  # fmt: skip
            speed[name] = hist.samples_seen / hist.step_seconds
            print(f"{name} on {device.type}: {speed[name]:,.0f} samples/s, "
                  f"val loss {hist.val_loss[-1]:.5f}")  # fmt: skip
    return speed["streaming"] / speed["in memory"]


def main() -> int:
    if "--cpu" in sys.argv:
        ratio = streaming_check(torch.device("cpu"))
        print(f"streaming / in memory: {ratio:.0%}")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--cpu runs the streaming check on the CPU)")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    x = (load_digits().data / 16.0).astype(np.float32)
    t0 = time.perf_counter()
    sae = StackedAutoencoder(pretrain_epochs=5, finetune_epochs=20, device="cuda", amp=True,
                             random_state=0).fit(x)  # fmt: skip
    print(f"fit on CUDA with AMP: {time.perf_counter() - t0:.1f} s, "
          f"final val loss {sae.finetune_history_['val_loss'][-1]:.5f}")  # fmt: skip
    codes_cpu = sae.transform(x)
    net = sae.network.cuda()
    t0 = time.perf_counter()
    big = np.repeat(x, 200, axis=0)
    codes_gpu = trainer.encode_array(net, big)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    print(f"encoding {len(big):,} rows on CUDA: {len(big) / secs:,.0f} rows/s")
    diff = np.abs(codes_gpu[: len(x)] - codes_cpu).max()
    print(f"max |codes on CUDA - codes on CPU| = {diff:.2e}")
    ratio = streaming_check(torch.device("cuda"))
    print(f"streaming / in memory on CUDA: {ratio:.0%}")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
