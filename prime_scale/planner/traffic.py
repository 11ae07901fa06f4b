"""Bytes each rank communicates per step, FLOPs, and a predicted step time.

Collectives are costed as rings: an all-reduce of n bytes over g ranks moves 2(g − 1)/g · n bytes
in and out of each rank, a reduce-scatter or all-gather (g − 1)/g · n. Ranks are laid out as
megatron and DeepSpeed lay them out here (global rank = tp + TP·dp + TP·DP·stage), so a TP group
is one node's NVLink when TP ≤ GPUs per node, a DP group leaves the node once TP·DP exceeds it,
and consecutive pipeline stages sit on different nodes once TP·DP fills one.

Per micro-batch of T tokens (s bytes per element): every Block all-reduces its attention and MLP
outputs forward (2 × T·D·s) and the inputs' gradients of qkv and fc1 backward (2 × T·D·s);
`recompute: full` repeats the forward pair in backward. The ℓ = 1 embedding adds one forward
all-reduce, the head one backward all-reduce; the vocab-parallel loss's own all-reduces are
[T, ℓ]-sized and not counted. DP, once per step over this rank's Ψ parameters with gradients of g
bytes: ZeRO 0/1 all-reduce the gradients, ZeRO 2 reduce-scatters them, ZeRO 1/2 then all-gather
the updated weights, ZeRO 3 all-gathers the weights in forward and again in backward and
reduce-scatters the gradients. Pipeline: T·D·s forward and backward per micro-batch and boundary.

The step time adds compute (the model's train_flops_per_token at an assumed fraction of the GPU's
peak), the TP collectives (not overlapped with compute in this engine), the pipeline bubble of 1F1B
((pp − 1) / gas of the compute), and the DP collectives (assumed not overlapped: an upper bound).
"""

from __future__ import annotations

MATMUL_EFFICIENCY = 0.5  # fraction of the peak bf16 FLOP/s the model's matmuls are assumed to reach


def ring(op: str, nbytes: float, group: int) -> float:
    if group <= 1:
        return 0.0
    return (2.0 if op == "all_reduce" else 1.0) * (group - 1) / group * nbytes


def tp_bytes(d, stage: dict, tokens: int, s: int, recompute: str) -> dict:
    act = tokens * d.hidden * s
    forward = stage["blocks"] * 2 * (2 if recompute == "full" else 1) * act
    backward = stage["blocks"] * 2 * act
    if stage["embedding"] and d.ell == 1:
        forward += act
    if stage["head"]:
        backward += act
    payload = forward + backward
    return {"payload_per_micro_batch": payload, "ring_per_micro_batch": ring("all_reduce", payload, d.tp)}


def dp_bytes(psi: int, dp: int, zero: int, weight_bytes: int, grad_bytes: int) -> dict:
    grads, weights = psi * grad_bytes, psi * weight_bytes
    if zero in (0, 1):
        ops = [("all_reduce", grads)] + ([("all_gather", weights)] if zero == 1 else [])
    elif zero == 2:
        ops = [("reduce_scatter", grads), ("all_gather", weights)]
    else:
        ops = [("all_gather", weights), ("all_gather", weights), ("reduce_scatter", grads)]
    return {"ops": [op for op, _ in ops], "payload": sum(n for _, n in ops),
            "ring": sum(ring(op, n, dp) for op, n in ops)}


def step_time(*, flops_per_gpu: float, gpu, tp_ring: float, dp_ring: float, pp_bytes: float, layout: dict,
              gas: int, pp: int) -> dict:
    compute = flops_per_gpu / (gpu.peak_bf16_flops * MATMUL_EFFICIENCY)
    tp_link = gpu.nvlink_bytes_per_s if layout["tp_in_node"] else gpu.network_bytes_per_s
    dp_link = gpu.nvlink_bytes_per_s if layout["dp_in_node"] else gpu.network_bytes_per_s
    pp_link = gpu.nvlink_bytes_per_s if layout["pp_in_node"] else gpu.network_bytes_per_s
    tp = tp_ring / tp_link
    bubble = (pp - 1) / gas * (compute + tp)
    dp = dp_ring / dp_link
    p2p = pp_bytes / pp_link
    total = compute + tp + bubble + dp + p2p
    return {"compute_s": compute, "tp_s": tp, "pipeline_bubble_s": bubble, "dp_s": dp, "p2p_s": p2p,
            "step_s": total}


def placement(tp: int, dp: int, pp: int, gpus_per_node: int) -> dict:
    return {"tp_in_node": tp <= gpus_per_node, "dp_in_node": tp * dp <= gpus_per_node,
            "pp_in_node": tp * dp * pp <= gpus_per_node}
