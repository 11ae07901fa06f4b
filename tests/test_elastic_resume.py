"""Resuming under another layout (export/elastic.py) in the real training loop: DeepSpeed engines
and megatron-core layers on gloo, fp32, the demo corpus.

One run continues through a chain of layouts, two steps each, every segment resuming the previous
one's checkpoint (`--resume auto`):
    dp1 -> dp2 (ZeRO 1) -> dp1 -> dp2 (ZeRO 2) -> tp2 -> pp2 -> dp1
so DP goes 1 -> 2 -> 1 under ZeRO 1 and under ZeRO 2 (one data-parallel rank runs fp32 ZeRO 1/2 as
ZeRO 0, so each of those also changes the ZeRO stage), TP 1 -> 2 -> 1 and PP 1 -> 2 -> 1. Its
per-step losses, gradient norms and learning rates must equal those of one uninterrupted run on one
process to a relative 1e-5 (the tolerance within which every layout already gives the same losses,
test_parallel_layouts), and so must the validation bound at every segment's end, computed with the
resharded EMA weights. The warm-up spans three segments, so a schedule restored at the wrong step shows. The
samples each step trained on (their ids, over all data-parallel ranks) must be those of the
uninterrupted run: none repeated, none skipped. Every segment that changes the layout says so in its
log, with what it does not continue (the RNG streams).

Through the CLI, the chain's run continues: a layout that cannot be resharded (ZeRO 3) is refused
before any process starts, every file left as it was; `prime-scale train --nproc 2 parallel.tp=2
--resume auto` continues it with the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.dist import launch

SEG = 2  # steps per segment
CHAIN = [("dp1", 1, []), ("dp2-zero1", 2, ["parallel.zero_stage=1"]), ("dp1", 1, []),
         ("dp2-zero2", 2, ["parallel.zero_stage=2"]), ("tp2", 2, ["parallel.tp=2"]), ("pp2", 2, ["parallel.pp=2"]),
         ("dp1", 1, [])]
STEPS = SEG * len(CHAIN)
COMMON = ["model.layers=2", "model.hidden=64", "model.heads=4", "model.seq_len=32", "model.dropout=0.0",
          "optim.schedule=constant", "optim.warmup_steps=5", "optim.ema=0.9", "optim.clip=1.0",
          "optim.weight_decay=0.01", "train.global_batch=8", "train.micro_batch=2", "train.log_every=1",
          f"eval.every={SEG}", "eval.batches=2", "eval.final_batches=2", "eval.mc_samples=1", "checkpoint.keep_last=3",
          "logging.wandb=disabled", "data.num_workers=0", "parallel.zero_stage=1"]
REL = 1e-5


def segment(run_dir: str, overrides: list, steps: int, resume) -> dict:
    """One rank of one segment: the trainer as `prime-scale train` runs it, recording the ids of the
    samples each step trains on and what the run printed."""
    from prime_scale import checkpointing as hooks
    from prime_scale.config import load_recipe, resolve_dp
    from prime_scale.train import Trainer

    class Recording(Trainer):
        seen: dict = {}  # step -> ids of the samples this rank trained on

        def micro_batches(self, iterator, step):
            ids = self.seen.setdefault(str(step), [])
            self.where = {"dp": self.par.dp_rank, "first": self.par.tp_rank == 0 and self.par.pp_rank == 0}

            class Tap:
                def __next__(_):
                    raw = next(iterator)
                    ids.extend(int(i) for i in raw["index"])
                    return raw

            return super().micro_batches(Tap(), step)

    cfg = load_recipe("tiny-cpu", COMMON + overrides + [f"run.dir={run_dir}", f"train.steps={steps}"])
    resolve_dp(cfg, int(os.environ["WORLD_SIZE"]))
    trainer = Recording(cfg)
    hooks.install(trainer, resume)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = trainer.run()
    return {"rc": rc, "seen": trainer.seen, **trainer.where, "log": out.getvalue()}


def _samples(ranks: list) -> dict:
    """step -> sorted ids of the samples of the global batch (each data-parallel rank counted once)."""
    steps = {}
    for r in ranks:
        if r["first"]:
            for step, ids in r["seen"].items():
                steps.setdefault(int(step), []).extend(ids)
    return {step: sorted(ids) for step, ids in steps.items()}


def _metrics(run_dir: Path) -> dict:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from data_prep.demo import ensure_demo_corpus

    ensure_demo_corpus(seq_len=32)  # once, before the processes would queue on its lock
    work = tmp_path_factory.mktemp("elastic")
    reference = launch(1, "test_elastic_resume:segment",  # two steps longer: the CLI test continues the chain
                       {"run_dir": str(work / "reference"), "overrides": [], "steps": STEPS + SEG, "resume": None},
                       timeout=300)
    segments = []
    for k, (name, nproc, overrides) in enumerate(CHAIN):
        segments.append(launch(nproc, "test_elastic_resume:segment",
                               {"run_dir": str(work / "chain"), "overrides": overrides, "steps": SEG * (k + 1),
                                "resume": "auto" if k else None}, timeout=300))
    return work, reference, segments


def test_the_chain_of_layouts_gives_the_uninterrupted_run(chain):
    work, _, segments = chain
    assert all(r["rc"] == 0 for seg in segments for r in seg)
    ref, got = _metrics(work / "reference"), _metrics(work / "chain")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        layout = CHAIN[(step - 1) // SEG][0]
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=REL), f"step {step} ({layout}): {key}"
    # the tp2 segment holds AdamW's moments itself (fp32 ZeRO 0): each in storage of its own size, not a
    # view of the full tensor it was cut from (which its checkpoint would then hold entire)
    from prime_scale.checkpoint import safe_load

    tp2 = work / "chain" / "checkpoints" / f"step_{SEG * 5}"  # kept: keep_last=3, two later saves
    for tp_rank in range(2):
        state = safe_load.load(tp2 / f"mp_rank_{tp_rank:02d}_model_states.pt", mmap=True)
        for moments in state["optimizer"]["state"].values():
            for key in ("exp_avg", "exp_avg_sq"):
                t = moments[key]
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    # the resharded EMA weights: every segment ends with a validation of them (eval.every = SEG)
    for step in range(SEG, STEPS + 1, SEG):
        assert got[step]["val_nll_bound"] == pytest.approx(ref[step]["val_nll_bound"], rel=REL), f"step {step}"


def test_the_data_stream_continues_without_repeats_or_gaps(chain):
    _, reference, segments = chain
    expected = {step: ids for step, ids in _samples(reference).items() if step < STEPS}
    got = {}
    for seg in segments:
        got.update(_samples(seg))
    assert sorted(got) == list(range(STEPS)) and got == expected
    every = [i for ids in got.values() for i in ids]
    assert len(every) == len(set(every)) == STEPS * 8  # one epoch holds thousands: nothing repeats yet


def test_a_changed_layout_is_stated_in_the_log(chain):
    _, _, segments = chain
    for k, seg in enumerate(segments[1:], start=1):
        log = seg[0]["log"]
        assert "resuming under another layout (" in log, f"segment {k} ({CHAIN[k][0]}):\n{log[-2000:]}"
        assert "RNG streams start fresh: nothing in training draws from them (model.dropout = 0)" in log
        assert f"/step_{SEG * k} (step {SEG * k}, {SEG * k * 8 * 32:,} tokens seen)" in log
    assert "(dp 1 -> 2, zero_stage 0 -> 1)" in segments[1][0]["log"]
    assert "(tp 2 -> 1, pp 1 -> 2)" in segments[5][0]["log"]


# --------------------------------------------------------------------------- the CLI

def _cli(run_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "prime_scale.cli", "train", *COMMON, f"run.dir={run_dir}", "--samples", "0", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_cli_refuses_what_it_cannot_reshard_and_continues_on_another_layout(chain):
    work, _, _ = chain
    run_dir = work / "chain"
    newest = run_dir / "checkpoints" / f"step_{STEPS}"
    def files():  # what the runs wrote (the run lock's own file aside)
        return sorted((p.relative_to(run_dir), p.stat().st_size) for p in run_dir.rglob("*")
                      if p.is_file() and p.name != ".lock")

    before = files()

    refused = _cli(run_dir, f"train.steps={STEPS + SEG}", "parallel.zero_stage=3", "--nproc", "2", "--resume", "auto")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert str(newest) in refused.stderr and "-> tp=1 pp=1 dp=2 zero_stage=3 precision=fp32)" in refused.stderr
    assert "ZeRO 3" in refused.stderr and "--init-from" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert files() == before

    more = _cli(run_dir, f"train.steps={STEPS + SEG}", "parallel.tp=2", "--nproc", "2", "--resume", "auto")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming under another layout (tp 1 -> 2)" in more.stdout
    assert "RNG streams start fresh" in more.stdout
    ref, got = _metrics(work / "reference"), _metrics(run_dir)
    assert sorted(got) == list(range(1, STEPS + SEG + 1))
    for step in range(STEPS + 1, STEPS + SEG + 1):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=REL), f"step {step}"
    manifest = json.loads((run_dir / "checkpoints" / f"step_{STEPS + SEG}" / "manifest.json").read_text())
    assert manifest["layout"]["tp"] == 2
