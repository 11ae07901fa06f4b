"""The one estimator of the NLL bound: `prime-scale eval`, training validation and the tests all run it.

What it reports (docs/method.md): the sub-token ELBO per original token, under the evaluation noise
of prime_scale.noise (`eval_noise`): the linear schedule α_t = 1 − t with t integrated out, so its
expectation is exactly the NELBO of a proper generative model (no ε truncation, no prior term left
out) and therefore an upper bound on −log p(x). Then: its perplexity, its standard error, bits per
byte (with the split's UTF-8 byte count recorded at prep time: each sequence is credited its split's
mean bytes, the text's own bytes over a whole split, an estimate over a part of it, labelled
`bits_per_byte_estimated`), and the unigram baseline (the
cross-entropy of the same tokens under the training split's smoothed token frequencies), so a
reader sees whether the model learned more than frequencies. The paper's joint objective (a) is
reported beside it as `train_objective_joint`: a training objective, never a perplexity.

How the losses are computed is the caller's: `estimate` takes `sequence_sums(batches) -> [ΣB, 2]`
(per row: Σ ELBO, Σ joint over counted positions). `prime-scale eval` passes one process's model
(`objective_sums`); the trainer passes its engine, which evaluates under the training layout (TP
shards, pipeline stages) and whose totals are then summed over data-parallel ranks (`reduce`).
Both build the same batches with the same noise keys (seed, draw, global sample index), so the
training's `val_nll_bound` at step N equals `prime-scale eval` of the step-N checkpoint.

Standard error: the result is a ratio Σ n_i / Σ m_i (n_i the sequence's bound averaged over its K
draws, m_i its token count); its standard error is the delta-method one,
sqrt(Σ (n_i − R m_i)² / (n (n − 1))) / mean(m), over sequences and noise together.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from prime_scale.errors import UserError
from prime_scale.noise import Batch, make_eval_batch

SequenceSums = Callable[[Sequence[Batch]], torch.Tensor]  # batches -> [ΣB, 2] (ELBO, joint) per row
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # yt [B, L·ℓ] -> logits [B, L, V]
LN2 = math.log(2.0)
ESTIMATE_NOTE = ("a part of the split, each sequence credited its split's mean bytes; the text's own "
                 "bytes only over the whole split")


@dataclass
class EvalTotals:
    """Sums over evaluated sequences, all additive (so they can be all-reduced across ranks)."""
    sequences: float = 0.0  # sequences with at least one counted token
    tokens: float = 0.0  # Σ m_i
    nll: float = 0.0  # Σ n_i, the sub-token ELBO, averaged over the K draws of each sequence
    joint: float = 0.0  # Σ of the joint objective, same averaging
    nll_sq: float = 0.0  # Σ n_i²
    tokens_sq: float = 0.0  # Σ m_i²
    nll_tokens: float = 0.0  # Σ n_i m_i
    unigram: float = 0.0  # Σ −log q(x) over the counted tokens, q = training-split frequencies (nan: unknown)
    bytes: float = 0.0  # UTF-8 bytes of the evaluated sequences (nan: unknown)

    def add(self, seq_nll, seq_joint, seq_tokens, seq_unigram, seq_bytes) -> None:
        n, j, m = seq_nll.double(), seq_joint.double(), seq_tokens.double()
        self.sequences += float((m > 0).sum())
        self.tokens += float(m.sum())
        self.nll += float(n.sum())
        self.joint += float(j.sum())
        self.nll_sq += float((n * n).sum())
        self.tokens_sq += float((m * m).sum())
        self.nll_tokens += float((n * m).sum())
        self.unigram += float(seq_unigram.double().sum())
        self.bytes += float(seq_bytes.double().sum())

    def to_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(list(asdict(self).values()), dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "EvalTotals":
        return cls(*values.double().cpu().tolist())

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
    bits_per_byte: float  # the bound in bits per UTF-8 byte of text (nan: the data's bytes are unknown)
    unigram_nll_per_token: float  # the unigram baseline, nats per token (nan: unknown)
    unigram_bits_per_byte: float
    tokens: int
    sequences: int
    train_objective_joint: float  # the paper's joint objective per token: NOT a likelihood
    mc_samples: int
    seed: int
    vocab_size: int
    ell: int
    carry_over: bool
    weights: Optional[str] = None  # "ema" or "raw" for a checkpoint's evaluation
    # both bits-per-byte figures credit each sequence its split's mean bytes (data.stats): the text's
    # own bytes over a whole pass of the split (False), an estimate over a part of it (True); None:
    # the bytes are unknown
    bits_per_byte_estimated: Optional[bool] = None

    @classmethod
    def from_totals(cls, totals: EvalTotals, split_sequences: Optional[int] = None, **meta) -> "EvalResult":
        """split_sequences: the evaluated split's size; the bits per byte are exact only when every one
        of its sequences was evaluated (None: not known to be, so an estimate)."""
        if totals.tokens <= 0:
            raise UserError("evaluation: no tokens were evaluated; the evaluation data is empty or "
                            "every position is padding")
        nll = totals.nll / totals.tokens
        unigram = totals.unigram / totals.tokens
        per_byte = totals.tokens / (totals.bytes * LN2) if totals.bytes > 0 else float("nan")
        estimated = None if not math.isfinite(per_byte) else split_sequences != int(totals.sequences)
        return cls(nll_per_token=nll, ppl=_exp(nll), stderr=totals.stderr(), bits_per_byte=nll * per_byte,
                   unigram_nll_per_token=unigram, unigram_bits_per_byte=unigram * per_byte,
                   tokens=int(totals.tokens), sequences=int(totals.sequences),
                   train_objective_joint=totals.joint / totals.tokens, bits_per_byte_estimated=estimated, **meta)

    def ppl_ci95(self) -> tuple[float, float]:
        """95% interval of the perplexity bound, from the normal interval of the NLL."""
        if math.isnan(self.stderr):
            return (float("nan"), float("nan"))
        return (_exp(self.nll_per_token - 1.96 * self.stderr), _exp(self.nll_per_token + 1.96 * self.stderr))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ppl_ci95"] = list(self.ppl_ci95())
        d["bound"] = "subtoken_elbo"
        d["estimator"] = ("exact NELBO of the linear schedule (t integrated out; k of N sub-tokens masked, "
                          "k uniform, weight N/k): an upper bound on the NLL")
        d["train_objective_joint_note"] = ("the paper's training objective (joint form); not a "
                                           "likelihood bound for ell > 1, never a perplexity")
        if self.bits_per_byte_estimated:
            d["bits_per_byte_note"] = ESTIMATE_NOTE
        return _nan_to_none(d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def format_table(self) -> str:
        lo, hi = self.ppl_ci95()
        estimated = f" (estimate: {ESTIMATE_NOTE})" if self.bits_per_byte_estimated else ""
        rows = [
            ("NLL bound per token (nats)", f"{self.nll_per_token:.4f} ± {self.stderr:.4f} (s.e.)"),
            ("perplexity bound", f"{self.ppl:.3f}   (95%: {lo:.3f} – {hi:.3f})"),
            ("bound in bits per byte", _or_unknown(self.bits_per_byte, "{:.4f}") + estimated),
            ("unigram baseline (nats/token, bits/byte)",
             f"{_or_unknown(self.unigram_nll_per_token, '{:.4f}')}, "
             f"{_or_unknown(self.unigram_bits_per_byte, '{:.4f}')}{estimated}"),
            ("tokens", f"{self.tokens:,}"),
            ("sequences", f"{self.sequences:,}"),
            ("noise draws per sequence (K)", str(self.mc_samples)),
            ("train objective, joint (not a likelihood)", f"{self.train_objective_joint:.4f}"),
        ]
        width = max(len(k) for k, _ in rows)
        head = (f"sub-token ELBO evaluation: V={self.vocab_size}, ell={self.ell}, carry-over "
                f"{'on' if self.carry_over else 'off'}, seed {self.seed}"
                f"{f', {self.weights} weights' if self.weights else ''}")
        return "\n".join([head] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


# --------------------------------------------------------------------------- the estimator


def estimate(sequence_sums: SequenceSums, chunks: Iterable[Sequence[Mapping[str, torch.Tensor]]], *,
             vocab_size: int, ell: int, seed: int, mc_samples: int = 1, stats=None,
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> EvalTotals:
    """The additive totals of the bound over `chunks`: lists of loader batches {"input_ids" [B, L],
    "index" [B], optional "valid" [B] (padding rows: False) and "attention_mask" [B, L]}, evaluated
    together by one `sequence_sums` call per noise draw. `stats` (prime_scale.data.SplitStats or
    None) gives bytes and the unigram baseline; `reduce` sums the totals tensor over ranks."""
    K = int(mc_samples)
    if K < 1:
        raise UserError(f"evaluation: the number of Monte Carlo samples must be at least 1, got {mc_samples}")
    log_q = stats.unigram_log_probs() if stats is not None else None
    totals = EvalTotals()
    seen: set[int] = set()
    number = 0
    from prime_scale.model.vocab_parallel import reported_bound

    with reported_bound("evaluation"):  # no autograd, every position's cost exact
        for chunk in chunks:
            raws = []
            for raw in chunk:
                raws.append(_check_batch(raw, number, vocab_size, seen))
                number += 1
            acc = None
            for k in range(K):
                batches = [make_eval_batch(x0, index, seed=seed, draw=k, draws=K, vocab_size=vocab_size, ell=ell,
                                           valid=valid, attention_mask=attended)
                           for x0, index, valid, attended in raws]
                sums = sequence_sums(batches).double().cpu()
                acc = sums if acc is None else acc + sums
            counted = torch.cat([b.mask for b in batches])
            x0 = torch.cat([b.x0 for b in batches])
            index = torch.cat([r[1] for r in raws])
            real = counted.any(-1)
            unigram = ((-log_q.to(x0.device)[x0]) * counted).sum(-1) if log_q is not None \
                else torch.full(real.shape, math.nan)
            seq_bytes = stats.sequence_bytes(index) if stats is not None else torch.full(real.shape, math.nan)
            totals.add(acc[:, 0][real] / K, acc[:, 1][real] / K, counted.sum(-1)[real], unigram[real],
                       seq_bytes[real])
    if reduce is not None:
        totals = EvalTotals.from_tensor(reduce(totals.to_tensor()))
    return totals


def objective_sums(logits_fn: LogitsFn, vocab_size: int, ell: int, carry_over: bool = True) -> SequenceSums:
    """`sequence_sums` for a model in this process: logits_fn(yt) -> [B, L, V] logits, both losses
    from prime_scale.model's objective (the same code the trainer's engine runs, on one shard)."""
    from prime_scale.model import PrimeObjective

    objective = PrimeObjective(vocab_size, ell, "prime_elbo", carry_over)

    def sums(batches: Sequence[Batch]) -> torch.Tensor:
        out = []
        for b in batches:
            logits = logits_fn(b.yt)
            B, L = b.x0.shape
            if tuple(logits.shape) != (B, L, vocab_size):
                raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected "
                                 f"{(B, L, vocab_size)} for input of shape {tuple(b.yt.shape)}")
            out.append(objective.sequence_sums(logits, b.x0, b.yt, b.t, b.mask))
        return torch.cat(out)

    return sums


def evaluate_bound(logits_fn: LogitsFn, batches: Iterable[Mapping[str, torch.Tensor]], *, vocab_size: int,
                   ell: int, seed: int, mc_samples: int = 1, carry_over: bool = True, stats=None) -> EvalResult:
    """The bound of a model in this process over `batches` (each its own chunk). `carry_over` must
    match how the model was trained (model.carry_over)."""
    totals = estimate(objective_sums(logits_fn, vocab_size, ell, carry_over), ([b] for b in batches),
                      vocab_size=vocab_size, ell=ell, seed=seed, mc_samples=mc_samples, stats=stats)
    return EvalResult.from_totals(totals, split_sequences=sum(stats.sequences) if stats is not None else None,
                                  mc_samples=mc_samples, seed=seed, vocab_size=vocab_size, ell=ell,
                                  carry_over=carry_over)


def _check_batch(batch: Mapping[str, torch.Tensor], number: int, vocab_size: int, seen: set[int]):
    """(x0, index, valid, attention mask), with clear errors. Only real rows (valid) count: their
    global indices must be unique, or two sequences would share their noise and be counted twice."""
    for key in ("input_ids", "index"):
        if key not in batch:
            raise UserError(f"evaluation: batch {number} has no '{key}' (keys: {sorted(batch)}); "
                            "evaluation batches need 'input_ids' [B, L] and 'index' [B]")
    x0 = torch.as_tensor(batch["input_ids"]).long()
    index = torch.as_tensor(batch["index"]).long().to(x0.device)
    if x0.dim() != 2 or index.shape != (x0.shape[0],):
        raise UserError(f"evaluation: batch {number} has input_ids of shape {tuple(x0.shape)} and index "
                        f"of shape {tuple(index.shape)}; expected [B, L] and [B]")
    valid = batch.get("valid")
    valid = torch.ones(x0.shape[0], dtype=torch.bool) if valid is None else torch.as_tensor(valid).bool()
    attended = batch.get("attention_mask")
    attended = (torch.ones_like(x0, dtype=torch.bool) if attended is None
                else torch.as_tensor(attended).to(x0.device).bool())
    if attended.shape != x0.shape or valid.shape != index.shape:
        raise UserError(f"evaluation: batch {number} has attention_mask of shape {tuple(attended.shape)} and "
                        f"valid of shape {tuple(valid.shape)} for input_ids of shape {tuple(x0.shape)}")
    bad = attended & valid.unsqueeze(1) & ((x0 < 0) | (x0 >= vocab_size))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise UserError(f"evaluation: batch {number}, sample {int(index[row])} holds token id {int(x0[bad][0])} "
                        f"outside [0, {vocab_size}); the data was tokenized with a tokenizer that does not "
                        "match the model")
    if bool((index < 0).any()):
        raise UserError(f"evaluation: batch {number} has a negative sample index")
    for i in index[valid].tolist():
        if i in seen:
            raise UserError(f"evaluation: sample index {i} occurs twice (batch {number}); indices must "
                            "be unique global sample indices, or two sequences share their noise")
        seen.add(i)
    return x0, index, valid, attended


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def _or_unknown(value: float, fmt: str) -> str:
    return fmt.format(value) if math.isfinite(value) else "unknown (not recorded when the data was prepared)"


def _nan_to_none(value):
    """JSON has no NaN or infinity: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value
