"""`make_plan(cfg, gpus, gpu)`: per pipeline stage, what one rank holds, sends and computes, and
whether it fits; `render(plan)`: the table people read. Every figure comes from the recipe's own
shapes (planner/shapes.py) and the assumptions in planner/memory.py, traffic.py and gpus.py, which
the plan lists alongside its numbers."""

from __future__ import annotations

import copy
from typing import Optional

from prime_scale.config import Config
from prime_scale.config.validation import resolve_dp, resolve_zero_stage, validate
from prime_scale.errors import UserError
from prime_scale.planner import memory, traffic
from prime_scale.planner.gpus import GiB, GpuKind
from prime_scale.planner.shapes import Dims, model_parameters, stage_parameters

ASSUMPTIONS = [
    f"matmuls reach {traffic.MATMUL_EFFICIENCY:.0%} of the GPU's dense bf16 peak (fp32 runs: the same peak is used)",
    "TP collectives are not overlapped with compute; DP collectives are not overlapped (an upper bound)",
    "collectives are rings over the link of their group (NVLink inside a node, the NIC between nodes)",
    f"allocator margin: {memory.FRAGMENTATION:.0%} of all tensors plus {memory.FIXED_RESERVE / GiB:.0f} GiB "
    "(CUDA context, NCCL, cuBLAS workspaces)",
    "activations: the tensors autograd saves (measured per layer on CPU, docs/scaling.md); dropout masks on GPU "
    "are 1 byte per element and the flash kernel keeps no attention matrix",
]


def _vocab(cfg: Config, vocab: Optional[int]) -> int:
    if vocab is not None:
        return vocab
    if cfg.model.vocab_size is not None:
        return int(cfg.model.vocab_size)
    manifest = local_manifest(cfg.data.path) if cfg.data.path else None
    if manifest is not None:
        return int(manifest["vocab_size"])
    raise UserError("model.vocab_size is null (taken from the data's manifest at start-up): give --vocab N "
                    "or set model.vocab_size=N for the plan")


def local_manifest(path) -> Optional[dict]:
    """A dataset's manifest where it is at hand (None for a remote or absent dataset: a run checks
    those at start-up, as always)."""
    import json
    from pathlib import Path

    manifest = Path(str(path)) / "manifest.json"
    if "://" in str(path) or not manifest.is_file():
        return None
    return json.loads(manifest.read_text())


