"""The optimizer, weight decay and learning-rate schedule a phase names are the ones training uses.

Each epoch here is one full-batch step, so the trainer's weights after every epoch can be
recomputed by hand: the gradient from autograd on the network's own forward, then the update
rule of the configured optimizer (written out below from its definition) at the rate the
schedule gives for that epoch. A trainer that always used Adam, dropped the weight decay or
ignored ``lr_schedule`` lands on other weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_pipeline.config import ModelConfig, PhaseConfig
from sae_pipeline.engine import trainer
from sae_pipeline.engine.net import Architecture, build_net

CPU = torch.device("cpu")
EPOCHS, LR = 4, 0.01


def scheduled(schedule: str, epoch: int, epochs: int = EPOCHS, lr: float = LR) -> float:
    """The documented schedules (docs/engine.md): constant; cosine from ``lr`` towards 0 over
    the phase; step: times 0.3 every third of the phase."""
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
    if schedule == "step":
        return lr * 0.3 ** (epoch // max(1, epochs // 3))
    return lr


class ByHand:
    """One optimizer's update rule on a list of tensors, from its definition (torch defaults:
    Adam betas 0.9/0.999, eps 1e-8; RMSprop alpha 0.99; SGD with momentum 0.9)."""

    def __init__(self, kind: str, weight_decay: float, params: list[torch.Tensor]):
        self.kind, self.wd, self.t = kind, weight_decay, 0
        self.state = [{"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in params]

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
        self.t += 1
        for p, g, s in zip(params, grads, self.state, strict=True):
            if self.kind == "adamw":
                p.mul_(1 - lr * self.wd)  # decoupled: the decay is not in the moments
            else:
                g = g + self.wd * p  # L2: the decay is part of the gradient
            if self.kind == "sgd":
                s["m"] = g.clone() if self.t == 1 else 0.9 * s["m"] + g
                p.sub_(lr * s["m"])
            elif self.kind == "rmsprop":
                s["v"] = 0.99 * s["v"] + 0.01 * g * g
                p.sub_(lr * g / (s["v"].sqrt() + 1e-8))
            else:  # adam, adamw
                s["m"] = 0.9 * s["m"] + 0.1 * g
                s["v"] = 0.999 * s["v"] + 0.001 * g * g
                m_hat, v_hat = s["m"] / (1 - 0.9**self.t), s["v"] / (1 - 0.999**self.t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))


def _data(n=48, d=8, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.uniform(0, 1, (n, d)), dtype=torch.float32)


def by_hand(kind: str, schedule: str, wd: float, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """The weights after each epoch: autograd gradients of the full-batch MSE, the rule above."""
    net = build_net(Architecture(x.shape[1], [6, 3]), seed=1)
    params = list(net.parameters())
    rule = ByHand(kind, wd, params)
    out = []
    for epoch in range(EPOCHS):
        net.zero_grad()
        F.mse_loss(net(x)[0], x).backward()
        with torch.no_grad():
            rule.step(params, [p.grad for p in params], scheduled(schedule, epoch))
        out.append([p.detach().clone() for p in params])
    return out


def by_trainer(kind: str, schedule: str, wd: float, x: torch.Tensor, fast: bool = True):
    """The weights after each epoch of ``trainer.finetune`` with that phase."""
    net = build_net(Architecture(x.shape[1], [6, 3]), seed=1)
    phase = PhaseConfig(
        epochs=EPOCHS, batch_size=len(x), learning_rate=LR, optimizer=kind,
        weight_decay=wd, lr_schedule=schedule,
    )  # fmt: skip
    seen = []
    trainer.finetune(
        net, x, None, phase, ModelConfig(noise="none"), seed=0, fast=fast,
        on_epoch=lambda *_: seen.append([p.detach().clone() for p in net.parameters()]),
    )  # fmt: skip
    return seen


CASES = [
    ("adam", "constant", 0.0),
    ("adam", "step", 0.05),
    ("adamw", "cosine", 0.5),
    ("sgd", "step", 0.01),
    ("sgd", "cosine", 0.0),
    ("rmsprop", "cosine", 0.1),
    ("rmsprop", "constant", 0.0),
]


@pytest.mark.parametrize(("kind", "schedule", "wd"), CASES)
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "autograd"])
def test_training_follows_the_configured_optimizer_decay_and_schedule(kind, schedule, wd, fast):
    x = _data()
    expected, got = by_hand(kind, schedule, wd, x), by_trainer(kind, schedule, wd, x, fast)
    assert len(got) == EPOCHS
    for epoch, (want, have) in enumerate(zip(expected, got, strict=True)):
        for w, h in zip(want, have, strict=True):
            torch.testing.assert_close(h, w, rtol=1e-4, atol=2e-6, msg=f"epoch {epoch}")


@pytest.mark.parametrize(
    ("kind", "other"), [("sgd", "adam"), ("adamw", "adam"), ("rmsprop", "adam"), ("adam", "sgd")]
)
def test_another_optimizer_lands_elsewhere(kind, other):
    """The by-hand check tells the optimizers apart: a trainer using ``other`` would fail it."""
    x = _data()
    mine, theirs = by_hand(kind, "cosine", 0.1, x)[-1], by_hand(other, "cosine", 0.1, x)[-1]
    assert max((a - b).abs().max().item() for a, b in zip(mine, theirs, strict=True)) > 1e-3


def test_schedules_and_decay_change_the_weights():
    """Each setting the check covers moves the weights by more than its tolerance."""
    x = _data()
    base = by_hand("adamw", "constant", 0.0, x)[-1]
    for kind, schedule, wd in (
        ("adamw", "cosine", 0.0),
        ("adamw", "step", 0.0),
        ("adamw", "constant", 0.5),
    ):
        other = by_hand(kind, schedule, wd, x)[-1]
        assert max((a - b).abs().max().item() for a, b in zip(base, other, strict=True)) > 1e-4


def test_the_schedules_are_the_documented_curves():
    for epochs in (1, 3, 9, 10):
        for schedule in ("constant", "cosine", "step"):
            phase = PhaseConfig(epochs=epochs, learning_rate=0.2, lr_schedule=schedule)
            rates = [trainer.learning_rate(phase, e) for e in range(epochs)]
            assert rates == pytest.approx(
                [scheduled(schedule, e, epochs, 0.2) for e in range(epochs)]
            )
    cosine = [
        trainer.learning_rate(PhaseConfig(epochs=10, learning_rate=1.0, lr_schedule="cosine"), e)
        for e in range(10)
    ]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and all(np.diff(cosine) < 0)
    step = [
        trainer.learning_rate(PhaseConfig(epochs=9, learning_rate=1.0, lr_schedule="step"), e)
        for e in range(9)
    ]
    assert step == pytest.approx([1.0] * 3 + [0.3] * 3 + [0.09] * 3)


def test_make_optimizer_builds_the_named_optimizer_with_its_settings():
    p = [torch.nn.Parameter(torch.zeros(3))]
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
             "rmsprop": torch.optim.RMSprop}  # fmt: skip
    for name, cls in kinds.items():
        opt = trainer.make_optimizer(
            p, PhaseConfig(optimizer=name, learning_rate=0.07, weight_decay=0.3)
        )
        assert type(opt) is cls, name
        group = opt.param_groups[0]
        assert (group["lr"], group["weight_decay"]) == (0.07, 0.3), name
    sgd = trainer.make_optimizer(p, PhaseConfig(optimizer="sgd"))
    assert sgd.param_groups[0]["momentum"] == 0.9


def test_the_estimator_passes_its_optimizer_settings_to_both_phases(monkeypatch):
    from sae_pipeline.engine.estimator import StackedAutoencoder

    seen = []
    real = trainer.make_optimizer

    def spy(params, phase):
        seen.append((phase.optimizer, phase.weight_decay, phase.lr_schedule, phase.learning_rate))
        return real(params, phase)

    monkeypatch.setattr(trainer, "make_optimizer", spy)
    StackedAutoencoder(
        hidden_dims=(4, 2), pretrain_epochs=1, finetune_epochs=1, optimizer="rmsprop",
        weight_decay=0.25, lr_schedule="step", pretrain_learning_rate=0.004,
        finetune_learning_rate=0.006, random_state=0,
    ).fit(_data(n=64).numpy())  # fmt: skip
    assert seen == [("rmsprop", 0.25, "step", 0.004)] * 2 + [("rmsprop", 0.25, "step", 0.006)]
