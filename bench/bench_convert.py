"""Peak memory of `prime-scale convert` against the largest tensor and the whole model.

Trains a Prime model (16 × 512, V = 8000, ≈ 55M parameters, ≈ 220 MB in fp32) for one step under
several layouts with the real engine (2 gloo processes), saves a checkpoint, then converts each
checkpoint in a fresh process and reports that process's peak resident memory (ru_maxrss) above the
baseline of a process that imports the same modules and converts nothing. For the ZeRO-2 layout it
also runs DeepSpeed's own zero_to_fp32 consolidation on the same files, for comparison.

    python bench/bench_convert.py [--work DIR] [--layers 16] [--hidden 512] [--vocab 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = [  # name, processes, overrides
    ("tp1·dp2 ZeRO-2 fp32", 2, ["parallel.tp=1", "parallel.zero_stage=2", "precision=fp32"]),
    ("tp2 ZeRO-3 bf16", 2, ["parallel.tp=2", "parallel.zero_stage=3", "precision=bf16"]),
    ("pp2 ZeRO-1 fp32 (pipeline)", 2, ["parallel.pp=2", "parallel.zero_stage=1", "precision=fp32"]),
]
MIB = 1 << 20


# --------------------------------------------------------------------------- worker (torchrun)


def random_batches(cfg, par, gas: int) -> list:
    """This rank's micro-batches of one global batch of random tokens (step 0)."""
    import torch

    from prime_scale.noise import make_batch

    g = torch.Generator().manual_seed(0)
    mb = cfg.train.micro_batch
    batches = []
    for i in range(gas):
        ids = torch.randint(0, cfg.model.vocab_size, (mb, cfg.model.seq_len), generator=g)
        index = torch.arange(mb) + (par.dp_rank * gas + i) * mb
        batches.append(make_batch(ids, index, index, seed=cfg.seed, step=0, global_batch=cfg.train.global_batch,
                                  vocab_size=cfg.model.vocab_size, ell=cfg.model.ell))
    return batches


def worker(spec: dict) -> None:
    """One training step of the real engine on random tokens, then a checkpoint."""
    from prime_scale.checkpoint import store
    from prime_scale.checkpointing import name_map, unpadded_sizes
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.parallel import state as pstate

    cfg = load_recipe("tiny-cpu", spec["overrides"])
    par = pstate.init(cfg)
    engine = Engine(cfg, par, cfg.model.vocab_size)
    engine.train_step(random_batches(cfg, par, engine.gas))
    store.save(engine.ds, spec["ckpt"], 1, meta={"recipe": cfg.to_dict(), "vocab_size": cfg.model.vocab_size},
               name_map=name_map(engine.module), unpadded=unpadded_sizes(engine.module, cfg.model.vocab_size))
    pstate.destroy()


# --------------------------------------------------------------------------- measuring


def _measure(code: str) -> dict:
    """Run python code in a fresh process; it prints one JSON line, to which we add its peak RSS."""
    wrapper = ("import json, resource, time, sys\nt0 = time.perf_counter()\n" + code +
               "\nprint(json.dumps({**out, 'seconds': time.perf_counter() - t0, "
               "'peak_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", wrapper], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


IMPORTS = ("import torch, safetensors.torch\n"
           "from prime_scale.checkpoint import safe_load\nfrom prime_scale.export import consolidate\n"
           "safe_load.allowed_types()\n")


def baseline() -> dict:
    return _measure(IMPORTS + "out = {}")


def convert(folder: Path, out: Path) -> dict:
    return _measure(IMPORTS + f"from prime_scale.cli import main\n"
                    f"rc = main(['convert', {str(folder)!r}, '--out', {str(out)!r}])\n"
                    f"out = {{'rc': rc}}")


def zero_to_fp32(folder: Path) -> dict:
    # DeepSpeed's consolidation loads every partition, concatenates and returns the whole state dict
    return _measure(IMPORTS + "from prime_scale.checkpoint.safe_load import weights_only_loading\n"
                    "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint\n"
                    "with weights_only_loading():\n"
                    f"    sd = get_fp32_state_dict_from_zero_checkpoint({str(folder.parent)!r}, tag={folder.name!r})\n"
                    "out = {'tensors': len(sd)}")


def sizes(folder: Path) -> tuple[int, int, str]:
    from safetensors import safe_open

    total, largest, name = 0, 0, ""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            n = 4
            for s in t.get_shape():
                n *= s
            total += n
            if n > largest:
                largest, name = n, k
    return total, largest, name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--only", default=None, help="run the layouts whose name contains this text")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --work")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_convert_"))
    model = [f"model.layers={args.layers}", f"model.hidden={args.hidden}", "model.heads=8",
             f"model.vocab_size={args.vocab}", "model.seq_len=64", "train.global_batch=2", "train.micro_batch=1",
             "optim.ema=0", "logging.wandb=disabled"]
    base = baseline()
    print(f"baseline (imports only): {base['peak_kib'] / 1024:.0f} MiB")
    rows = []
    for name, nproc, overrides in LAYOUTS:
        if args.only and args.only not in name:
            continue
        slug = name.split()[0].replace("·", "_")
        ckpt = work / slug / "ckpt"
        spec = work / slug / "spec.json"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps({"overrides": model + overrides, "ckpt": str(ckpt)}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                        f"--master-port={port}", __file__, "--worker", str(spec)], env=env, check=True,
                       capture_output=True)
        train_s = time.perf_counter() - t0
        folder = ckpt / "step_1"
        out = work / slug / "consolidated"
        shutil.rmtree(out, ignore_errors=True)
        conv = convert(folder, out)
        total, largest, lname = sizes(out)
        ckpt_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        row = {"layout": name, "checkpoint_mib": ckpt_bytes / MIB, "model_mib": total / MIB,
               "largest_mib": largest / MIB, "largest": lname,
               "convert_peak_mib": conv["peak_kib"] / 1024, "convert_above_baseline_mib":
                   (conv["peak_kib"] - base["peak_kib"]) / 1024, "convert_s": conv["seconds"], "setup_s": train_s}
        if "ZeRO-2" in name:
            z = zero_to_fp32(folder)
            row["zero_to_fp32_above_baseline_mib"] = (z["peak_kib"] - base["peak_kib"]) / 1024
            row["zero_to_fp32_s"] = z["seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    print()
    print("| layout | checkpoint | model (fp32) | largest tensor | convert: peak above baseline | "
          "× largest | × model | time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        d = r["convert_above_baseline_mib"]
        print(f"| {r['layout']} | {r['checkpoint_mib']:.0f} MiB | {r['model_mib']:.0f} MiB | "
              f"{r['largest_mib']:.1f} MiB ({r['largest']}) | {d:.0f} MiB | {d / r['largest_mib']:.1f} | "
              f"{d / r['model_mib']:.2f} | {r['convert_s']:.1f} s |")
    for r in rows:
        if "zero_to_fp32_above_baseline_mib" in r:
            print(f"\nDeepSpeed zero_to_fp32 on the {r['layout']} checkpoint: "
                  f"{r['zero_to_fp32_above_baseline_mib']:.0f} MiB above baseline, {r['zero_to_fp32_s']:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        import warnings

        warnings.filterwarnings("ignore")
        worker(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
