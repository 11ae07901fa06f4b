"""What content hashing costs a checkpoint save: `store.save` with the SHA-256 of every file (as
shipped) against the same save with the hash replaced by a constant, alternating in one process.

One process, the real engine (ZeRO-1, fp32, AdamW: model + two moments + master weights on disk)
of a Prime model of --layers × --hidden at V = --vocab; each save goes to a fresh directory and is
fsynced (the hash runs beside the fsyncs, see checkpoint/catalog.py). Reports the median save time
of each variant and their ratio.

    python bench/bench_checkpoint.py [--layers 8] [--hidden 512] [--vocab 8000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    from prime_scale.checkpoint import catalog, store
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.model import name_map, unpadded_sizes
    from prime_scale.parallel import state as pstate

    cfg = load_recipe("tiny-cpu", [f"model.layers={args.layers}", f"model.hidden={args.hidden}", "model.heads=8",
                                   f"model.vocab_size={args.vocab}", "model.seq_len=64", "train.global_batch=1",
                                   "train.micro_batch=1", "optim.ema=0", "parallel.zero_stage=1"])
    par = pstate.init(cfg)
    engine = Engine(cfg, par, args.vocab)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_ckpt_"))
    hashed = catalog.file_digest
    times: dict = {"sha256": [], "no hash": []}
    size = 0
    for r in range(args.rounds):
        for variant in times:
            catalog.file_digest = hashed if variant == "sha256" else (lambda path: "-")
            out = work / f"{variant.replace(' ', '_')}_{r}"
            t0 = time.perf_counter()
            folder = store.save(engine.ds, out, 1, meta={"recipe": cfg.to_dict(), "vocab_size": args.vocab},
                                name_map=name_map(engine.module), unpadded=unpadded_sizes(engine.module, args.vocab),
                                where=store.Coords.of(par))
            times[variant].append(time.perf_counter() - t0)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            print(f"round {r + 1} {variant}: {times[variant][-1]:.2f} s", flush=True)
            shutil.rmtree(out)
    catalog.file_digest = hashed
    pstate.destroy()
    a, b = statistics.median(times["sha256"]), statistics.median(times["no hash"])
    print(f"\ncheckpoint of {size / (1 << 20):.0f} MiB ({args.layers}×{args.hidden}, V={args.vocab}), median of "
          f"{args.rounds}: with SHA-256 {a:.2f} s, without {b:.2f} s, ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
