"""The bound of a continuation given a context: −log p(continuation | context) ≤ the conditional
sub-token ELBO, from K Monte Carlo draws. The lm-evaluation-harness backend
(prime_scale/lm_eval_model.py) scores every request through here.

What is bounded: the model's generative process run with the context's sub-tokens given and fixed
and every sub-token of the continuation masked at the start. Its NELBO is the evaluator's estimator
(prime_scale.evaluation, docs/method.md) with only the continuation counted: a draw masks k of the
N = ℓ·|continuation| sub-tokens (k uniform on 1..N, stratified over the K draws, the set uniform of
size k), the context stays unmasked, and the weight is N/k. Each draw is built by
noise.make_eval_batch and scored by evaluation.objective_sums, the code `prime-scale eval` runs.

The noise of a request is keyed by (seed, draw, a hash of its token ids), never by its place in a
batch: a request gets the same draws whatever else is evaluated with it, in whatever order and
batch size. Forward passes stack only requests of the same length (the transformer attends over
every position, so a padded row would change the others' logits); the rows of one request are its
K draws.

A continuation longer than the model's window is scored by the chain rule over windows
(`windows`): each piece of at most seq_len − 1 tokens given the tokens before it that fit. The sum
of the pieces' bounds bounds −log of the product of the pieces' conditionals.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from prime_scale.noise import EVAL_NOISE_STEP, Batch, generator_seed, make_eval_batch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # yt [B, L·ℓ] -> logits [B, L, V]
Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
GENERATION_STEP = EVAL_NOISE_STEP + (1 << 40)  # the sampler's key step: apart from every noise draw's


@dataclass(frozen=True)
class ConditionalBound:
    """The bound of one continuation: `nll` ≥ −log p(continuation | context), in nats."""
    nll: float  # the mean of the K draws' conditional NELBO
    stderr: float  # Monte Carlo standard error of `nll` (sample s.d. of the draws / √K; nan for K = 1)
    tokens: int  # continuation tokens
    draws: int

    def __add__(self, other: "ConditionalBound") -> "ConditionalBound":
        """The bound of two independent pieces (chain rule): the sum, errors in quadrature."""
        return ConditionalBound(self.nll + other.nll, math.sqrt(self.stderr ** 2 + other.stderr ** 2),
                                self.tokens + other.tokens, self.draws)


def request_key(context: Sequence[int], continuation: Sequence[int]) -> int:
    """The noise key of a (context, continuation) pair: 62 bits of a hash of both id lists (with
    their lengths, so no two pairs of different split collide by concatenation)."""
    h = hashlib.blake2b(digest_size=8)
    for ids in (context, continuation):
        h.update(len(ids).to_bytes(8, "little"))
        h.update(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 62) - 1)


def generation_seed(seed: int, prompt: Sequence[int], new_tokens: int, occurrence: int = 0) -> int:
    """The sampler's seed for a generation request: keyed by (seed, the prompt's ids, how many tokens
    it asks for, which repeat of the same request it is), so it is the same whatever else is
    generated with it, and a task's repeated samples differ."""
    return generator_seed(seed, GENERATION_STEP, request_key(prompt, [new_tokens, occurrence]))


def windows(context: Sequence[int], continuation: Sequence[int], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """The continuation cut into pieces of at most seq_len − 1 tokens, each with the most of what
    precedes it that fits in seq_len (the context truncated from the left); one piece when it fits."""
    if seq_len < 2:
        raise ValueError(f"a window of {seq_len} tokens cannot hold a context token and a continuation token")
    before, rest = list(context), list(continuation)
    out = []
    while rest:
        piece, rest = rest[: seq_len - 1], rest[seq_len - 1:]
        room = seq_len - len(piece)
        out.append((before[-room:], piece))
        before = before + piece
    return out


def conditional_bounds(logits_fn: LogitsFn, pairs: Sequence[Pair], *, vocab_size: int, ell: int, seed: int,
                       mc_samples: int, carry_over: bool = True, batch_size: int = 8,
                       device: Optional[torch.device] = None,
                       progress: Optional[Callable[[int], None]] = None) -> list[ConditionalBound]:
    """The bound of every (context, continuation) pair, each fitting the model's window. `batch_size`
    requests (of one length) share a forward pass; it changes how fast, never what comes out.
    `progress(n)` is called after each pass with the number of requests it scored."""
    from prime_scale.evaluation import objective_sums
    from prime_scale.model.vocab_parallel import reported_bound

    K = int(mc_samples)
    if K < 1:
        raise ValueError(f"the number of Monte Carlo draws must be at least 1, got {mc_samples}")
    sums = objective_sums(logits_fn, vocab_size, ell, carry_over)
    by_length: dict[int, list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        by_length.setdefault(len(context) + len(continuation), []).append(i)
    out: list[Optional[ConditionalBound]] = [None] * len(pairs)
    for members in by_length.values():
        for start in range(0, len(members), max(1, int(batch_size))):
            chunk = members[start:start + max(1, int(batch_size))]
            rows = [_draws(pairs[i], vocab_size, ell, seed, K) for i in chunk]
            merged = _concat([b for r in rows for b in r])
            if device is not None:
                merged = merged.to(device)
            with reported_bound("the conditional bound"):  # no autograd, every position exact
                elbo = sums([merged])[:, 0].double().cpu().view(len(chunk), K)
            for i, per_draw in zip(chunk, elbo):
                stderr = float(per_draw.std(unbiased=True)) / math.sqrt(K) if K > 1 else math.nan
                out[i] = ConditionalBound(float(per_draw.mean()), stderr, len(pairs[i][1]), K)
            if progress is not None:
                progress(len(chunk))
    return out  # type: ignore[return-value]


def _draws(pair: Pair, vocab_size: int, ell: int, seed: int, K: int) -> list[Batch]:
    """The K evaluation draws of one pair, each a one-row Batch: the context given, the
    continuation counted and noised."""
    context, continuation = (list(p) for p in pair)
    x0 = torch.tensor([context + continuation], dtype=torch.long)
    counted = torch.zeros_like(x0, dtype=torch.bool)
    counted[0, len(context):] = True
    index = torch.tensor([request_key(context, continuation)])
    return [make_eval_batch(x0, index, seed=seed, draw=k, draws=K, vocab_size=vocab_size, ell=ell,
                            attention_mask=counted) for k in range(K)]


def _concat(batches: Sequence[Batch]) -> Batch:
    return Batch(x0=torch.cat([b.x0 for b in batches]), yt=torch.cat([b.yt for b in batches]),
                 t=torch.cat([b.t for b in batches]), mask=torch.cat([b.mask for b in batches]))
