"""The ancestral sub-token sampler (docs/sampling.md), independent of any model or checkpoint.

The caller passes a model as `logits_fn(yt: Long[B, L*ell]) -> logits[B, L, V]` (a distribution over
whole tokens; the model has no time input), or split in two as a `Predictor`: `states(yt)` gives a
per-position state [B, L, S] (a transformer's last hidden state) and `logits_at(states[n, S])` the
logits [n, V] at chosen positions (its output head); a loaded checkpoint (inference.LoadedModel) is one. The sampler:

  1. starts with every sub-token masked (the symbol b), an optional prefix copied in unmasked;
  2. walks the grid t_k = linspace(1, 1e-5, steps + 1); at each step (t, s) every still-masked
     sub-token reveals with probability (t - s)/t. Positions with at least one revealing sub-token
     draw ONE whole token x̂ from p(· | yt) (carry-over restricted, temperature, nucleus) and take
     x̂'s digits for the revealing sub-tokens. Revealed sub-tokens never change;
  3. after the grid, fills whatever is still masked from a last draw.

What a step costs. p(· | yt) of a sequence depends only on that sequence's yt, and a sequence's yt
changes only when it reveals something, so its states are computed at the steps where it draws and
at no other (per-sequence caching): the network runs once per step on the sequences that draw
(`nfe` counts those calls, `seq_nfe` each sequence's share), and not at all in a step where none
does. The head, the carry-over restriction, temperature and nucleus run only at the positions that
draw (a few per sequence per step), never over all B·L positions. The final fill runs only for the
sequences with something left masked.

Reveal coins are drawn before the token draw, and tokens are drawn only at positions that reveal
something: the coins do not depend on x̂, so this is the same distribution at far less cost.

Without carry-over a drawn token may disagree with digits revealed earlier. As in the reference,
only still-masked digits are taken from it, so the final digits of a token can form a different
token or a code >= V. Such codes are counted in `invalid_codes` and returned as INVALID_TOKEN (-1)
in `tokens`; the raw digits stay in `subtokens`. With carry-over every draw agrees with the visible
digits, so no invalid code can arise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union

import torch

from prime_scale.errors import UserError
from prime_scale.prime import base_for, carry_over_log_probs, desubtokenize, plain_log_probs, subtokenize

T_END = 1e-5  # last grid point, as in the reference sampler
INVALID_TOKEN = -1  # `tokens` entry for a final digit tuple that decodes to a code >= V

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


class Predictor(Protocol):
    """A model split at its output head, so the head runs only where a draw needs it."""

    def states(self, yt: torch.Tensor) -> torch.Tensor:
        """yt [B, L·ℓ] -> per-position states [B, L, S]."""

    def logits_at(self, states: torch.Tensor) -> torch.Tensor:
        """states [n, S] of n chosen positions -> their logits [n, V] (fp32)."""


class WholeLogits:
    """A plain logits_fn as a Predictor: its state is the logits row itself."""

    def __init__(self, logits_fn: LogitsFn, vocab_size: int, ell: int):
        self.logits_fn, self.vocab_size, self.ell = logits_fn, vocab_size, ell

    def states(self, yt: torch.Tensor) -> torch.Tensor:
        logits = self.logits_fn(yt.clone())  # a copy: the sampler edits yt in place later
        expected = (yt.shape[0], yt.shape[1] // self.ell, self.vocab_size)
        if tuple(logits.shape) != expected:
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected {expected} "
                             f"(batch, tokens, vocabulary) for input of shape {tuple(yt.shape)} (batch, tokens*ell)")
        return logits

    def logits_at(self, states: torch.Tensor) -> torch.Tensor:
        return states


def as_predictor(model: Union[LogitsFn, Predictor], vocab_size: int, ell: int) -> Predictor:
    return model if hasattr(model, "states") and hasattr(model, "logits_at") else WholeLogits(model, vocab_size, ell)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # Long[B, L]; INVALID_TOKEN where the digits decode to a code >= V
    subtokens: torch.Tensor  # Long[B, L*ell], the final digits (no mask symbol left)
    nfe: int  # network calls made (each on the sequences that drew at that step)
    steps: int
    idle_steps: int  # grid steps that revealed no sub-token anywhere in the batch
    seq_idle_steps: torch.Tensor  # Long[B]: steps that revealed nothing in that sequence
    invalid_codes: int  # final digit tuples decoding to a code >= V (0 with carry-over)
    seq_nfe: torch.Tensor | None = None  # Long[B]: the network calls that computed each sequence

    @property
    def isr(self) -> float:
        """Idle-step ratio of the batch: the steps that saved a network call."""
        return self.idle_steps / self.steps

    @property
    def seq_isr(self) -> float:
        """Mean per-sequence idle-step ratio: the paper's ISR, comparable across batch sizes."""
        return float(self.seq_idle_steps.double().mean()) / self.steps


