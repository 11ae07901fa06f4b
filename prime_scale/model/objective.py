"""The training objective as a loss function over the output head's logits shard.

Called with (logits_shard, labels) where labels = (x0, yt, t, mask): the signature a pipeline engine
gives its loss function, so the last stage computes the loss from the batch it read itself.
"""

from __future__ import annotations

import torch

from prime_scale.model import vocab_parallel


class PrimeObjective:
    """`objective` is 'prime_elbo' (the valid bound, sub-token ELBO) or 'prime_joint' (the
    paper's training loss); both computed on vocabulary shards over the tensor-parallel group
    (`tp_group`, None for one rank) in which this rank holds shard `tp_rank`."""

    def __init__(self, vocab_size: int, ell: int, objective: str = "prime_elbo", carry_over: bool = True,
                 tp_rank: int = 0, tp_group=None):
        if objective not in vocab_parallel.OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}: use one of {vocab_parallel.OBJECTIVES}")
        self.vocab_size, self.ell, self.objective, self.carry_over = vocab_size, ell, objective, carry_over
        self.tp_rank, self.tp_group = tp_rank, tp_group

    def with_objective(self, objective: str) -> "PrimeObjective":
        return PrimeObjective(self.vocab_size, self.ell, objective, self.carry_over, self.tp_rank, self.tp_group)

    def nll(self, logits_shard, x0, yt, t, attention_mask=None, backward: bool = False):
        """(nll [B, L] per token, mean over attended tokens). backward=True only for a loss that is
        backpropagated (training): on an accelerator it may cap extreme positions' cost, which no
        reported bound may (model/vocab_parallel.py)."""
        local = logits_shard.shape[-1]
        return vocab_parallel.prime_loss_parallel(
            logits_shard, x0, yt, t, attention_mask, self.vocab_size, self.ell,
            vocab_start=self.tp_rank * local, group=self.tp_group, objective=self.objective,
            carry_over=self.carry_over, backward=backward)

    def sequence_sums(self, logits_shard, x0, yt, t, mask):
        """[B, 2] float64: per row, Σ of the sub-token ELBO (the bound) and Σ of the joint objective
        over the counted positions (mask), both from the same logits: what evaluation adds up."""
        sums = []
        for objective in ("prime_elbo", "prime_joint"):
            nll, _ = self.with_objective(objective).nll(logits_shard, x0, yt, t, mask)
            sums.append(nll.double().sum(-1))
        return torch.stack(sums, dim=-1)

    def __call__(self, logits_shard, labels):
        """The training loss (the mean), which the engine backpropagates."""
        x0, yt, t, mask = labels
        return self.nll(logits_shard, x0, yt, t, mask, backward=True)[1]
