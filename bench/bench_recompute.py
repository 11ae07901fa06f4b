"""Activation recompute (model.recompute): bytes saved for the backward pass and step time.

    python bench/bench_recompute.py                       # 16 × 512, L = 128, micro-batch 4 (≈ 2 min on 2 cores)
    python bench/bench_recompute.py --dropout 0 --rounds 5

One process, three real DeepSpeed engines (ZeRO 1, fp32, one per mode: none, selective, full) on
the same model (16 × 512 blocks, ℓ = 2, V = 8000, weights identical: seeded per layer) and the
same batches (synthetic token ids, real Prime noise). Rounds alternate the modes step for step
(none, selective, full, none, ...), so a load change on the shared machine hits all three alike;
each ratio is the median of the per-round ratios. Per mode and step:
- saved bytes: the storages autograd saves for the backward pass during the step, counted with
  torch.autograd.graph.saved_tensors_hooks (each storage once, parameters left out): what
  recompute trades for time. The total includes the loss head's [B, L, V] tensors, the same in
  every mode; `blocks` counts only what is saved while a Block's forward runs.
- step time: wall and CPU time of engine.train_step (forward, backward with the recompute, AdamW).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODES = ("none", "selective", "full")


class SavedActivationBytes:
    """Context: bytes of the storages autograd saves while it is open (each once, parameters left
    out). The storages stay referenced until the context is dropped, so none is missed by address reuse."""

    def __init__(self, parameters, blocks=()):
        import torch

        self.torch = torch
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: dict = {}
        self.in_blocks: set = set()
        self.depth = 0
        self.handles = []
        for block in blocks:  # which storages are packed while a Block's forward runs
            self.handles.append(block.register_forward_pre_hook(lambda *_: self._enter_block()))
            self.handles.append(block.register_forward_hook(lambda *_: self._leave_block()))

    def _enter_block(self):
        self.depth += 1

    def _leave_block(self):
        self.depth -= 1

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.parameter_storages:
            self.storages.setdefault(key, storage)
            if self.depth > 0:
                self.in_blocks.add(key)
        return tensor

    def totals(self) -> dict:
        return {"saved_bytes": sum(s.nbytes() for s in self.storages.values()),
                "saved_bytes_blocks": sum(self.storages[k].nbytes() for k in self.in_blocks)}

    def __enter__(self):
        self.hooks = self.torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()


def _batches(cfg, step):
    import torch

    from prime_scale.noise import make_batch

    V, G, L = cfg.model.vocab_size, cfg.train.global_batch, cfg.model.seq_len
    data = torch.randint(0, V, (G, L), generator=torch.Generator().manual_seed(1000 + step))
    index = torch.arange(G) + step * G
    return [make_batch(data, index, index, seed=cfg.seed, step=step, global_batch=G, vocab_size=V, ell=cfg.model.ell)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one step per mode each), after one warm-up")
    args = parser.parse_args()
    import torch

    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.model import Block
    from prime_scale.parallel import state as pstate

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    threads = int(os.environ.get("OMP_NUM_THREADS", len(os.sched_getaffinity(0))))
    base = [f"model.layers={args.layers}", f"model.hidden={args.hidden}", f"model.heads={args.heads}",
            f"model.seq_len={args.seq_len}", f"model.vocab_size={args.vocab}", f"model.dropout={args.dropout}",
            f"train.global_batch={args.micro_batch}", f"train.micro_batch={args.micro_batch}",
            "optim.ema=0", "optim.warmup_steps=0", "parallel.zero_stage=1", "precision=fp32"]
    cfgs = {mode: load_recipe("tiny-cpu", base + [f"model.recompute={mode}"]) for mode in MODES}
    st = pstate.init(cfgs["none"])
    torch.set_num_threads(threads)
    results = {"model": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "seq_len", "micro_batch",
                                                       "vocab", "dropout")},
               "threads": threads, "torch": torch.__version__, "rounds": args.rounds}
    try:
        engines = {mode: Engine(cfg, st, args.vocab) for mode, cfg in cfgs.items()}
        per_mode = {mode: {"wall_s": [], "cpu_s": [], "saved": []} for mode in MODES}
        for step in range(args.rounds + 1):  # step 0 warms up every engine (first-call allocations)
            batches = _batches(cfgs["none"], step)
            for mode, engine in engines.items():
                blocks = [m for m in engine.module.modules() if isinstance(m, Block)]
                with SavedActivationBytes(engine.module.parameters(), blocks) as counter:
                    wall, cpu = time.perf_counter(), time.process_time()
                    engine.train_step(batches)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if step > 0:
                    per_mode[mode]["wall_s"].append(wall)
                    per_mode[mode]["cpu_s"].append(cpu)
                    per_mode[mode]["saved"].append(counter.totals())
    finally:
        pstate.destroy()
    none = per_mode["none"]
    for mode, m in per_mode.items():
        saved = m["saved"][-1]  # the same every step (same shapes)
        results[mode] = {
            "saved_mib": saved["saved_bytes"] / 2**20, "saved_mib_blocks": saved["saved_bytes_blocks"] / 2**20,
            "step_s_wall": statistics.median(m["wall_s"]), "step_s_cpu": statistics.median(m["cpu_s"]),
            "saved_ratio_vs_none": saved["saved_bytes"] / none["saved"][-1]["saved_bytes"],
            "saved_ratio_blocks_vs_none": saved["saved_bytes_blocks"] / none["saved"][-1]["saved_bytes_blocks"],
            "time_ratio_wall_vs_none": statistics.median(a / b for a, b in zip(m["wall_s"], none["wall_s"])),
            "time_ratio_cpu_vs_none": statistics.median(a / b for a, b in zip(m["cpu_s"], none["cpu_s"])),
        }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