def time_grid(steps: int) -> list[float]:
    """t_0 = 1 > t_1 > ... > t_steps = T_END, evenly spaced (float64)."""
    return torch.linspace(1.0, T_END, steps + 1, dtype=torch.float64).tolist()


def expected_isr(masked_subtokens: int, steps: int) -> float:
    """Closed-form expected idle-step ratio for one sequence with this many initially masked
    sub-tokens. A sub-token reveals at step k with probability (t_k/t_0)·(t_k - t_{k+1})/t_k =
    dt = (1 - T_END)/steps, the same for every step, independently of the others and of the
    model, so a step is idle with probability (1 - dt)^N ≈ (1 - 1/T)^(L·ell)."""
    return (1.0 - (1.0 - T_END) / steps) ** masked_subtokens


def ancestral_sample(model: Union[LogitsFn, Predictor], batch_size: int, seq_len: int, vocab_size: int, ell: int,
                     steps: int, *, top_p: float = 1.0, temperature: float = 1.0,
                     prefix: torch.Tensor | None = None, carry_over: bool = True,
                     generator: torch.Generator | None = None, device=None) -> SampleResult:
    """Draw `batch_size` sequences of `seq_len` tokens from `model` (a logits_fn or a Predictor).
    `prefix` (Long[P] token ids, P <= seq_len) is copied, fully unmasked, into the first P positions
    of every sequence. All randomness comes from `generator` (on `device`), so a seeded generator
    gives the same samples."""
    _check_args(batch_size, seq_len, vocab_size, ell, steps, top_p, temperature)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    predictor = as_predictor(model, vocab_size, ell)
    B, L, V = batch_size, seq_len, vocab_size
    b = base_for(V, ell)

    yt = torch.full((B, L * ell), b, dtype=torch.long, device=device)
    if prefix is not None:
        prefix = _check_prefix(prefix, L, V).to(device)
        yt[:, : prefix.numel() * ell] = subtokenize(prefix, V, ell)

    cache = _StateCache(predictor, B, device)

    def reveal(coins: torch.Tensor) -> None:
        """Set the sub-tokens marked in coins[B, L*ell] (all masked) to the digits of one draw per
        token position that has any of them."""
        r = coins.view(B, L, ell)
        need = r.any(-1)  # [B, L] positions that draw
        states = cache.states_at(yt, need)  # [n, S], row-major over (sequence, position)
        y = yt.view(B, L, ell)
        probs = _distribution(predictor.logits_at(states), y[need], V, ell, carry_over, temperature, top_p)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        digits = subtokenize(drawn.unsqueeze(-1), V, ell)  # [n, ell]
        y[need] = torch.where(r[need], digits, y[need])
        cache.changed(need.any(-1))

    with torch.no_grad():
        grid = time_grid(steps)
        seq_idle = torch.zeros(B, dtype=torch.long, device=device)
        idle = 0
        for k in range(steps):
            t, s = grid[k], grid[k + 1]
            coins = torch.rand(B, L * ell, generator=generator, device=device) < (t - s) / t
            coins &= yt == b
            row_moves = coins.any(-1)
            seq_idle += ~row_moves
            if bool(row_moves.any()):
                reveal(coins)
            else:
                idle += 1
        if bool((yt == b).any()):  # the final fill: everything still masked, from one more draw
            reveal(yt == b)

    codes = desubtokenize(yt, V, ell)
    invalid = codes >= V
    return SampleResult(tokens=codes.masked_fill(invalid, INVALID_TOKEN), subtokens=yt, nfe=cache.calls,
                        steps=steps, idle_steps=idle, seq_idle_steps=seq_idle,
                        invalid_codes=int(invalid.sum()), seq_nfe=cache.seq_calls)


