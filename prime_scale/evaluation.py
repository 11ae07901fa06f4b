"""The evaluator's core: the valid NLL bound per original token (docs/method.md, the sub-token ELBO), its
perplexity and standard error, for any `logits_fn(yt: Long[B, L*ell]) -> logits[B, L, V]`.

Every number called a bound or a perplexity here comes from `subtoken_elbo`. The paper's joint
objective (a) is reported next to it as `train_objective_joint`: a training objective, which for
ell > 1 can sit below the data entropy, so it is never turned into a perplexity.

Noise: each of the K Monte Carlo draws of a sequence comes from `prime_noise`, keyed by the seed,
an eval pass key and the sequence's GLOBAL index (batch["index"]), so the result is deterministic
for a seed and does not depend on how the sequences are split into batches or ranks. The default
pass key is the same for every evaluation, so two checkpoints are compared on the same noise.

Two ways to stratify the time t (both give an unbiased estimate; tests check each against exact
enumeration):
  global_batch=None  the K draws of one sequence form the antithetic group: draw k of sequence g is
                     prime_noise(seed, step_key, g*K + k, global_batch=K). Sequences get
                     independent noise, so the standard error across sequences is exact.
  global_batch=G     training-style: draw k of sequence g is prime_noise(seed, step_key - k, g, G),
                     t stratified over G consecutively indexed sequences. With K = 1 and
                     step_key = a training step this is that step's noise. The standard error is
                     then slightly conservative (stratification makes sequences anti-correlated).

Standard error: the result is a ratio Σ n_i / Σ m_i (n_i the sequence's bound averaged over its
K draws, m_i its token count); its standard error is the delta-method one,
sqrt(Σ (n_i - R m_i)² / (n (n - 1))) / mean(m). It covers the spread over sequences and over
noise. For distributed evaluation, reduce `EvalTotals.to_tensor()` with a sum across data-parallel
ranks and rebuild with `EvalTotals.from_tensor`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping

import torch

from prime_scale.errors import UserError
from prime_scale.noise import prime_noise
from prime_scale.prime import EPS, apply_mask, carry_over_log_probs, joint_loss, plain_log_probs, subtoken_elbo

EVAL_STEP_KEY = -1  # training keys its noise by steps >= 0; evaluation by negative pass keys

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalTotals:
    """Sums over evaluated sequences, all additive (so they can be all-reduced across ranks)."""
    sequences: float = 0.0  # sequences with at least one token
    tokens: float = 0.0  # Σ m_i
    nll: float = 0.0  # Σ n_i, the sub-token ELBO, averaged over the K draws of each sequence
    joint: float = 0.0  # Σ of the joint objective, same averaging
    nll_sq: float = 0.0  # Σ n_i²
    tokens_sq: float = 0.0  # Σ m_i²
    nll_tokens: float = 0.0  # Σ n_i m_i

    def add(self, seq_nll: torch.Tensor, seq_joint: torch.Tensor, seq_tokens: torch.Tensor) -> None:
        n, j, m = seq_nll.double(), seq_joint.double(), seq_tokens.double()
        self.sequences += float((m > 0).sum())
        self.tokens += float(m.sum())
        self.nll += float(n.sum())
        self.joint += float(j.sum())
        self.nll_sq += float((n * n).sum())
        self.tokens_sq += float((m * m).sum())
        self.nll_tokens += float((n * m).sum())

    def to_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(list(asdict(self).values()), dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "EvalTotals":
        return cls(*values.double().tolist())

    def stderr(self) -> float:
        """Delta-method standard error of nll / tokens (nan with fewer than two sequences)."""
        n = self.sequences
        if n < 2 or self.tokens <= 0:
            return float("nan")
        r = self.nll / self.tokens
        sq_dev = self.nll_sq - 2 * r * self.nll_tokens + r * r * self.tokens_sq
        return math.sqrt(max(sq_dev, 0.0) / (n * (n - 1))) / (self.tokens / n)


@dataclass
class EvalResult:
    nll_per_token: float  # the sub-token ELBO per original token: a valid NLL upper bound (nats)
    ppl: float  # exp(nll_per_token): an upper bound on the perplexity
    stderr: float  # standard error of nll_per_token
    tokens: int
    sequences: int
    train_objective_joint: float  # the paper's joint objective per token: NOT a likelihood
    mc_samples: int
    seed: int
    step_key: int
    global_batch: int | None
    vocab_size: int
    ell: int
    carry_over: bool

    @classmethod
    def from_totals(cls, totals: EvalTotals, **meta) -> "EvalResult":
        if totals.tokens <= 0:
            raise UserError("evaluation: no tokens were evaluated; the evaluation data is empty or "
                            "every position is padding")
        nll = totals.nll / totals.tokens
        return cls(nll_per_token=nll, ppl=_exp(nll), stderr=totals.stderr(),
                   tokens=int(totals.tokens), sequences=int(totals.sequences),
                   train_objective_joint=totals.joint / totals.tokens, **meta)

    def ppl_ci95(self) -> tuple[float, float]:
        """95% interval of the perplexity bound, from the normal interval of the NLL."""
        if math.isnan(self.stderr):
            return (float("nan"), float("nan"))
        return (_exp(self.nll_per_token - 1.96 * self.stderr), _exp(self.nll_per_token + 1.96 * self.stderr))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ppl_ci95"] = list(self.ppl_ci95())
        d["bound"] = "subtoken_elbo"
        d["train_objective_joint_note"] = ("the paper's training objective (joint form); not a "
                                           "likelihood bound for ell > 1, never a perplexity")
        return _nan_to_none(d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def format_table(self) -> str:
        lo, hi = self.ppl_ci95()
        rows = [
            ("NLL bound per token (nats)", f"{self.nll_per_token:.4f} ± {self.stderr:.4f} (s.e.)"),
            ("perplexity bound", f"{self.ppl:.3f}   (95%: {lo:.3f} – {hi:.3f})"),
            ("tokens", f"{self.tokens:,}"),
            ("sequences", f"{self.sequences:,}"),
            ("noise draws per sequence (K)", str(self.mc_samples)),
            ("train objective, joint (not a likelihood)", f"{self.train_objective_joint:.4f}"),
        ]
        width = max(len(k) for k, _ in rows)
        head = (f"sub-token ELBO evaluation: V={self.vocab_size}, ell={self.ell}, carry-over "
                f"{'on' if self.carry_over else 'off'}, seed {self.seed}")
        return "\n".join([head] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def evaluate_bound(logits_fn: LogitsFn, batches: Iterable[Mapping[str, torch.Tensor]], *, vocab_size: int,
                   ell: int, seed: int, mc_samples: int = 1, global_batch: int | None = None,
                   step_key: int = EVAL_STEP_KEY, carry_over: bool = True) -> EvalResult:
    """The sub-token ELBO per token over `batches` of {"input_ids": Long[B, L], "index": Long[B]}
    (optional "attention_mask" [B, L]: 0 marks padding), K = mc_samples noise draws per sequence.
    `carry_over` must match how the model was trained (model.carry_over)."""
    totals = bound_totals(logits_fn, batches, vocab_size=vocab_size, ell=ell, seed=seed,
                          mc_samples=mc_samples, global_batch=global_batch, step_key=step_key,
                          carry_over=carry_over)
    return EvalResult.from_totals(totals, mc_samples=mc_samples, seed=seed, step_key=step_key,
                                  global_batch=global_batch, vocab_size=vocab_size, ell=ell,
                                  carry_over=carry_over)


def bound_totals(logits_fn: LogitsFn, batches: Iterable[Mapping[str, torch.Tensor]], *, vocab_size: int,
                 ell: int, seed: int, mc_samples: int = 1, global_batch: int | None = None,
                 step_key: int = EVAL_STEP_KEY, carry_over: bool = True) -> EvalTotals:
    """The additive sums behind `evaluate_bound`, for one rank's share of the data."""
    K = int(mc_samples)
    if K < 1:
        raise UserError(f"evaluation: the number of Monte Carlo samples must be at least 1, got {mc_samples}")
    if global_batch is not None and int(global_batch) < 1:
        raise UserError(f"evaluation: global_batch must be at least 1, got {global_batch}")
    totals = EvalTotals()
    seen: set[int] = set()
    with torch.no_grad():
        for number, batch in enumerate(batches):
            x0, index, attended = _check_batch(batch, number, vocab_size, seen)
            B, L = x0.shape
            seq_nll = torch.zeros(B, dtype=torch.float64, device=x0.device)
            seq_joint = torch.zeros_like(seq_nll)
            for k in range(K):
                if global_batch is None:
                    t, mask = prime_noise(seed, step_key, index * K + k, K, L, ell, EPS)
                else:
                    t, mask = prime_noise(seed, step_key - k, index, int(global_batch), L, ell, EPS)
                yt = apply_mask(x0, mask, vocab_size, ell)
                logits = logits_fn(yt)
                if tuple(logits.shape) != (B, L, vocab_size):
                    raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected "
                                     f"{(B, L, vocab_size)} for input of shape {tuple(yt.shape)}")
                log_p = carry_over_log_probs(logits, yt, vocab_size, ell) if carry_over else plain_log_probs(logits)
                elbo, _ = subtoken_elbo(log_p, x0, yt, t, attended, vocab_size, ell)
                joint, _ = joint_loss(log_p, x0, t, attended)
                seq_nll += elbo.double().sum(-1)
                seq_joint += joint.double().sum(-1)
            totals.add(seq_nll / K, seq_joint / K, attended.sum(-1))
    return totals


