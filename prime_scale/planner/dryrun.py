"""`prime-scale plan --verify`: chosen ranks of the full N-rank job, each in turn in this one CPU
process, with no GPU and no network.

For each rank: torch's fake process group (every collective a no-op) of the job's world size,
megatron-core's groups over it (initialize_model_parallel without gloo groups: gloo cannot sit on
a fake store), DeepSpeed's pipeline topology checked against them (parallel/state.check_layouts,
the check every real run makes), then the rank's own layers — its pipeline stage, its TP slice —
built on the meta device from the real model code, and their parameter count required to equal the
plan's. Seconds per rank, whatever the model's size: meta tensors hold no storage.
"""

from __future__ import annotations

import time
from typing import Optional

from prime_scale.config import Config


def chosen_ranks(tp: int, pp: int, dp: int) -> list[int]:
    """The first and last TP peer of the first replica on the first and the last stage, and the
    job's last rank: every distinct shape (embedding, head, TP slices) and the far corner of the
    rank order."""
    def rank(t, d, s):
        return t + tp * d + tp * dp * s

    picks = {rank(0, 0, 0), rank(tp - 1, 0, 0), rank(0, 0, pp - 1), rank(tp - 1, 0, pp - 1), rank(tp - 1, dp - 1, pp - 1)}
    return sorted(picks)


def verify(cfg: Config, gpus: int, plan: dict, ranks: Optional[list[int]] = None, every_rank: bool = False) -> dict:
    r = plan["recipe"]
    tp, pp, dp = r["tp"], r["pp"], r["dp"]
    if every_rank:
        ranks = list(range(gpus))
    elif ranks is None:
        ranks = chosen_ranks(tp, pp, dp)
    problems = [f"rank {x}: not in a {gpus}-rank job" for x in ranks if not 0 <= x < gpus]
    ranks = [x for x in ranks if 0 <= x < gpus]
    started = time.perf_counter()
    results, topology_ok = [], True
    for rank in ranks:
        found = _one_rank(cfg, rank, gpus, tp, pp, dp, r["vocab_size"])
        expected = plan["stages"][found["stage"]]["total"]
        found["planned"] = expected
        if found["layout_problem"]:
            topology_ok = False
            problems.append(found["layout_problem"])
        if found["parameters"] != expected:
            problems.append(f"rank {rank} (stage {found['stage']}, tp rank {found['tp_rank']}): built "
                            f"{found['parameters']:,} parameters, the plan says {expected:,}")
        results.append(found)
    problems += _data_problems(cfg, r)
    ok = topology_ok and all(x["parameters"] == x["planned"] for x in results) and not any(
        p.startswith("data:") and "disagree" in p for p in problems)
    return {"ranks": results, "ok": ok, "topology_ok": topology_ok, "problems": problems,
            "seconds": time.perf_counter() - started}


def _one_rank(cfg: Config, rank: int, world: int, tp: int, pp: int, dp: int, vocab: int) -> dict:
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as mps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from prime_scale.errors import UserError
    from prime_scale.model import ModelArgs, layer_builders
    from prime_scale.parallel.state import check_layouts
    from prime_scale.planner.shapes import Dims, stage_bounds

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        mps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      create_gloo_process_groups=False)
        problem = None
        try:
            check_layouts(PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp), rank)
        except UserError as e:
            problem = str(e)
        stage, tp_rank = mps.get_pipeline_model_parallel_rank(), mps.get_tensor_model_parallel_rank()
        args = ModelArgs.from_config(cfg, vocab, tp=tp, tp_rank=tp_rank)
        start, stop = stage_bounds(Dims.of(cfg, vocab))[stage]
        with torch.device("meta"):
            layers = [cls(**kwargs) for cls, kwargs in layer_builders(args)[start:stop]]
        count = sum(p.numel() for layer in layers for p in layer.parameters())
        return {"rank": rank, "stage": stage, "tp_rank": tp_rank, "dp_rank": mps.get_data_parallel_rank(),
                "layers": [start, stop], "parameters": count, "layout_problem": problem}
    finally:
        if mps.model_parallel_is_initialized():
            mps.destroy_model_parallel()
        dist.destroy_process_group()


def _data_problems(cfg: Config, recipe: dict) -> list[str]:
    """The recipe's data against its model, where the data's manifest is at hand (a remote or absent
    dataset is checked at start-up, as always)."""
    from prime_scale.planner.plan import local_manifest

    paths = [cfg.data.path] if cfg.data.path else [m.path for m in cfg.data.mixture]
    out = []
    for path in paths:
        m = local_manifest(path)
        if m is None:
            out.append(f"data: {path}: no manifest here; its seq_len and vocabulary are checked when the run starts")
            continue
        if int(m.get("seq_len", -1)) != recipe["seq_len"]:
            out.append(f"data: {path} holds sequences of {m.get('seq_len')} tokens, the model is built for "
                       f"{recipe['seq_len']}: they disagree (prepare the data with --seq-len {recipe['seq_len']})")
        if int(m.get("vocab_size", -1)) != recipe["vocab_size"]:
            out.append(f"data: {path} has vocab_size {m.get('vocab_size')}, the plan {recipe['vocab_size']}: they disagree")
    return out
