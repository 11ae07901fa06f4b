"""Bytes per rank: model state by ZeRO stage and precision, activations per micro-batch, margin.

Model state (Ψ = this rank's parameters, d = data-parallel degree), as DeepSpeed's optimizers hold
it (read from their source and measured on real engines here: docs/scaling.md):

| precision, ZeRO | weights | fp32 master | Adam m, v | gradients at the step (kept between steps) |
| --- | --- | --- | --- | --- |
| fp32, 0 | 4Ψ | – | 8Ψ | 4Ψ (0) |
| fp32, 1 | 4Ψ | 4Ψ/d | 8Ψ/d | 4Ψ/d (0); 4Ψ more during backward, until the accumulation boundary |
| fp32, 2 | 4Ψ | 4Ψ/d | 8Ψ/d | 4Ψ/d (0) |
| fp32, 3 | 4Ψ/d | 4Ψ/d | 8Ψ/d | 4Ψ/d (0), plus the 5·10⁸-element reduce bucket |
| bf16, 0 | 2Ψ | 4Ψ/d | 8Ψ/d | 2Ψ + 4Ψ/d (0) (DeepSpeed's BF16_Optimizer shards its fp32 state) |
| bf16, 1 | 2Ψ | 4Ψ/d | 8Ψ/d | 2Ψ + 8Ψ/d (2Ψ + 4Ψ/d) |
| bf16, 2 | 2Ψ | 4Ψ/d | 8Ψ/d | 4Ψ/d (0) |
| bf16, 3 | 2Ψ/d | 4Ψ/d | 8Ψ/d | 2Ψ/d + 4Ψ/d (0), plus the reduce bucket |

(fp32 ZeRO ≥ 1 keeps an fp32 partition apart from the fp32 module weights: DeepSpeed always does.)

Activations, per token of a micro-batch (s = 2 bytes in bf16, 4 in fp32; t = TP; the tensors that
autograd saves for backward, counted with saved_tensors_hooks on the real layers: docs/scaling.md):
- a Block saves its two LayerNorm inputs and outputs (4D, replicated over TP), the qkv output
  (3D/t, kept whole by the v view SDPA saves), the rotated q and k (2D/t), the attention output
  and its re-laid-out copy (2D/t), the MLP's up-projection and GELU output (2·r·D/t): s·(4D + (7 + 2r)·D/t),
  plus fp32 LayerNorm statistics and attention log-sum-exp (4·(4 + H/t) bytes). Dropout adds two
  1-byte masks of D (the flash kernel keeps no attention mask). `recompute: full` keeps only the
  block's input (s·D); `selective` recomputes the attention core and so drops the rotated q and k
  (2·s·D/t) and SDPA's log-sum-exp (model/transformer.py, Block).
- the embedding saves the sub-token ids (8ℓ bytes), the head its LayerNorm input and output (2·s·D)
  and the loss one fp32 copy of the logits shard (4·V_pad/t); while the loss runs forward and
  backward two more logits-sized fp32 buffers (its gradient and a temporary) are live.
Micro-batches in flight: one (pp = 1), or on stage s of DeepSpeed's 1F1B schedule min(pp − s, gas).
Margin: 10% of all tensors for the caching allocator's fragmentation, plus 2 GiB for the CUDA
context, NCCL buffers and cuBLAS workspaces.
"""

from __future__ import annotations

from prime_scale.planner.gpus import GiB

ZERO3_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size
FRAGMENTATION = 0.10
FIXED_RESERVE = 2 * GiB


def model_state(psi: int, d: int, zero: int, precision: str) -> dict:
    """Bytes of weights, fp32 master, optimizer moments and gradients for Ψ parameters: between
    steps, when the optimizer step starts, and the gradients' most during backward."""
    s = 2 if precision == "bf16" else 4
    weights = s * psi / (d if zero == 3 else 1)
    master = 0.0 if (precision == "fp32" and zero == 0) else 4 * psi / d
    optimizer = 8 * psi / (1 if (precision == "fp32" and zero == 0) else d)
    part = 4 * psi / d  # this rank's fp32 gradient partition
    if precision == "fp32":
        kept = 0.0
        at_step = {0: 4 * psi, 1: part, 2: part, 3: part}[zero]
        # ZeRO-1 keeps full .grad until the accumulation boundary reduces it into the partition
        backward = {0: 4 * psi, 1: 4 * psi + part, 2: part, 3: part}[zero]
    else:
        kept = 2 * psi + part if zero == 1 else 0.0
        at_step = {0: 2 * psi + part, 1: kept + part, 2: part, 3: 2 * psi / d + part}[zero]
        backward = {0: 2 * psi + part, 1: kept + part, 2: part, 3: 2 * psi / d + part}[zero]
    buckets = ZERO3_REDUCE_BUCKET * s if zero == 3 else 0.0
    fixed = weights + master + optimizer + buckets
    return {"weights": weights, "master": master, "optimizer": optimizer, "gradients": at_step,
            "gradients_in_backward": backward, "buckets": buckets, "without_gradients": fixed,
            "between_steps": fixed + kept, "at_step": fixed + at_step}


def block_activations(d, tokens: int, s: int, recompute: str, dropout: float) -> float:
    D, t, r = d.hidden, d.tp, d.mlp_ratio
    if recompute == "full":
        return tokens * s * D
    per_token = s * (4 * D + (7 + 2 * r) * D / t) + 4 * (4 + d.heads / t)
    if recompute == "selective":
        per_token -= s * 2 * D / t + 4 * d.heads / t  # the rotated q and k, SDPA's log-sum-exp
    if dropout > 0:
        per_token += 2 * D
    return tokens * per_token


def stage_activations(d, stage: dict, tokens: int, s: int, recompute: str, dropout: float, in_flight: int) -> dict:
    """Bytes of saved activations on one rank of a stage (all its in-flight micro-batches) and of
    the transient loss buffers."""
    vp_shard = d.padded_vocab // d.tp
    saved = stage["blocks"] * block_activations(d, tokens, s, recompute, dropout)
    if stage["embedding"]:
        saved += tokens * (8 * d.ell + (d.hidden if dropout > 0 else 0))
    loss = 0.0
    if stage["head"]:
        saved += tokens * (2 * s * d.hidden + 4 * vp_shard)
        loss = 2 * tokens * 4 * vp_shard
    # recompute rebuilds one block's full set during its backward
    working = block_activations(d, tokens, s, "none", dropout) if recompute != "none" and stage["blocks"] else 0.0
    return {"saved_per_micro_batch": saved, "in_flight": in_flight, "saved": saved * in_flight,
            "loss_buffers": loss, "recompute_working_set": working}


def in_flight(pp: int, stage: int, gas: int) -> int:
    """Micro-batches whose activations a stage holds at once (DeepSpeed TrainSchedule.num_pipe_buffers)."""
    return 1 if pp == 1 else min(pp - stage, gas)


def with_margin(tensors: float) -> dict:
    margin = FRAGMENTATION * tensors + FIXED_RESERVE
    return {"tensors": tensors, "margin": margin, "total": tensors + margin}
