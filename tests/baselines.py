"""Baselines a quality test computes beside the model it checks (shared/STYLE.md, item 6).

A quality bar is "better than what an untrained network of the same shape, PCA with as many
components, or IsolationForest gets on the same rows", never a bare constant that a broken
model also clears.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def untrained():
    """Inside: every training phase leaves the weights where they were initialised.

    Each phase's optimizer is plain SGD with a learning rate of 0, so everything else (the
    shapes, the seeds, the batches, the detector's normalisers) is exactly as in training:
    the same model, minus what training taught it.
    """
    from sae_pipeline.engine import trainer

    real = trainer.make_optimizer
    trainer.make_optimizer = lambda params, phase: torch.optim.SGD(params, lr=0.0)
    try:
        yield
    finally:
        trainer.make_optimizer = real
