"""Cost of resuming under another layout (export/elastic.py) against resuming under the same one.

A Prime model (16 × 512, V = 8000, ℓ = 2, EMA on; ≈ 55M parameters) takes one step with the real
engine under a source layout and is saved as the trainer saves it. Then, in fresh processes, each
target layout builds its engine and loads that checkpoint: the layout that wrote it through DeepSpeed's
own loader (store.load, the same-layout resume), every other through the reshard. Reported per target
(the slowest rank): the load's wall time; its peak resident memory above the process's memory just
before it (sampled every 2 ms), split into what stays (the optimizer state the load creates: a fresh
engine has no Adam moments yet) and the transient above what stays. For comparison, DeepSpeed's offline
conversion to its universal checkpoint format (ds_to_universal, the other way to change layouts) runs
on the same ZeRO-1 checkpoint, its time and peak memory measured the same way.

    python bench/bench_reshard.py [--work DIR] [--layers 16] [--hidden 512] [--vocab 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SOURCES = {  # name: (processes, overrides)
    "dp2 ZeRO-1": (2, ["parallel.zero_stage=1"]),
    "dp1 (ZeRO 0)": (1, ["parallel.zero_stage=1"]),
}
TARGETS = [  # source, target, processes, overrides
    ("dp2 ZeRO-1", "dp2 ZeRO-1 (same layout)", 2, ["parallel.zero_stage=1"]),
    ("dp2 ZeRO-1", "dp1 (ZeRO 0)", 1, ["parallel.zero_stage=1"]),
    ("dp2 ZeRO-1", "dp2 ZeRO-2", 2, ["parallel.zero_stage=2"]),
    ("dp2 ZeRO-1", "tp2", 2, ["parallel.tp=2"]),
    ("dp2 ZeRO-1", "pp2", 2, ["parallel.pp=2"]),
    ("dp1 (ZeRO 0)", "dp2 ZeRO-1", 2, ["parallel.zero_stage=1"]),
]


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The peak resident memory while a block runs, sampled every 2 ms by a thread."""

    def __enter__(self):
        self.before = self.peak = _rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


# --------------------------------------------------------------------------- workers (torchrun)


def _build(spec: dict):
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.parallel import state as pstate

    cfg = load_recipe("tiny-cpu", spec["overrides"])
    par = pstate.init(cfg)
    return cfg, par, Engine(cfg, par, cfg.model.vocab_size)


def worker_save(spec: dict) -> None:
    """One training step on random tokens, then a checkpoint as the trainer writes it."""
    from bench_convert import random_batches  # this script's folder is on sys.path

    from prime_scale.checkpoint import store
    from prime_scale.checkpoint.layout import Coords
    from prime_scale.checkpointing import name_map, unpadded_sizes
    from prime_scale.parallel import state as pstate

    cfg, par, engine = _build(spec)
    engine.train_step(random_batches(cfg, par, engine.gas))
    names = [n for n, _ in engine.module.named_parameters()]
    store.save(engine.ds, spec["ckpt"], 1, extra_state={"train": {"step": 1}, "loader": {}},
               ema=dict(zip(names, engine.ema.shadow)),
               meta={"recipe": cfg.to_dict(), "vocab_size": cfg.model.vocab_size},
               name_map=name_map(engine.module), unpadded=unpadded_sizes(engine.module, cfg.model.vocab_size),
               where=Coords.of(par))
    pstate.destroy()


def worker_load(spec: dict) -> None:
    """Load the checkpoint as `--resume` does: DeepSpeed's loader for its own layout, else the reshard."""
    from prime_scale.checkpoint import catalog as mf
    from prime_scale.checkpoint import store
    from prime_scale.export import elastic
    from prime_scale.checkpoint.layout import Coords, engine_layout, same_layout
    from prime_scale.parallel import state as pstate

    cfg, par, engine = _build(spec)
    folder = Path(spec["folder"])
    manifest = mf.read_manifest(folder)
    where = Coords.of(par)
    same = same_layout(manifest["layout"], engine_layout(engine.ds, where))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if same:
            restored = store.load(engine.ds, folder.parent, folder.name, where=where)
            names = [n for n, _ in engine.module.named_parameters()]
            engine.ema.load_state_dict({"shadow": [restored.ema[n] for n in names]})
        else:
            elastic.load_resharded(engine, folder, manifest, cfg.model.vocab_size)
        seconds = time.perf_counter() - t0
    after = _rss()
    params = sum(p.numel() for p in engine.module.parameters())
    Path(spec["out"] + f".{par.rank}").write_text(json.dumps(
        {"rank": par.rank, "seconds": seconds, "peak_above_mib": (mem.peak - mem.before) / MIB,
         "kept_mib": (after - mem.before) / MIB, "transient_mib": (mem.peak - after) / MIB,
         "rss_before_mib": mem.before / MIB, "local_params": params, "how": "store.load" if same else "reshard"}))
    pstate.destroy()


