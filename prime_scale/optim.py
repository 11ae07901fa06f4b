"""Optimisation pieces the engine composes: the LR schedule, parameter groups, and the weight EMA."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from prime_scale.config import Config


def lr_factor(cfg: Config, step: int) -> float:
    """Multiplier of optim.lr for optimizer step `step` (0-based): linear warm-up to 1 over
    warmup_steps, then constant, or cosine / linear decay to min_lr_ratio at train.steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, cfg.train.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    if o.schedule == "cosine":
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1 - o.min_lr_ratio) * progress



def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases or embedding tables)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def undo_priming_step(optimizer) -> None:
    """Give back the AdamW step DeepSpeed's FP16_UnfusedOptimizer (bf16 without ZeRO) takes in its
    constructor on zero gradients, so that training starts where a plain torch AdamW would: the
    step decays the fp32 master weights once (decoupled weight decay at the full LR) and sets
    Adam's step count to 1 (the first real step's bias correction is then 1 - β^2, not 1 - β).
    Exact: the masters were made as float copies of the bf16 weights, which that step left alone,
    and torch's AdamW creates its state lazily at its first step. Other optimizers: nothing to do."""
    if type(optimizer).__name__ != "FP16_UnfusedOptimizer":
        return
    for masters, weights in zip(optimizer.fp32_groups, optimizer.fp16_groups):
        for master, weight in zip(masters, weights):
            master.copy_(weight.float())
    optimizer.optimizer.state.clear()



class WeightEMA:
    """Exponential moving average of the weights this rank holds (its TP/PP slice, and under
    ZeRO-3 its partition), kept in fp32. `swapped()` puts the averages into the live weights for
    evaluation and restores the training weights afterwards, bit for bit."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        # ZeRO-3 keeps each rank's partition in p.ds_tensor (p.data is empty between uses)
        self.tensors = [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in module.parameters()]
        self.shadow = [x.detach().float().clone() for x in self.tensors]

    @torch.no_grad()
    def update(self) -> None:
        for avg, x in zip(self.shadow, self.tensors):
            avg.mul_(self.decay).add_(x.float(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        backup = [x.detach().clone() for x in self.tensors]
        with torch.no_grad():
            for x, avg in zip(self.tensors, self.shadow):
                x.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for x, saved in zip(self.tensors, backup):
                    x.copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        for avg, saved in zip(self.shadow, state["shadow"]):
            avg.copy_(saved)


