"""The trainer's fast path: forward and backward of a dense chain without autograd.

On small models a training step costs per-op overhead (autograd graph, allocator, optimizer
bookkeeping) more than arithmetic; these classes compute the same gradients with preallocated
buffers and one aten kernel per operation. ``trainer.train_phase`` uses them where the
configuration allows and falls back to autograd otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_pipeline.config import ModelConfig

_BACKWARD = {
    # gradient wrt the pre-activation, from the gradient wrt the output and the output itself:
    # the same aten kernels autograd calls, one op each and written in place where possible.
    "relu": lambda g, out: torch.ops.aten.threshold_backward(g, out, 0.0),
    "leaky_relu": lambda g, out: torch.ops.aten.leaky_relu_backward(g, out, 0.01, True),
    "tanh": lambda g, out: torch.ops.aten.tanh_backward(g, out),
    "sigmoid": lambda g, out: torch.ops.aten.sigmoid_backward(g, out),
    "linear": lambda g, out: g,
}
_FORWARD_INPLACE = {
    "relu": torch.relu_,
    "leaky_relu": lambda z: F.leaky_relu_(z, 0.01),
    "tanh": torch.tanh_,
    "sigmoid": torch.sigmoid_,
    "linear": lambda z: z,
}


class Layer(tuple):
    """(weight, bias, activation) of one dense layer in a chain."""

    __slots__ = ()

    def __new__(cls, weight: torch.Tensor, bias: torch.Tensor, activation: str):
        return super().__new__(cls, (weight, bias, activation))


class ManualChain:
    """Forward and backward of a chain of dense layers without autograd.

    On small models a training step is dominated by per-op overhead (autograd graph,
    allocator, optimizer bookkeeping), not by arithmetic. This computes the same gradients
    with preallocated buffers and one aten kernel per operation, and leaves them in each
    parameter's ``.grad`` so the usual optimizer (fused Adam) applies them.
    """

    def __init__(self, layers: list[Layer], batch: int, code_index: int, model: ModelConfig):
        self.layers = layers
        self.code_index = code_index
        self.l1 = model.sparsity_weight if model.sparsity == "l1" else 0.0
        w0 = layers[0][0]
        kw = {"device": w0.device, "dtype": w0.dtype}
        self.out = [torch.empty(batch, w.shape[0], **kw) for w, _, _ in layers]  # (batch, out_i)
        self.grad_in = [torch.empty(batch, w.shape[1], **kw) for w, _, _ in layers]
        for w, b, _ in layers:
            for p in (w, b):
                p.grad = torch.zeros_like(p)

    @staticmethod
    def supported(model: ModelConfig, amp_on: bool) -> bool:
        return not amp_on and model.dropout == 0 and model.sparsity in ("none", "l1")

    @torch.no_grad()
    def step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Fill the parameters' grads for MSE(chain(x), target); return the loss."""
        h = x
        for (w, b, act), out in zip(self.layers, self.out, strict=True):
            torch.addmm(b, h, w.t(), out=out)
            h = _FORWARD_INPLACE[act](out)
        loss = torch.ops.aten.mse_loss(h, target, 1)
        g = torch.ops.aten.mse_loss_backward(torch.ones((), device=h.device), h, target, 1)
        for i in reversed(range(len(self.layers))):
            w, b, act = self.layers[i]
            if i == self.code_index and self.l1:
                g = g + (self.l1 / self.out[i].numel()) * torch.sign(self.out[i])
            dz = _BACKWARD[act](g, self.out[i])  # (batch, out_i)
            prev = x if i == 0 else self.out[i - 1]
            torch.mm(dz.t(), prev, out=w.grad)
            torch.sum(dz, 0, out=b.grad)
            if i > 0:
                g = torch.mm(dz, w, out=self.grad_in[i])
        return loss  # reconstruction only: a sparsity penalty is not part of the reported loss


class FusedAdamStep:
    """``opt.step()`` for a fused Adam/AdamW, without the generic optimizer machinery.

    Calls the same fused kernel ``torch.optim.Adam(fused=True)`` calls, on the optimizer's own
    state tensors, so the optimizer's state_dict (checkpoints) stays the source of truth.
    """

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.group = opt.param_groups[0]
        self.params = [p for p in self.group["params"] if p.grad is not None]
        for p in self.params:
            st = opt.state[p]
            if not st:  # what Adam's lazy init would create (fused: float32 step tensors)
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.grads = [p.grad for p in self.params]
        self.exp_avgs = [opt.state[p]["exp_avg"] for p in self.params]
        self.exp_avg_sqs = [opt.state[p]["exp_avg_sq"] for p in self.params]
        self.steps = [opt.state[p]["step"] for p in self.params]
        decoupled = isinstance(opt, torch.optim.AdamW) or self.group.get("decoupled_weight_decay")
        self.kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_

    @staticmethod
    def supported(opt: torch.optim.Optimizer) -> bool:
        group = opt.param_groups[0]
        return (
            len(opt.param_groups) == 1
            and isinstance(opt, torch.optim.Adam | torch.optim.AdamW)
            and bool(group.get("fused"))
            and not group["amsgrad"]
            and not group["maximize"]
        )

    def step(self) -> None:
        g = self.group
        torch._foreach_add_(self.steps, 1)
        self.kernel(
            self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps,
            lr=float(g["lr"]), beta1=g["betas"][0], beta2=g["betas"][1],
            weight_decay=g["weight_decay"], eps=g["eps"], amsgrad=False, maximize=False,
        )  # fmt: skip