def worker_universal(spec: dict) -> None:
    from deepspeed.checkpoint import ds_to_universal

    # DeepSpeed's converter unpickles the files in full (weights_only=False): run only on checkpoints you wrote
    # --inject_missing_state: the converter wants the universal_checkpoint_info Megatron-DeepSpeed
    # writes (TP merge patterns among it); without patterns every tensor counts as replicated over TP
    sys.argv = ["ds_to_universal", "--input_folder", spec["folder"], "--output_folder", spec["out_dir"],
                "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    args = ds_to_universal.parse_arguments()
    error = None
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        try:
            ds_to_universal.main(args)
        except Exception as e:  # measured as far as it gets, and the reason recorded
            error = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
    converted = len(list((Path(spec["out_dir"]) / "zero").glob("*/fp32.pt")))
    Path(spec["out"]).write_text(json.dumps({"seconds": seconds, "peak_above_mib": (mem.peak - mem.before) / MIB,
                                             "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                             "error": error, "tensors_converted": converted}))


# --------------------------------------------------------------------------- driver


def _torchrun(nproc: int, kind: str, spec: dict, work: Path) -> None:
    path = work / f"spec-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           f"--master-port={port}", __file__, f"--{kind}", str(path)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line]
        raise RuntimeError(f"{kind} {spec}: {errors[:3]}\n{proc.stderr[-3000:]}")


def universal(work: Path, folder: Path) -> dict:
    out = work / "universal.json"
    shutil.rmtree(work / "universal", ignore_errors=True)
    _torchrun(1, "universal", {"folder": str(folder), "out_dir": str(work / "universal"), "out": str(out)}, work)
    result = json.loads(out.read_text())
    print(f"ds_to_universal of {folder}: {result['seconds']:.1f} s, {result['peak_above_mib']:.0f} MiB above the "
          f"process's before; {result['tensors_converted']} tensors converted"
          + (f"; FAILED: {result['error'][:300]}" if result["error"] else ""), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--universal-only", action="store_true",
                    help="only DeepSpeed's universal conversion, of the dp2 ZeRO-1 source already in --work")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_reshard_"))
    work.mkdir(parents=True, exist_ok=True)
    model = [f"model.layers={args.layers}", f"model.hidden={args.hidden}", "model.heads=8", "model.ell=2",
             f"model.vocab_size={args.vocab}", "model.seq_len=64", "train.global_batch=2", "train.micro_batch=1",
             "optim.ema=0.99", "logging.wandb=disabled"]
    folders = {}
    if args.universal_only:
        universal(work, work / "src-0" / "step_1")
        return
    for name, (nproc, overrides) in SOURCES.items():
        ckpt = work / f"src-{len(folders)}"
        shutil.rmtree(ckpt, ignore_errors=True)
        _torchrun(nproc, "save", {"overrides": model + overrides, "ckpt": str(ckpt)}, work)
        folders[name] = ckpt / "step_1"
        size = sum(p.stat().st_size for p in folders[name].rglob("*") if p.is_file())
        print(f"source {name}: {folders[name]} ({size / MIB:.0f} MiB)", flush=True)
    rows = []
    for source, target, nproc, overrides in TARGETS:
        out = work / f"load-{len(rows)}.json"
        _torchrun(nproc, "load", {"overrides": model + overrides, "folder": str(folders[source]), "out": str(out)},
                  work)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]
        row = {"source": source, "target": target, "how": ranks[0]["how"],
               "seconds": max(r["seconds"] for r in ranks),
               "peak_above_mib": max(r["peak_above_mib"] for r in ranks),
               "kept_mib": max(r["kept_mib"] for r in ranks), "transient_mib": max(r["transient_mib"] for r in ranks),
               "local_params": max(r["local_params"] for r in ranks)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = universal(work, folders["dp2 ZeRO-1"])
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "reshard.json").write_text(json.dumps({"rows": rows, "universal": result,
                                                      "model": model}, indent=1))
    print()
    print("| from | to | how | load time | peak above before | kept (the optimizer state created) | transient "
          "(peak above after) | parameters per rank |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['source']} | {r['target']} | {r['how']} | {r['seconds']:.2f} s | {r['peak_above_mib']:.0f} MiB | "
              f"{r['kept_mib']:.0f} MiB | {r['transient_mib']:.0f} MiB | {r['local_params'] / 1e6:.1f} M |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] in ("--save", "--load", "--universal"):
        import warnings

        warnings.filterwarnings("ignore")
        kind = sys.argv[1][2:]
        {"save": worker_save, "load": worker_load, "universal": worker_universal}[kind](
            json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
