"""The training objective as a loss function over the output head's logits shard.

Called with (logits_shard, labels) where labels = (x0, yt, t, mask): the signature a pipeline engine
gives its loss function, so the last stage computes the loss from the batch it read itself.
"""

from __future__ import annotations

from megatron.core import parallel_state as mps

from prime_scale.model import vocab_parallel


class PrimeObjective:
    """`objective` is 'prime_elbo' (the valid bound, sub-token ELBO) or 'prime_joint' (the
    paper's training loss); both computed on vocabulary shards over megatron's TP group."""

    def __init__(self, vocab_size: int, ell: int, objective: str = "prime_elbo", carry_over: bool = True):
        if objective not in vocab_parallel.OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}: use one of {vocab_parallel.OBJECTIVES}")
        self.vocab_size, self.ell, self.objective, self.carry_over = vocab_size, ell, objective, carry_over

    def with_objective(self, objective: str) -> "PrimeObjective":
        return PrimeObjective(self.vocab_size, self.ell, objective, self.carry_over)

    def nll(self, logits_shard, x0, yt, t, attention_mask=None):
        """(nll [B, L] per token, mean over attended tokens)."""
        local = logits_shard.shape[-1]
        return vocab_parallel.prime_loss_parallel(
            logits_shard, x0, yt, t, attention_mask, self.vocab_size, self.ell,
            vocab_start=mps.get_tensor_model_parallel_rank() * local,
            group=mps.get_tensor_model_parallel_group(), objective=self.objective, carry_over=self.carry_over)

    def __call__(self, logits_shard, labels):
        x0, yt, t, mask = labels
        return self.nll(logits_shard, x0, yt, t, mask)[1]
