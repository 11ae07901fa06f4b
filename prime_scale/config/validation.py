"""Checks that the schema's types cannot express: ranges, cross-key rules, the data-parallel degree.

validate() runs on every loaded recipe before any work starts; resolve_dp() and resolve_zero_stage()
run once the world size is known. Every failure is a RecipeError that names the key to change and, through the
provenance dict, who set it: the file, or "command line". The checks run in a fixed order, so
the first problem reported is always the same one: every key's own range first (so that no
cross-key check divides by a zero or compares a nan), then the checks across keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

from prime_scale.config.provenance import RecipeError, blame
from prime_scale.config.schema import Config, schema_fields

Fail = Callable[[str, str], None]  # fail(key, message) raises a RecipeError blaming key's origin


def blame_item(key: str, provenance: dict) -> str:
    """blame() that also sees through list indices: `optim.betas[0]` and `data.mixture[1].weight`
    were set by whoever set the list. blame() walks up at the dots, from `data.mixture[1]` straight
    to `data`, and so named the recipe file for a list given on the command line."""
    return blame(re.sub(r"\[\d+\]", "", key), provenance)


@dataclass(frozen=True)
class Span:
    """The allowed range of a number key. nan and ±inf are never in it (`nan <= 0` is False, which
    is how optim.lr=.nan slipped through a plain `lr <= 0` test)."""
    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = True
    integer: bool = False
    note: str = ""  # appended to the error: what the special values mean

    def __contains__(self, x: float) -> bool:
        return (math.isfinite(x) and (x > self.lo if self.lo_open else x >= self.lo)
                and (x < self.hi if self.hi_open else x <= self.hi))

    def __str__(self) -> str:
        if self.integer:
            if self.hi == math.inf:
                return f"at least {self.lo:g}" if self.lo > 0 else "0 or more"
            return f"in [{self.lo:g}, {self.hi - 1 if self.hi_open else self.hi:g}]"
        if self.hi == math.inf:
            return f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
        return (f"a finite number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open else ']'}")


def _count(lo: int, note: str = "") -> Span:
    return Span(lo, integer=True, note=note)


ONE_UP, ONLY_AT_END = _count(1), _count(0, "0 = only at the end")
POSITIVE, NON_NEGATIVE, UNIT = Span(0.0, lo_open=True), Span(0.0), Span(0.0, 1.0)
SEED_LIMIT = 2**32  # numpy takes seeds below 2**32; the model multiplies the seed into torch's int64

# The allowed range of every int and float key of the schema, in no particular order (they are
# checked in schema order); a test fails when a number key of the schema has no entry here.
# optim.betas applies to each item; data.mixture[].weight to each entry's weight.
RANGES: dict[str, Span] = {
    "model.layers": ONE_UP, "model.hidden": ONE_UP, "model.heads": ONE_UP, "model.mlp_ratio": ONE_UP,
    "model.dropout": UNIT, "model.vocab_size": _count(2, "null = from the data's manifest"),
    "model.seq_len": ONE_UP, "model.ell": _count(1, "the token granularity; 1 = MDLM"),
    # base <= 1 gives every rotary pair a frequency of at least 1 radian per token (base 1: all
    # the same one), so positions alias; a negative base makes the tables nan
    "model.rotary_base": Span(1.0, lo_open=True),
    "model.norm_eps": POSITIVE,
    "model.init_std": POSITIVE,  # 0: every weight equal, and nothing breaks the symmetry
    "optim.lr": POSITIVE, "optim.betas": UNIT, "optim.eps": POSITIVE,
    "optim.weight_decay": Span(0.0, note="0 disables weight decay"),
    "optim.warmup_steps": _count(0, "0 = no warm-up"),
    # the decay's floor as a fraction of lr: above 1 it raises the lr, below 0 it trains with a
    # negative lr (gradient ascent)
    "optim.min_lr_ratio": Span(0.0, 1.0, hi_open=False),
    "optim.clip": Span(0.0, note="0 disables clipping"),
    "optim.ema": Span(0.0, 1.0, note="0 disables EMA"),
    "data.mixture[].weight": POSITIVE,
    "data.num_workers": _count(0, "0 = load in the training process"), "data.shuffle_block": ONE_UP,
    "parallel.tp": ONE_UP, "parallel.pp": ONE_UP, "parallel.dp": _count(0, "0 = auto"),
    "parallel.zero_stage": Span(0, 3, hi_open=False, integer=True),
    "train.steps": ONE_UP, "train.global_batch": ONE_UP, "train.micro_batch": ONE_UP,
    "train.log_every": ONE_UP, "train.max_minutes": Span(0.0, note="0 = no limit"), "train.max_skips": ONE_UP,
    "train.spike_factor": Span(0.0, note="0 = off; else above 1"), "train.spike_window": ONE_UP,
    "eval.every": ONLY_AT_END, "eval.batches": ONE_UP, "eval.mc_samples": ONE_UP,
    "eval.final_batches": _count(0, "0 = the whole validation split; null = eval.batches"),
    "checkpoint.every": ONLY_AT_END, "checkpoint.keep_last": ONE_UP,
    "seed": Span(0, SEED_LIMIT, integer=True),
}


def validate(cfg: Config, provenance: Optional[dict] = None) -> None:
    """Range and cross-key checks that a type system cannot express. Raises RecipeError naming the key."""
    provenance = provenance or {}

    def fail(key: str, msg: str):
        raise RecipeError(f"{blame_item(key, provenance)}: key '{key}': {msg}")

    for check in (_check_ranges, _check_model, _check_parallel, _check_batches, _check_data):
        check(cfg, fail)


def _out_of(span: Span, got) -> str:
    return f"must be {span}, got {got}" + (f" ({span.note})" if span.note else "")


def _check_ranges(cfg: Config, fail: Fail) -> None:
    """Every number key against RANGES, in schema order. A key the schema lacks is skipped, so the
    table may name a key before (or after) the schema has it."""
    for f in schema_fields(items=False):
        span, value = RANGES.get(f.key), cfg
        for part in f.key.split("."):
            value = getattr(value, part)
        if f.key == "optim.betas":
            if len(value) != 2 or not all(b in span for b in value):
                fail(f.key, f"must be two numbers, each {span}, got {value}")
        elif f.key == "data.mixture":
            weight = RANGES["data.mixture[].weight"]
            for i, entry in enumerate(value):
                if entry.weight not in weight:
                    fail(f"data.mixture[{i}].weight", _out_of(weight, entry.weight))
        elif span is not None and value is not None and value not in span:
            fail(f.key, _out_of(span, value))


def _check_model(cfg: Config, fail: Fail) -> None:
    m = cfg.model
    if m.hidden % m.ell:
        fail("model.ell", f"model.hidden={m.hidden} is not divisible by model.ell={m.ell} "
             "(each sub-token gets hidden/ell embedding dims)")
    if m.hidden % m.heads:
        fail("model.heads", f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
    if (m.hidden // m.heads) % 2:
        fail("model.heads", f"head dim {m.hidden // m.heads} must be even for rotary positions")


def _check_parallel(cfg: Config, fail: Fail) -> None:
    m, p = cfg.model, cfg.parallel
    if p.pp > 1 and p.zero_stage > 1:
        fail("parallel.zero_stage", f"pipeline parallelism (parallel.pp={p.pp}) runs DeepSpeed's pipeline "
             f"engine, which supports ZeRO stage 0 or 1 only; got {p.zero_stage}")
    if p.pp > 1 and cfg.precision == "bf16" and p.zero_stage == 0:
        fail("parallel.zero_stage", "bf16 with pipeline parallelism needs ZeRO stage 1 "
             "(DeepSpeed's bf16 pipeline optimizer cannot reload a stage-0 checkpoint)")
    if p.pp > m.layers:
        fail("parallel.pp", f"{p.pp} pipeline stages for {m.layers} layers: each stage needs a layer")
    if m.heads % p.tp:
        fail("parallel.tp", f"model.heads={m.heads} is not divisible by parallel.tp={p.tp}")
    if (m.hidden * m.mlp_ratio) % p.tp:
        fail("parallel.tp", f"MLP width {m.hidden * m.mlp_ratio} is not divisible by parallel.tp={p.tp}")


def _check_batches(cfg: Config, fail: Fail) -> None:
    p, t = cfg.parallel, cfg.train
    if t.global_batch % t.micro_batch:
        fail("train.global_batch", f"{t.global_batch} is not divisible by train.micro_batch={t.micro_batch}")
    if 0 < t.spike_factor <= 1:
        fail("train.spike_factor", f"must be 0 (off) or above 1, got {t.spike_factor}: at or below 1 about "
             "half of all steps would count as spikes")
    if p.dp and t.global_batch % (t.micro_batch * p.dp):
        # blame parallel.dp: the recipe's batch sizes were consistent until dp was pinned, usually
        # on the command line, and the message must send the user to where dp was set
        fail("parallel.dp", f"train.global_batch={t.global_batch} is not divisible by train.micro_batch × "
             f"parallel.dp = {t.micro_batch} × {p.dp}; change the batch sizes or set parallel.dp=0 (auto)")


def _check_data(cfg: Config, fail: Fail) -> None:
    if cfg.data.path is not None and cfg.data.mixture:
        fail("data.mixture", "give either data.path or data.mixture, not both")


def resolve_dp(cfg: Config, world_size: int) -> int:
    """Data-parallel degree for a world size; a clear error when the layout cannot work."""
    p, t = cfg.parallel, cfg.train
    mp = p.tp * p.pp
    if world_size % mp:
        raise RecipeError(f"world size {world_size} is not divisible by parallel.tp × parallel.pp = "
                          f"{p.tp} × {p.pp}; launch a multiple of {mp} processes")
    dp = world_size // mp
    if p.dp and p.dp != dp:
        raise RecipeError(f"parallel.dp={p.dp} is pinned, but world size {world_size} / (tp × pp = {mp}) "
                          f"gives {dp}; launch {p.dp * mp} processes or set parallel.dp=0")
    if t.global_batch % (t.micro_batch * dp):
        raise RecipeError(f"train.global_batch={t.global_batch} is not divisible by train.micro_batch × dp "
                          f"= {t.micro_batch} × {dp}; change the batch sizes for {world_size} processes")
    return dp


def resolve_zero_stage(cfg: Config, dp: int) -> int:
    """The ZeRO stage DeepSpeed runs for the recipe's parallel.zero_stage at this data-parallel size.
    Stages 1 and 2 partition the optimizer state and the gradients over the DP ranks; over one rank
    the partition is the whole model, so they compute stage 0's update while DeepSpeed's partitioned
    optimizer copies every gradient into a bucket, then into its partition, then flattens it, and
    copies every updated weight back (1.2–1.3× the plain step at V = 50257 on CPU, docs/benchmarks.md).
    fp32 over one DP rank therefore runs stage 0, as torchtitan applies FSDP only to a DP degree
    above 1. bf16 keeps its stage: DeepSpeed accumulates bf16 gradients in fp32 only under ZeRO ≥ 1.
    ZeRO-3 keeps its stage: it changes how parameters are held (gathered per use), not just copies."""
    stage = cfg.parallel.zero_stage
    if dp == 1 and stage in (1, 2) and cfg.precision == "fp32":
        return 0
    return stage
