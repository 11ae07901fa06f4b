"""The Python parts of bench/gpu_check.sh (one CUDA GPU; an H200 is assumed for MFU).

    python bench/gpu_check.py bench  --work DIR     # throughput, MFU and memory of owt-base at ℓ = 1 and 4
    python bench/gpu_check.py report --work DIR --pytest-rc N --out gpu_check.json

`bench` trains the owt-base recipe (12 × 768, L = 1024, V = 50257, bf16, global batch 512 = micro
64 × 8 accumulation steps, its ZeRO 1 and EMA) on synthetic token ids with real Prime noise, as
bench/bench_train.py does, so no data set is needed. Each ℓ runs in a fresh process (its own CUDA
memory peak) under a time limit: a few warm-up steps, then timed steps (CUDA-synchronised). It
reports step time, tokens/s, model FLOP/s (prime_scale.model.train_flops_per_token) and MFU =
model FLOPs / (step time × peak), with the peak an assumption printed beside the figure (H200 dense
bf16: 989e12 FLOP/s); and torch.cuda.max_memory_allocated() of the process beside the planner's
predicted peak (`prime-scale plan ... --gpus 1 --gpu h200 --json`, key "peak_bytes") for the same
recipe and ℓ. `report` joins those figures with the GPU tests' outcomes (pytest's JUnit XML) and the
vocab-parallel loss's host sync sites into one JSON file and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RECIPE = "recipes/owt-base.yaml"
H200_PEAK = 989e12
PEAK_NOTE = "H200 SXM dense bf16 peak 989e12 FLOP/s (datasheet, no sparsity), assumed for the MFU"
ELLS = (1, 4)
NO_CUDA = "no CUDA GPU: nothing measured"


# --------------------------------------------------------------------------- one ℓ, in its own process


def _batches(cfg, step: int, vocab: int, gas: int):
    import torch

    from prime_scale.noise import make_batch

    G, mb, L = cfg.train.global_batch, cfg.train.micro_batch, cfg.model.seq_len
    gen = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, vocab, (G, L), generator=gen)
    out = []
    for j in range(gas):
        index = torch.arange(j * mb, (j + 1) * mb) + step * G
        out.append(make_batch(data[j * mb:(j + 1) * mb], index, index, seed=cfg.seed, step=step, global_batch=G,
                              vocab_size=vocab, ell=cfg.model.ell))
    return out


def bench_one(ell: int, warmup: int, steps: int, overrides: list[str], out: Path) -> None:
    """Train `warmup + steps` synthetic steps of the recipe at this ℓ; write the figures to `out`."""
    import torch

    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.model import train_flops_per_token
    from prime_scale.parallel import state as pstate

    cuda = torch.cuda.is_available()
    cfg = load_recipe(str(REPO / RECIPE), [f"model.ell={ell}", "logging.wandb=disabled", *overrides])
    vocab = cfg.model.vocab_size
    st = pstate.init(cfg)
    result: dict = {"ell": ell, "overrides": overrides, "warmup_steps": warmup, "timed_steps": steps}
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        engine = Engine(cfg, st, vocab)
        batches = [_batches(cfg, i, vocab, engine.gas) for i in range(warmup + steps)]  # host work, untimed
        times, losses = [], []
        for i, micro in enumerate(batches):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            r = engine.train_step(micro)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
            losses.append(r.loss)
        tokens = cfg.train.global_batch * cfg.model.seq_len
        flops = train_flops_per_token(engine.args) * tokens
        step_s = statistics.median(times)
        result.update({
            "global_batch": cfg.train.global_batch, "micro_batch": cfg.train.micro_batch, "gas": engine.gas,
            "seq_len": cfg.model.seq_len, "precision": cfg.precision, "zero_stage": cfg.parallel.zero_stage,
            "tokens_per_step": tokens, "flops_per_token": flops / tokens, "step_s": step_s,
            "step_s_all": times, "tokens_per_s": tokens / step_s, "model_tflops": flops / step_s / 1e12,
            "mfu": flops / step_s / H200_PEAK, "losses": losses,
        })
        if cuda:
            result["max_memory_allocated"] = torch.cuda.max_memory_allocated()
            result["max_memory_reserved"] = torch.cuda.max_memory_reserved()
    finally:
        pstate.destroy()
    out.write_text(json.dumps(result, indent=1))


# --------------------------------------------------------------------------- planner


def planner(ell: int, overrides: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "prime_scale.cli", "plan", RECIPE, *([f"model.ell={ell}"] if ell != 1 else []),
           *overrides, "--gpus", "1", "--gpu", "h200", "--json"]
    shown = " ".join(["python", *cmd[1:]])
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        plan = json.loads(proc.stdout) if proc.returncode == 0 else None
        peak = plan.get("peak_bytes") if isinstance(plan, dict) else None
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError) as exc:
        proc, peak, plan = None, None, str(exc)
    if peak is None:
        why = proc.stderr.strip().splitlines()[-1:] if proc is not None and proc.stderr.strip() else [str(plan)]
        return {"command": shown, "available": False, "why": why[0][:300] if why else "no peak_bytes"}
    keep = {k: plan.get(k) for k in ("peak_bytes", "fits", "step_s", "tokens_per_s_per_gpu", "mfu", "flops_per_token")}
    return {"command": shown, "available": True, **keep}


def bench(work: Path, warmup: int, steps: int, overrides: list[str], per_ell_timeout: float,
          plan_timeout: float) -> None:
    rows = []
    for ell in ELLS:
        out = work / f"bench_ell{ell}.json"
        cmd = [sys.executable, __file__, "bench-one", "--ell", str(ell), "--warmup", str(warmup), "--steps", str(steps),
               "--out", str(out), *[f"--set={o}" for o in overrides]]
        row: dict = {"ell": ell}
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=per_ell_timeout,
                                  env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if proc.returncode == 0 and out.exists():
                row = json.loads(out.read_text())
            else:
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
                row["error"] = "out of memory" if "OutOfMemoryError" in proc.stderr else " | ".join(tail)[-600:]
        except subprocess.TimeoutExpired:
            row["error"] = f"timed out after {per_ell_timeout:.0f} s"
        row["plan"] = planner(ell, overrides, plan_timeout)
        if row.get("max_memory_allocated") and row["plan"].get("available"):
            row["measured_over_planned"] = row["max_memory_allocated"] / row["plan"]["peak_bytes"]
        rows.append(row)
        print(f"ℓ = {ell}: " + (row.get("error") or f"{row['tokens_per_s']:,.0f} tokens/s, MFU {100 * row['mfu']:.1f}%"),
              flush=True)
    (work / "bench.json").write_text(json.dumps(rows, indent=1))


# --------------------------------------------------------------------------- report


def _tests(xml_path: Path) -> dict:
    if not xml_path.exists():
        return {"ran": False}
    cases = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, message = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind], \
                    (node.get("message") or "")[:500]
                break
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                      **({"message": message} if message else {})})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"ran": True, **counts, "cases": cases}


def _gib(x) -> str:
    return f"{x / 2**30:.1f}" if x else "-"


def report(work: Path, pytest_rc: int, out: Path) -> int:
    import torch

    cuda = torch.cuda.is_available()
    result: dict = {"cuda": cuda, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "tests": {"pytest_exit": pytest_rc, **_tests(work / "pytest.xml")}}
    t = result["tests"]
    print("\n=== GPU check ===")
    if t.get("ran"):
        print(f"tests/test_gpu.py: {t['passed']} passed, {t['failed'] + t['error']} failed, {t['skipped']} skipped "
              f"(pytest exit {pytest_rc})")
        for c in t["cases"]:
            if c["outcome"] in ("failed", "error"):
                print(f"  FAILED {c['test']}: {c.get('message', '')[:200]}")
        reasons = sorted({c.get("message", "") for c in t["cases"] if c["outcome"] == "skipped"})
        if reasons:
            print(f"  skipped: {'; '.join(reasons)}")
    else:
        print(f"tests/test_gpu.py: no result (pytest exit {pytest_rc}; timed out?)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cuda:
        result["measured"] = False
        print(NO_CUDA)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
        return 0
    result.update({"measured": True, "device": torch.cuda.get_device_name(0), "peak_flops_assumed": H200_PEAK,
                   "peak_note": PEAK_NOTE})
    sync = work / "sync_sites.json"
    result["vocab_parallel_sync_sites"] = json.loads(sync.read_text()) if sync.exists() else None
    rows = json.loads((work / "bench.json").read_text()) if (work / "bench.json").exists() else []
    result["owt_base_bf16"] = rows
    print(f"device: {result['device']} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    if "H200" not in result["device"]:
        print("  note: not an H200; MFU below still uses the H200 peak")
    print(f"owt-base bf16 training, synthetic ids: {RECIPE} (12 × 768, L = 1024, V = 50257)")
    print("| ℓ | step (s) | tokens/s | model TFLOP/s | MFU | max allocated (GiB) | planner peak (GiB) | measured / planned |")
    print("|---|---|---|---|---|---|---|---|")
    failed = pytest_rc != 0 or not t.get("ran") or not rows
    for r in rows:
        plan = r.get("plan", {})
        planned = _gib(plan.get("peak_bytes")) if plan.get("available") else "planner unavailable"
        if "error" in r:
            failed = True
            print(f"| {r['ell']} | {r['error']} | | | | | {planned} | |")
            continue
        ratio = f"{r['measured_over_planned']:.2f}" if "measured_over_planned" in r else "-"
        print(f"| {r['ell']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {_gib(r.get('max_memory_allocated'))} | {planned} | {ratio} |")
    for r in rows:
        if not r.get("plan", {}).get("available"):
            print(f"ℓ = {r['ell']}: planner unavailable ({r.get('plan', {}).get('why', '')})")
    if rows and "error" not in rows[0]:
        r = rows[0]
        print(f"global batch {r['global_batch']} = micro {r['micro_batch']} × {r['gas']}, ZeRO {r['zero_stage']}, "
              f"median of {r['timed_steps']} steps after {r['warmup_steps']} warm-up")
    print(f"MFU: {PEAK_NOTE}")
    if result["vocab_parallel_sync_sites"] is not None:
        sites = sorted({s for v in result["vocab_parallel_sync_sites"].values() for s in v})
        print(f"host syncs in the vocab-parallel loss (set_sync_debug_mode): {', '.join(sites) or 'none'}")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--per-ell-timeout", type=float, default=85)
    b.add_argument("--plan-timeout", type=float, default=25)
    b.add_argument("--set", action="append", default=[], help="recipe override for both the run and the plan")
    one = sub.add_parser("bench-one")
    one.add_argument("--ell", type=int, required=True)
    one.add_argument("--warmup", type=int, default=2)
    one.add_argument("--steps", type=int, default=5)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--set", action="append", default=[])
    r = sub.add_parser("report")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--pytest-rc", type=int, required=True)
    r.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.cmd == "bench":
        import torch

        if not torch.cuda.is_available():
            print(NO_CUDA)
            return 0
        bench(a.work, a.warmup, a.steps, a.set, a.per_ell_timeout, a.plan_timeout)
        return 0
    if a.cmd == "bench-one":
        bench_one(a.ell, a.warmup, a.steps, a.set, a.out)
        return 0
    return report(a.work, a.pytest_rc, a.out)


if __name__ == "__main__":
    sys.exit(main())
