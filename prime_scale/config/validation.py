"""Checks across keys that the schema's types cannot express, and the data-parallel degree.

validate() runs on every loaded recipe before any work starts; resolve_dp() runs once the world
size is known. Every failure is a RecipeError that names the key to change and, through the
provenance dict, who set it: the file, or "command line". The checks run in a fixed order, so
the first problem reported is always the same one.
"""

from __future__ import annotations

from typing import Callable, Optional

from prime_scale.config.provenance import RecipeError, blame
from prime_scale.config.schema import Config

Fail = Callable[[str, str], None]  # fail(key, message) raises a RecipeError blaming key's origin


def validate(cfg: Config, provenance: Optional[dict] = None) -> None:
    """Cross-key checks that a type system cannot express. Raises RecipeError naming the key."""
    provenance = provenance or {}

    def fail(key: str, msg: str):
        raise RecipeError(f"{blame(key, provenance)}: key '{key}': {msg}")

    for check in (_check_positive, _check_model, _check_parallel, _check_batches, _check_optim,
                  _check_schedule_and_data):
        check(cfg, fail)


def _check_positive(cfg: Config, fail: Fail) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key, value in [
        ("model.layers", m.layers), ("model.hidden", m.hidden), ("model.heads", m.heads),
        ("model.mlp_ratio", m.mlp_ratio), ("model.seq_len", m.seq_len), ("train.steps", t.steps),
        ("train.global_batch", t.global_batch), ("train.micro_batch", t.micro_batch),
        ("parallel.tp", p.tp), ("parallel.pp", p.pp), ("train.log_every", t.log_every),
        ("eval.batches", cfg.eval.batches), ("eval.mc_samples", cfg.eval.mc_samples),
    ]:
        if value < 1:
            fail(key, f"must be at least 1, got {value}")


def _check_model(cfg: Config, fail: Fail) -> None:
    m = cfg.model
    if m.ell < 1:
        fail("model.ell", f"the token granularity must be at least 1, got {m.ell}")
    if m.vocab_size is not None and m.vocab_size < 2:
        fail("model.vocab_size", f"must be at least 2, got {m.vocab_size}")
    if m.hidden % m.ell:
        fail("model.ell", f"model.hidden={m.hidden} is not divisible by model.ell={m.ell} "
             "(each sub-token gets hidden/ell embedding dims)")
    if m.hidden % m.heads:
        fail("model.heads", f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
    if (m.hidden // m.heads) % 2:
        fail("model.heads", f"head dim {m.hidden // m.heads} must be even for rotary positions")
    if not 0.0 <= m.dropout < 1.0:
        fail("model.dropout", f"must be in [0, 1), got {m.dropout}")


def _check_parallel(cfg: Config, fail: Fail) -> None:
    m, p = cfg.model, cfg.parallel
    if p.dp < 0:
        fail("parallel.dp", f"must be 0 (auto) or positive, got {p.dp}")
    if p.zero_stage not in (0, 1, 2, 3):
        fail("parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
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
    if p.dp and t.global_batch % (t.micro_batch * p.dp):
        # blame parallel.dp: the recipe's batch sizes were consistent until dp was pinned, usually
        # on the command line, and the message must send the user to where dp was set
        fail("parallel.dp", f"train.global_batch={t.global_batch} is not divisible by train.micro_batch × "
             f"parallel.dp = {t.micro_batch} × {p.dp}; change the batch sizes or set parallel.dp=0 (auto)")


def _check_optim(cfg: Config, fail: Fail) -> None:
    o = cfg.optim
    if not 0.0 <= o.ema < 1.0:
        fail("optim.ema", f"must be in [0, 1), got {o.ema}")
    if o.lr <= 0:
        fail("optim.lr", f"must be positive, got {o.lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        fail("optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    if o.warmup_steps < 0:
        fail("optim.warmup_steps", f"must be 0 or more, got {o.warmup_steps}")


def _check_schedule_and_data(cfg: Config, fail: Fail) -> None:
    if cfg.eval.every < 0 or cfg.checkpoint.every < 0:
        fail("eval.every" if cfg.eval.every < 0 else "checkpoint.every", "must be 0 or more")
    if cfg.checkpoint.keep_last < 1:
        fail("checkpoint.keep_last", f"must be at least 1, got {cfg.checkpoint.keep_last}")
    if cfg.data.shuffle_block < 1:
        fail("data.shuffle_block", f"must be at least 1, got {cfg.data.shuffle_block}")
    if cfg.data.path is not None and cfg.data.mixture:
        fail("data.mixture", "give either data.path or data.mixture, not both")
    for i, entry in enumerate(cfg.data.mixture):
        if entry.weight <= 0:
            fail(f"data.mixture[{i}].weight", f"must be positive, got {entry.weight}")


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