def make_plan(cfg: Config, gpus: int, gpu: GpuKind, vocab: Optional[int] = None) -> dict:
    validate(cfg)
    cfg = copy.deepcopy(cfg)
    dp = resolve_dp(cfg, gpus)
    zero = resolve_zero_stage(cfg, dp)  # what DeepSpeed runs: fp32 ZeRO 1/2 over one DP rank is stage 0
    V = _vocab(cfg, vocab)
    d = Dims.of(cfg, V)
    p, t = cfg.parallel, cfg.train
    gas = t.global_batch // (t.micro_batch * dp)
    s = 2 if cfg.precision == "bf16" else 4
    tokens = t.micro_batch * d.seq_len
    recompute = getattr(cfg.model, "recompute", "none")

    from prime_scale.model import ModelArgs, train_flops_per_token

    args = ModelArgs.from_config(cfg, V)
    flops_token = train_flops_per_token(args)
    if recompute == "full":  # every block's forward runs twice
        D, r, L = d.hidden, d.mlp_ratio, d.seq_len
        flops_token += d.layers * (2 * (4 * D * D + 2 * r * D * D) + 4 * L * D)
    step_tokens = t.global_batch * d.seq_len
    flops_step = flops_token * step_tokens
    layout = traffic.placement(p.tp, dp, p.pp, gpu.gpus_per_node)

    stages = []
    for stage in stage_parameters(d):
        psi = stage["total"]
        state = memory.model_state(psi, dp, zero, cfg.precision)
        act = memory.stage_activations(d, stage, tokens, s, recompute, cfg.model.dropout,
                                       memory.in_flight(p.pp, stage["stage"], gas))
        # with gradient accumulation the gradients of earlier micro-batches sit beside the next one's
        # activations; with one micro-batch they grow as activations are freed: counting both in full
        # is exact for the first case and an upper bound for the second
        tensors = (state["without_gradients"] + state["gradients_in_backward"] + act["saved"] + act["loss_buffers"]
                   + act["recompute_working_set"])
        total = memory.with_margin(tensors)
        tp_comm = traffic.tp_bytes(d, stage, tokens, s, recompute)
        grad_bytes = 4 if cfg.precision == "fp32" else 2
        dp_comm = traffic.dp_bytes(psi, dp, zero, s, grad_bytes)
        boundaries = (stage["stage"] > 0) + (stage["stage"] < p.pp - 1)
        pp_bytes = gas * boundaries * 2 * tokens * d.hidden * s
        flops_rank = flops_step / gpus  # stages are balanced by blocks; the head's share is stated below
        time = traffic.step_time(flops_per_gpu=flops_rank, gpu=gpu, tp_ring=tp_comm["ring_per_micro_batch"] * gas,
                                 dp_ring=dp_comm["ring"], pp_bytes=pp_bytes, layout=layout, gas=gas, pp=p.pp)
        stages.append({**stage, "model_state": state, "activations": act, "memory": total,
                       "fits": total["total"] <= gpu.memory_bytes,
                       "host_init_bytes": 4 * (psi + stage["largest_full_layer"]),
                       # resuming under another layout: the fp32 master, both Adam moments and the EMA
                       # of every full (un-TP-split) tensor of the stage, read by each of its ranks
                       "reshard_read_bytes": (12 + 4 * (cfg.optim.ema > 0)) * (stage["sharded"] * p.tp
                                                                                + stage["replicated"]),
                       "communication": {"tp": tp_comm, "dp": dp_comm, "pp_bytes": pp_bytes}, "time": time})
    step_s = max(st["time"]["step_s"] for st in stages)
    tokens_per_gpu = step_tokens / step_s / gpus
    plan = {
        "recipe": {"tp": p.tp, "pp": p.pp, "dp": dp, "zero_stage": p.zero_stage, "zero_stage_run": zero,
                   "precision": cfg.precision,
                   "micro_batch": t.micro_batch, "global_batch": t.global_batch, "grad_accumulation": gas,
                   "recompute": recompute, "seq_len": d.seq_len, "vocab_size": V, "ell": d.ell},
        "gpus": gpus, "gpu": gpu.describe(), "parameters": model_parameters(d), "stages": stages,
        "peak_bytes": max(st["memory"]["total"] for st in stages),
        "fits": all(st["fits"] for st in stages),
        "flops_per_token": flops_token, "flops_per_step": flops_step, "step_s": step_s,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": flops_token * tokens_per_gpu / gpu.peak_bf16_flops,
        "layout_change": _layout_change(cfg, zero),
        "assumptions": ASSUMPTIONS,
    }
    plan["fixes"] = [] if plan["fits"] else _fixes(cfg, gpus, gpu, V)
    return plan


def _layout_change(cfg: Config, zero: int) -> dict:
    """Whether a checkpoint of another layout can continue under this one (export/elastic.py)."""
    from prime_scale.export.elastic import unsupported_reason

    why = unsupported_reason({"zero_stage": zero, "precision": cfg.precision, "pipeline": cfg.parallel.pp > 1})
    if why:
        return {"reshardable": False, "exact": False, "why": why}
    exact = cfg.precision == "fp32" and cfg.model.dropout == 0
    return {"reshardable": True, "exact": exact,
            "why": "fp32 without dropout: the uninterrupted run's losses to ~1e-5" if exact else
            ("dropout masks are drawn afresh" if cfg.model.dropout else
             "state carries over bit for bit; the losses follow this layout's bf16 arithmetic")}


