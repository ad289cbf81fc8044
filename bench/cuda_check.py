"""The CUDA path, end to end, in one short script (for machines with a GPU).

Trains a small SAE on CUDA with mixed precision (bf16 autocast), checks that the model moved
to the GPU, compares its codes with the same model run on the CPU, and times encoding.

    .venv/bin/python bench/cuda_check.py
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from sae_pipeline import StackedAutoencoder
from sae_pipeline.engine import trainer


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
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
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
