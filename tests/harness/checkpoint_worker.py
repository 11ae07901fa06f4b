"""The worker side of the checkpoint harness (tests/harness/checkpoints.py): run as a script inside
the gloo processes that torchrun (or popen_single) starts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from checkpoint_run import UNPADDED, Run, padded  # this file's folder is sys.path[0] when run as a script
from checkpoints import SEED, V, load_refs


def _setup_process():
    import importlib

    import torch.distributed as dist

    dist.init_process_group("gloo")
    import deepspeed

    # the CPU accelerator's shared-memory op is only for inference all-reduce; skip its JIT build
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
    deepspeed.init_distributed("gloo")


def _save_refs(run: Run, refs: dict, path_prefix: Path):
    import torch

    tp, pp, dp = run.coords()
    if tp == 0 and dp == 0:
        torch.save(refs, f"{path_prefix}_pp{pp}.pt")


def worker_layouts(sc: dict, work: Path) -> dict:
    """For each layout: train, save, take one more step, rebuild with other weights, load, repeat the
    step (exact resume), record references; then reshard consolidated checkpoints into other layouts."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    results = {}
    for lay in sc["layouts"]:
        name = lay["name"]
        ckpt = work / name / "ckpt"
        run = Run(lay)
        for _ in range(2):
            run.train_step()
        run.save(ckpt, keep_last=1)
        master = run.bf16 or lay.get("zero", 0) > 0
        _save_refs(run, run.full_reference(master), work / name / "ref")
        if lay.get("ema"):
            _save_refs(run, run.ema_reference(), work / name / "ema_ref")
        ev = run.eval_loss()
        after = [run.train_step()]
        run.close()

        fresh = Run(lay, init_seed=SEED + 17)  # other initial weights: the load must overwrite them
        before = fresh.eval_loss()
        fresh.load(ckpt)
        resumed_eval = fresh.eval_loss()
        resumed = [fresh.train_step()]
        fresh.close()
        results[name] = {"eval": ev, "fresh_eval": before, "resumed_eval": resumed_eval, "after": after,
                         "resumed": resumed}

    from prime_scale.export.consolidate import consolidate
    from prime_scale.checkpoint.catalog import find_latest_complete

    for rs in sc.get("reshard", []):
        src = work / rs["from"]
        out = work / f"{rs['name']}_consolidated"
        if rank == 0:
            consolidate(find_latest_complete(src / "ckpt"), out, weights="raw")
        dist.barrier()
        target = dict(rs["target"], load_consolidated=str(out))
        run = Run(target, init_seed=SEED + 5)
        ref = load_refs(src / "ref")
        mismatch = []
        for pname, p in run.engine.module.named_parameters():
            full = ref[pname]
            if pname in UNPADDED:  # this layout's padding rows: zero
                full = torch.cat([full, torch.zeros(padded(V, run.tp) - V, *full.shape[1:])])
            want = full
            if getattr(p, "tensor_model_parallel", False) and run.tp > 1:
                want = torch.chunk(full, run.tp, dim=p.partition_dim)[run.coords()[0]]
            got = (p.ds_tensor if hasattr(p, "ds_id") else p).detach().float()
            if not hasattr(p, "ds_id") and not torch.equal(got, want.to(p.dtype).float()):
                mismatch.append(pname)
        results[rs["name"]] = {"eval": run.eval_loss(), "mismatch": mismatch}
        run.close()
    return results


def worker_single(args: list[str]) -> None:
    """World size 1 commands for the crash / resume / safety tests (see test_checkpoint_resume.py)."""
    import torch

    cmd, work = args[0], Path(args[1])
    sc = json.loads(args[2]) if len(args) > 2 else {}
    lay = {"tp": 1, "pp": 1, "zero": sc.get("zero", 1), "dropout": 0.1, "micro_batch": 2, "global_batch": 4,
           "ema": True}
    ckpt = work / "ckpt"
    run = Run(lay)
    losses = []
    if cmd == "train":  # steps with saves at the given steps; optionally hang inside one save
        hang_at = sc.get("hang_at_save")
        if hang_at is not None:
            _hang_in_save(run, hang_at, work / "hanging")
        for step in range(1, sc["steps"] + 1):
            losses.append(run.train_step())
            (work / "train_losses.json").write_text(json.dumps(losses))  # survives a kill
            if step in sc.get("save_at", []):
                run.save(ckpt, keep_last=sc.get("keep_last"), tokenizer=sc.get("tokenizer"))
    elif cmd == "resume":
        r = run.load(ckpt, sc.get("tag"))
        while run.step < sc["steps"]:
            losses.append(run.train_step())
            if run.step in sc.get("save_at", []):
                run.save(ckpt, keep_last=sc.get("keep_last"), tokenizer=sc.get("tokenizer"))
        (work / "resumed_from").write_text(r.path.name)
        if sc.get("then_load"):  # then try a (tampered) checkpoint elsewhere: record how it ends
            try:
                run.load(Path(sc["then_load"]), None)
                outcome = "loaded"
            except Exception as e:  # the safety test expects a refusal
                outcome = f"{type(e).__name__}: {e}"
            (work / "then_load.txt").write_text(outcome)
    (work / f"{cmd}_losses.json").write_text(json.dumps(losses))
    del torch


def _hang_in_save(run: Run, step: int, marker: Path):
    """Make the process stop in the middle of the save at `step`, after DeepSpeed wrote its first file,
    so that the test can kill it there: a real crash point, not a simulated folder."""
    import time

    engine_ce = run.engine.checkpoint_engine
    original = engine_ce.save

    def save(state_dict, path):
        original(state_dict, path)
        if run.step == step:
            marker.write_text(path)
            time.sleep(3600)

    engine_ce.save = save


def _main():
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if sys.argv[1].endswith(".json"):
        spec = Path(sys.argv[1])
        sc = json.loads(spec.read_text())
        _setup_process()
        import torch.distributed as dist

        results = worker_layouts(sc, spec.parent)
        if dist.get_rank() == 0:
            (spec.parent / "results.json").write_text(json.dumps(results, indent=1))
        dist.barrier()
        dist.destroy_process_group()
    else:
        _setup_process()
        worker_single(sys.argv[1:])


if __name__ == "__main__":
    _main()
