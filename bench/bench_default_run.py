"""The first command a newcomer runs, timed end to end: `prime-scale train` with the default recipe.

    python bench/bench_default_run.py                        # 3 runs of the default, fresh demo build each time
    python bench/bench_default_run.py --runs 1 --label lr5e-3 optim.lr=5e-3    # another configuration
    python bench/bench_default_run.py --plot docs/default-run.png              # the curves of every label so far

Each run is the real command (`python -m prime_scale.cli train [overrides]`) in a fresh working
directory with a fresh PRIME_SCALE_DEMO_DIR, so the demo corpus is built inside the timed wall (as on
a newcomer's first run; --reuse-demo builds it once and keeps it). Per run: the wall time of the
whole command (demo build, training, validations, checkpoints, the final samples), the final
validation bound in bits per byte beside the unigram baselines of its own tokenizer and of the
reference tokenizer (the demo's 4096-piece one, recorded by the build), the samples' word share, and
the curve of the bound against wall minutes since the command started (each validation line timed
as the command prints it). Results are appended, one JSON object per run, to
--results (default bench/results/default_run.jsonl); the summary prints medians over the runs of
the label.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_RESULTS = REPO / "bench" / "results" / "default_run.jsonl"
VALIDATION = re.compile(r"validation @ step (\d+):")


def one_run(overrides: list[str], demo_dir: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="prime-scale-default-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PRIME_SCALE_DEMO_DIR"] = str(demo_dir or work / "demo")
        env["PRIME_SCALE_CACHE"] = str(work / "cache")
        env["PYTHONPATH"] = str(REPO)
        cmd = [sys.executable, "-m", "prime_scale.cli", "train", *overrides, f"run.dir={work / 'run'}"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines, seen = [], {}  # each validation line timed as it arrives: the curve's wall clock
        for line in proc.stdout:
            lines.append(line)
            m = VALIDATION.search(line)
            if m:
                seen[int(m.group(1))] = (time.perf_counter() - t0) / 60
        rc = proc.wait()
        wall = time.perf_counter() - t0
        out = "".join(lines)
        if rc != 0:
            raise SystemExit(f"the run failed (exit {rc}):\n{out[-4000:]}")
        records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("val_bits_per_byte") is not None]
    last = val[-1]
    ref = re.search(r"reference tokenizer \((\d+) pieces\)\s+([\d.]+) bits/byte", out)
    share = re.search(r"words: ([\d.]+)% of the samples' ([\d,]+) words", out)
    demo_build = re.search(r"demo: ready in .* \(([\d.]+)s\)", out)
    return {
        "wall_s": wall, "demo_build_s": float(demo_build.group(1)) if demo_build else 0.0,
        "bound_bits_per_byte": last["val_bits_per_byte"], "bound_nats_per_token": last["val_nll_bound"],
        "stderr_nats_per_token": last["val_stderr"], "val_tokens": last["val_tokens"],
        "own_unigram_bits_per_byte": last["val_unigram_bits_per_byte"],
        "reference_vocab": int(ref.group(1)) if ref else None,
        "reference_unigram_bits_per_byte": float(ref.group(2)) if ref else last["val_unigram_bits_per_byte"],
        "word_share": float(share.group(1)) / 100 if share else None,
        "sample_words": int(share.group(2).replace(",", "")) if share else None,
        # (wall minutes, bound, the unigram baseline of the same validation tokens): the periodic
        # validations read eval.batches batches, the last one the whole split (eval.final_batches)
        "curve": [(seen[r["step"]], r["val_bits_per_byte"], r["val_unigram_bits_per_byte"]) for r in val
                  if r["step"] in seen],
        "steps": records[-1]["step"], "tokens_seen": records[-1].get("tokens_seen"),
    }


def summarize(rows: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in rows if r.get(key) is not None)  # noqa: E731
    bound, own, ref = med("bound_bits_per_byte"), med("own_unigram_bits_per_byte"), med("reference_unigram_bits_per_byte")
    return {"runs": len(rows), "wall_min": med("wall_s") / 60, "bound_bits_per_byte": bound,
            "own_unigram_bits_per_byte": own, "reference_unigram_bits_per_byte": ref,
            "bound_over_reference": bound / ref, "bound_over_own_unigram": bound / own,
            "word_share": med("word_share") if any(r.get("word_share") is not None for r in rows) else None,
            "demo_build_s": med("demo_build_s")}


def plot(results: Path, out: Path) -> None:
    """Left: configurations tried (minutes of their training loop); right: the timed runs (wall
    minutes since the command started, demo build included). The y axis is the bound over the
    unigram baseline of the same validation tokens (the periodic validations read a subset, the
    last one the whole split, so raw bits per byte of different points are not comparable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prime_scale import fsio

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    timed = [r for r in rows if r.get("clock", "command") == "command" and r.get("reference_unigram_bits_per_byte")]
    # 0.90 × the reference in units of the default tokenizer's own whole-split unigram baseline
    target = 0.9 * timed[0]["reference_unigram_bits_per_byte"] / timed[0]["own_unigram_bits_per_byte"] if timed else None
    for ax, clock in zip(axes, ("loop", "command")):
        chosen = [r for r in rows if r.get("clock", "command") == clock]
        labels = list(dict.fromkeys(r["label"] for r in chosen))
        for i, label in enumerate(labels):
            for j, r in enumerate(x for x in chosen if x["label"] == label):
                pts = [(c[0], c[1] / c[2]) for c in r["curve"] if len(c) > 2 and c[2]]
                if pts:
                    ax.plot(*zip(*pts), "-", marker=".", color=f"C{i % 10}", alpha=0.85,
                            label=f"{label}: {r['bound_bits_per_byte']:.3f} bits/byte at the end" if j == 0 else None)
        ax.axhline(1.0, color="grey", ls=":", lw=1, label="the tokenizer's unigram level")
        if target:
            ax.axhline(target, color="black", ls="--", lw=0.8,
                       label=f"target for the default's tokenizer: 0.90 × the reference = {target:.3f} × its own")
        ax.axhline(0.9, color="black", ls=":", lw=0.8, label="target for the 4096-piece tokenizer (its own = the reference)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    axes[0].set_xlabel("minutes of the training loop")
    axes[0].set_title("configurations tried (demo already built; the first three shared the CPU with other work)", fontsize=8)
    axes[1].set_xlabel("wall minutes since `prime-scale train` started (demo build included)")
    axes[1].set_title("the default, timed end to end", fontsize=9)
    axes[1].axvline(5, color="red", ls=":", lw=0.8)
    axes[0].set_ylabel("validation bound ÷ unigram baseline of the same tokens")
    fig.tight_layout()
    fsio.publish_file(out, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--label", default="default")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--reuse-demo", action="store_true", help="build the demo once, outside the timed runs")
    p.add_argument("--plot", type=Path, default=None, help="only plot the curves of --results into this PNG")
    p.add_argument("--import-run", nargs=2, metavar=("LABEL", "RUN_DIR"), default=None,
                   help="add a finished run's curve to --results (minutes of its training loop, from "
                        "metrics.jsonl's elapsed_s: a run started by hand, not timed from its command)")
    p.add_argument("override", nargs="*", help="recipe overrides (key=value) for this configuration")
    args = p.parse_args()
    if args.import_run:
        label, run_dir = args.import_run
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in records if r.get("val_bits_per_byte") is not None and "elapsed_s" in r]
        recipe = (Path(run_dir) / "recipe.yaml").read_text()
        row = {"label": label, "clock": "loop", "run_dir": str(run_dir), "recipe": recipe,
               "bound_bits_per_byte": val[-1]["val_bits_per_byte"],
               "own_unigram_bits_per_byte": val[-1]["val_unigram_bits_per_byte"],
               "curve": [(r["elapsed_s"] / 60, r["val_bits_per_byte"], r["val_unigram_bits_per_byte"]) for r in val],
               "steps": records[-1]["step"]}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return 0
    if args.plot:
        plot(args.results, args.plot)
        print(f"wrote {args.plot}")
        return 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    demo = None
    keep = None
    if args.reuse_demo:
        keep = tempfile.TemporaryDirectory(prefix="prime-scale-demo-")
        demo = Path(keep.name)
        subprocess.run([sys.executable, "-m", "prime_scale.cli", "prep", "demo"], check=True, cwd=REPO,
                       env={**os.environ, "PRIME_SCALE_DEMO_DIR": str(demo), "PYTHONPATH": str(REPO)})
    rows = []
    for i in range(args.runs):
        r = {"label": args.label, "overrides": args.override, **one_run(args.override, demo)}
        rows.append(r)
        with args.results.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"run {i + 1}/{args.runs}: {r['wall_s'] / 60:.2f} min wall, bound {r['bound_bits_per_byte']:.4f} "
              f"bits/byte = {r['bound_bits_per_byte'] / r['reference_unigram_bits_per_byte']:.3f} × reference "
              f"unigram, {r['bound_bits_per_byte'] / r['own_unigram_bits_per_byte']:.3f} × its own; word share "
              f"{r['word_share']}", flush=True)
    print(json.dumps({"label": args.label, "overrides": args.override, **summarize(rows)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