def _fixes(cfg: Config, gpus: int, gpu: GpuKind, vocab: int) -> list[dict]:
    """Single-knob changes that make the plan fit, cheapest in speed first."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    tries = []
    if getattr(m, "recompute", "none") == "none":
        tries += [("model.recompute=selective", ("model", "recompute", "selective"))]
    if getattr(m, "recompute", "none") != "full":
        tries += [("model.recompute=full", ("model", "recompute", "full"))]
    if p.zero_stage < (1 if p.pp > 1 else 3):
        tries.append((f"parallel.zero_stage={p.zero_stage + 1}", ("parallel", "zero_stage", p.zero_stage + 1)))
    if t.micro_batch > 1:
        tries.append((f"train.micro_batch={t.micro_batch // 2}", ("train", "micro_batch", t.micro_batch // 2)))
    if p.tp * 2 <= gpu.gpus_per_node:
        tries.append((f"parallel.tp={p.tp * 2}", ("parallel", "tp", p.tp * 2)))
    out = []
    for label, (section, key, value) in tries:
        alt = copy.deepcopy(cfg)
        setattr(getattr(alt, section), key, value)
        try:
            plan = make_plan(alt, gpus, gpu, vocab)
        except Exception:  # the change breaks a divisibility rule: not a fix
            continue
        if plan["fits"]:
            out.append({"override": label, "peak_gib": round(plan["peak_bytes"] / GiB, 1),
                        "tokens_per_s_per_gpu": round(plan["tokens_per_s_per_gpu"])})
    return out


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def render(plan: dict) -> str:
    r, g = plan["recipe"], plan["gpu"]
    zero = f"ZeRO {r['zero_stage']}" + (f" (runs as {r['zero_stage_run']}: one DP rank)"
                                         if r["zero_stage_run"] != r["zero_stage"] else "")
    lines = [f"plan: {plan['gpus']} × {g['name']} = TP {r['tp']} × PP {r['pp']} × DP {r['dp']}, {zero}, "
             f"{r['precision']}, micro-batch {r['micro_batch']} × {r['grad_accumulation']} accumulation × DP = global "
             f"{r['global_batch']}, seq {r['seq_len']}, ℓ = {r['ell']}, V = {r['vocab_size']:,}, recompute {r['recompute']}",
             f"parameters: {plan['parameters']['total']:,} ({plan['parameters']['as_trained']:,} as trained, with "
             "the vocabulary padded for TP)", ""]
    head = ("stage | layers | params/rank | weights | master | Adam | grads | activations (in flight) | loss buf "
            "| margin | total GiB | fits")
    lines += [head, "-" * len(head)]
    for st in plan["stages"]:
        ms, act, mem = st["model_state"], st["activations"], st["memory"]
        lines.append(f"{st['stage']:>5} | {st['layers'][0]}-{st['layers'][1] - 1:<4} | {st['total']:>11,} | "
                     f"{_gib(ms['weights']):>7} | {_gib(ms['master']):>6} | {_gib(ms['optimizer']):>4} | "
                     f"{_gib(ms['gradients']):>5} | {_gib(act['saved']):>6} ({act['in_flight']}) | "
                     f"{_gib(act['loss_buffers']):>8} | {_gib(mem['margin']):>6} | {_gib(mem['total']):>9} | "
                     f"{'yes' if st['fits'] else 'NO'}")
    lines.append("")
    lines.append("communication per rank per step (ring bytes): " + "; ".join(
        f"stage {st['stage']}: TP {_gib(st['communication']['tp']['ring_per_micro_batch'] * r['grad_accumulation'])} "
        f"GiB, DP {_gib(st['communication']['dp']['ring'])} GiB ({'+'.join(st['communication']['dp']['ops'])}), "
        f"PP {_gib(st['communication']['pp_bytes'])} GiB" for st in plan["stages"]))
    worst = max(plan["stages"], key=lambda st: st["time"]["step_s"])["time"]
    lines.append(f"step: {plan['flops_per_step']:.3g} FLOPs ({plan['flops_per_token']:.3g} per token); predicted "
                 f"{plan['step_s']:.2f} s (compute {worst['compute_s']:.2f}, TP {worst['tp_s']:.2f}, bubble "
                 f"{worst['pipeline_bubble_s']:.2f}, DP {worst['dp_s']:.2f}, p2p {worst['p2p_s']:.2f}), "
                 f"{plan['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, MFU {plan['mfu']:.0%}")
    lines.append(f"host memory at initialisation (megatron draws each full matrix on the CPU): up to "
                 f"{_gib(max(st['host_init_bytes'] for st in plan['stages']))} GiB per rank")
    change = plan["layout_change"]
    if change["reshardable"]:
        read = max(st["reshard_read_bytes"] for st in plan["stages"])
        amount = f"{_gib(read)} GiB" if read >= GiB else f"{read / (1 << 20):.0f} MiB"
        lines.append(f"resume from another layout (--resume reshards): each rank reads up to {amount} (fp32 masters, Adam moments "
                     f"and EMA of its stage); {'exact' if change['exact'] else 'not exact'}: {change['why']}")
    else:
        lines.append(f"resume from another layout: not possible here ({change['why']}); resume under the "
                     "checkpoint's layout, or convert and start with --init-from")
    capacity = g["memory_bytes"]
    if plan["fits"]:
        lines.append(f"verdict: FITS — peak {_gib(plan['peak_bytes'])} GiB of {_gib(capacity)} GiB per GPU")
    else:
        lines.append(f"verdict: DOES NOT FIT — peak {_gib(plan['peak_bytes'])} GiB of {_gib(capacity)} GiB per GPU")
        if plan["fixes"]:
            lines.append("  fixes (one change each): " + "; ".join(
                f"{f['override']} → {f['peak_gib']} GiB, {f['tokens_per_s_per_gpu']:,} tokens/s/GPU"
                for f in plan["fixes"]))
        else:
            lines.append("  no single change fits: combine them, or use more GPUs")
    lines.append("")
    lines.append(f"GPU: {g['source']}")
    lines += [f"assumption: {a}" for a in plan["assumptions"]]
    return "\n".join(lines)