def _check_batch(batch: Mapping[str, torch.Tensor], number: int, vocab_size: int, seen: set[int]):
    """(x0, index, attention mask as bool), with clear errors."""
    for key in ("input_ids", "index"):
        if key not in batch:
            raise UserError(f"evaluation: batch {number} has no '{key}' (keys: {sorted(batch)}); "
                            "evaluation batches need 'input_ids' [B, L] and 'index' [B]")
    x0 = torch.as_tensor(batch["input_ids"]).long()
    index = torch.as_tensor(batch["index"]).long().to(x0.device)
    if x0.dim() != 2 or index.shape != (x0.shape[0],):
        raise UserError(f"evaluation: batch {number} has input_ids of shape {tuple(x0.shape)} and index "
                        f"of shape {tuple(index.shape)}; expected [B, L] and [B]")
    attended = batch.get("attention_mask")
    attended = (torch.ones_like(x0, dtype=torch.bool) if attended is None
                else torch.as_tensor(attended).to(x0.device).bool())
    if attended.shape != x0.shape:
        raise UserError(f"evaluation: batch {number} has attention_mask of shape {tuple(attended.shape)} "
                        f"but input_ids of shape {tuple(x0.shape)}")
    bad = attended & ((x0 < 0) | (x0 >= vocab_size))
    if bool(bad.any()):
        value = int(x0[bad][0])
        raise UserError(f"evaluation: batch {number} holds token id {value} outside [0, {vocab_size}); "
                        "the data was tokenized with a tokenizer that does not match the model")
    if bool((index < 0).any()):
        raise UserError(f"evaluation: batch {number} has a negative sample index")
    for i in index.tolist():
        if i in seen:
            raise UserError(f"evaluation: sample index {i} occurs twice (batch {number}); indices must "
                            "be unique global sample indices, or two sequences share their noise")
        seen.add(i)
    # padding keeps the data's pad id where it is a valid token (the model saw it so in training)
    return x0.masked_fill(~attended & ((x0 < 0) | (x0 >= vocab_size)), 0), index, attended


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def _nan_to_none(value):
    """JSON has no NaN or infinity: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value