class _StateCache:
    """Per-sequence states, recomputed only for sequences whose yt changed since their last call."""

    def __init__(self, predictor: Predictor, batch: int, device):
        self.predictor, self.states = predictor, None
        self.fresh = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seq_calls = torch.zeros(batch, dtype=torch.long, device=device)
        self.calls = 0

    def states_at(self, yt: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """The states [n, S] of the positions in need [B, L], computing the stale sequences first."""
        stale = need.any(-1) & ~self.fresh
        if bool(stale.any()):
            rows = stale.nonzero().squeeze(1)
            computed = self.predictor.states(yt[rows])
            if self.states is None:
                self.states = computed.new_empty((yt.shape[0], *computed.shape[1:]))
            self.states[rows] = computed
            self.fresh[rows] = True
            self.seq_calls[rows] += 1
            self.calls += 1
        return self.states[need]

    def changed(self, rows: torch.Tensor) -> None:
        self.fresh &= ~rows


def greedy_decode(model: Union[LogitsFn, Predictor], prefix: torch.Tensor, length: int, vocab_size: int,
                  ell: int, *, carry_over: bool = True, device=None) -> torch.Tensor:
    """The deterministic greedy fill of tokens P..length−1 after `prefix` (Long[P], kept fixed):
    every network call fixes one token, at the still-masked position whose most probable token is the
    most probable (ties: the leftmost), to that token. length − P calls. Returns Long[length − P].

    Greedy decoding of a masked diffusion model needs an order; confidence order is the one that
    depends on nothing but the model. The harness's `is_greedy` and zero-temperature generation
    (prime_scale/lm_eval_model.py) use it."""
    _check_args(1, length, vocab_size, ell, 1, 1.0, 1.0)
    device = torch.device(device) if device is not None else torch.device("cpu")
    predictor = as_predictor(model, vocab_size, ell)
    prefix = _check_prefix(prefix, length, vocab_size).to(device)
    V, b, P = vocab_size, base_for(vocab_size, ell), prefix.numel()
    yt = torch.full((1, length * ell), b, dtype=torch.long, device=device)
    yt[0, : P * ell] = subtokenize(prefix, V, ell)
    tokens = torch.full((length,), -1, dtype=torch.long, device=device)
    tokens[:P] = prefix
    with torch.no_grad():
        for _ in range(length - P):
            masked = (tokens < 0).nonzero().squeeze(1)  # the positions still to fill, in order
            states = predictor.states(yt)[0, masked]
            probs = _distribution(predictor.logits_at(states), yt.view(length, ell)[masked], V, ell, carry_over, 1.0, 1.0)
            best, choice = probs.max(-1)  # the top probability and its token at each masked position
            pick = int(best.argmax())  # the first maximum: the leftmost on a tie
            position = int(masked[pick])
            tokens[position] = choice[pick]
            yt[0, position * ell:(position + 1) * ell] = subtokenize(choice[pick].view(1), V, ell)
    return tokens[P:]


def _distribution(logits: torch.Tensor, digits: torch.Tensor, V: int, ell: int, carry_over: bool,
                  temperature: float, top_p: float) -> torch.Tensor:
    """probs[n, V] to draw from at n positions, given their logits [n, V] and their current digits
    [n, ell] (unnormalised after the nucleus cut; multinomial renormalises)."""
    if logits.shape != (digits.shape[0], V):
        raise ValueError(f"the model gave logits of shape {tuple(logits.shape)} at {digits.shape[0]} positions; "
                         f"expected ({digits.shape[0]}, {V}) (positions, vocabulary)")
    log_p = (carry_over_log_probs(logits.unsqueeze(1), digits, V, ell).squeeze(1) if carry_over
             else plain_log_probs(logits))
    if temperature != 1.0:
        log_p = torch.log_softmax(log_p / temperature, dim=-1)
    probs = log_p.exp()
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    if not bool(torch.isfinite(probs).all()) or not bool((probs.sum(-1) > 0).all()):
        raise ValueError("logits_fn gave NaN logits or no finite logit for any allowed token")
    return probs


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches top_p (the first is always kept)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_ahead = sorted_p.cumsum(-1) - sorted_p
    drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_ahead >= top_p)
    return probs.masked_fill(drop, 0.0)


def _check_args(batch_size, seq_len, vocab_size, ell, steps, top_p, temperature) -> None:
    for name, value in (("batch size", batch_size), ("sequence length", seq_len), ("steps", steps),
                        ("ell", ell)):
        if int(value) < 1:
            raise UserError(f"sampling: {name} must be at least 1, got {value}")
    if vocab_size < 2:
        raise UserError(f"sampling: the vocabulary size must be at least 2, got {vocab_size}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"sampling: nucleus top_p must be in (0, 1], got {top_p}")
    if not temperature > 0.0:
        raise UserError(f"sampling: temperature must be positive, got {temperature}")


def _check_prefix(prefix: torch.Tensor, seq_len: int, vocab_size: int) -> torch.Tensor:
    prefix = torch.as_tensor(prefix).long()
    if prefix.dim() != 1:
        raise UserError(f"sampling: the prefix must be one sequence of token ids, got shape {tuple(prefix.shape)}")
    if prefix.numel() > seq_len:
        raise UserError(f"sampling: the prompt has {prefix.numel()} tokens but the sequence length is "
                        f"{seq_len}; shorten the prompt or raise the sequence length")
    if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= vocab_size):
        raise UserError(f"sampling: the prompt holds token ids outside [0, {vocab_size}); it was "
                        "encoded with a tokenizer that does not match the model's vocabulary")
    return prefix
