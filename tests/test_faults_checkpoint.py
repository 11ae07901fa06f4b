"""Fault injection on real `prime-scale train` runs (tiny model, one process): preemption signals and
the time budget save a checkpoint and exit 3, and resuming is bitwise equal to never stopping;
damaged checkpoints (an overwrite that keeps the size, a truncation, all of them) are named, skipped
with a warning, or refused — never loaded, never deleted; a full disk (a 3 MB tmpfs) is a named error
that leaves the previous checkpoint and no partial save, and resume works once space is freed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.seq_len=32", "model.dropout=0.1",
        "train.global_batch=4", "train.micro_batch=2", "optim.warmup_steps=2", "optim.schedule=constant",
        "optim.ema=0.9", "eval.every=0", "eval.batches=1", "logging.wandb=disabled", "data.num_workers=0",
        "train.log_every=1", "checkpoint.keep_last=3", "eval.final_batches=null"]
STEPS = 30


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")


def _train(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prime_scale.cli", "train", "tiny-cpu", *TINY, f"run.dir={run}",
                             "--samples", "0", *extra], env=_env(), cwd=run.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _done(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _cli(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "prime_scale.cli", *args], env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _losses(run: Path) -> list:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def _wait_for_step(run: Path, step: int, p: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {p.stderr.read()[-3000:]}")
        metrics = run / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps, checkpoints every 10."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    rc, out, err = _done(_train(run, f"train.steps={STEPS}", "checkpoint.every=10"))
    assert rc == 0, err[-3000:]
    return run


# --------------------------------------------------------------------------- preemption


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])  # SIGUSR1 takes SIGTERM's path
def test_a_stop_signal_saves_and_the_resumed_run_is_bitwise_equal(reference, tmp_path, sig):
    run = tmp_path / "run"
    p = _train(run, f"train.steps={STEPS}", "checkpoint.every=10")
    _wait_for_step(run, 3, p)
    p.send_signal(getattr(signal, sig))
    rc, out, err = _done(p)
    assert rc == 3, (rc, err[-3000:])
    assert f"{sig} received" in out and "stopped early at step" in out
    stopped = max(step for step, _, _ in _losses(run))
    assert stopped < STEPS and (run / "checkpoints" / f"step_{stopped}").is_dir()
    rc, out, err = _done(_train(run, f"train.steps={STEPS}", "checkpoint.every=10", "--resume", "auto"))
    assert rc == 0, err[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped}'}" in out
    assert _losses(run) == _losses(reference)  # every loss and gradient norm, bit for bit


NPROC2 = ["train.steps=16", "checkpoint.every=0", "--nproc", "2"]


@pytest.fixture(scope="module")
def straight_nproc2(tmp_path_factory):
    """An uninterrupted 2-rank run of 16 steps, the reference of the preempted 2-rank runs."""
    straight = tmp_path_factory.mktemp("faults") / "straight"
    rc, _, err = _done(_train(straight, *NPROC2))
    assert rc == 0, err[-3000:]
    return straight


def test_sigterm_to_the_process_group_of_an_nproc_2_run_saves_on_every_rank(straight_nproc2, tmp_path):
    """What SLURM does at preemption: SIGTERM to every process of the job (the launcher forwards it
    too). Both ranks stop at the same step boundary, one checkpoint is saved, exit 3; the resumed
    run equals an uninterrupted one."""
    run = tmp_path / "run"
    run.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "prime_scale.cli", "train", "tiny-cpu", *TINY, f"run.dir={run}",
                          "--samples", "0", *NPROC2], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_step(run, 2, p)
    os.killpg(p.pid, signal.SIGTERM)
    rc, out, err = _done(p)
    assert rc == 3, (rc, err[-3000:])
    stopped = [int(d.name.split("_")[1]) for d in (run / "checkpoints").iterdir() if d.name.startswith("step_")]
    assert len(stopped) == 1 and stopped[0] < 16 and _cli("checkpoint", "verify", str(run))[0] == 0
    rc, out, err = _done(_train(run, *NPROC2, "--resume", "auto"))
    assert rc == 0, err[-3000:]
    assert _losses(run) == _losses(straight_nproc2)


def test_torchrun_launched_as_documented_saves_on_sigusr1_and_on_sigterm(straight_nproc2, tmp_path):
    """torchrun with docs/training.md's flags: SIGUSR1 (#SBATCH --signal=USR1@N) and SIGTERM to the
    agent reach both workers, which save the step they reached and exit 3 (torchrun itself exits 1,
    its SignalException); resuming twice gives the uninterrupted run's losses bit for bit. With
    torchrun's defaults SIGUSR1 kills it and the workers die unsaved (its parent-death signal)."""
    from prime_scale.parallel.preemption import TORCHRUN_PREEMPTION_FLAGS

    assert " ".join(TORCHRUN_PREEMPTION_FLAGS) in (REPO / "docs" / "training.md").read_text()
    run = tmp_path / "run"
    run.mkdir()
    stopped = 0
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        log = tmp_path / f"torchrun-{sig.name}.log"
        with open(log, "w") as out:
            agent = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 *TORCHRUN_PREEMPTION_FLAGS, "-m", "prime_scale.cli.train", "tiny-cpu", *TINY, f"run.dir={run}",
                 "--samples", "0", *NPROC2[:2], *(["--resume", "auto"] if stopped else [])],
                env=_env(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
            _wait_for_step(run, stopped + 2, agent)
            agent.send_signal(sig)
            assert agent.wait(timeout=120) != 0
        text = log.read_text()
        assert f"{sig.name} received" in text and "stopped early at step" in text, text[-3000:]
        steps = [int(d.name.split("_")[1]) for d in (run / "checkpoints").iterdir() if d.name.startswith("step_")]
        assert max(steps) > stopped and max(steps) < 16, (steps, text[-3000:])
        stopped = max(steps)
        assert _cli("checkpoint", "verify", str(run))[0] == 0
    rc, out, err = _done(_train(run, *NPROC2, "--resume", "auto"))
    assert rc == 0, err[-3000:]
    assert _losses(run) == _losses(straight_nproc2)


def test_the_time_budget_ends_the_run_with_a_checkpoint(reference, tmp_path):
    run = tmp_path / "run"
    rc, out, err = _done(_train(run, f"train.steps={STEPS}", "checkpoint.every=10", "train.max_minutes=0.0001"))
    assert rc == 3, err[-3000:]
    assert "train.max_minutes=0.0001 reached" in out and (run / "checkpoints" / "step_1").is_dir()
    rc, _, err = _done(_train(run, f"train.steps={STEPS}", "checkpoint.every=10", "--resume", "auto"))
    assert rc == 0, err[-3000:]
    assert _losses(run) == _losses(reference)


# --------------------------------------------------------------------------- damaged checkpoints


def _copy(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def _optimizer_file(folder: Path) -> Path:
    # the largest of DeepSpeed's files: the optimizer state (one fp32 process runs ZeRO 0, where it sits
    # beside the weights in the model-states file)
    return max((p for p in folder.rglob("*_states.pt")), key=lambda p: p.stat().st_size)


def test_an_overwrite_that_keeps_the_size_is_named_and_skipped(reference, tmp_path):
    run = _copy(reference, tmp_path)
    victim = _optimizer_file(run / "checkpoints" / f"step_{STEPS}")
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(1024))
    assert victim.stat().st_size == size
    rc, out, _ = _cli("checkpoint", "verify", str(run))
    assert rc == 2 and f"DAMAGED  {run / 'checkpoints' / f'step_{STEPS}'}" in out and victim.name in out
    assert f"ok       {run / 'checkpoints' / 'step_20'}" in out
    rc, _, err = _cli("eval", str(run / "checkpoints" / f"step_{STEPS}"), "--max-batches", "1")
    assert rc == 2 and "is damaged" in err and victim.name in err and "Traceback" not in err
    rc, out, err = _done(_train(run, f"train.steps={STEPS + 2}", "checkpoint.every=10", "--resume", "auto"))
    assert rc == 0, err[-3000:]
    assert f"skipping damaged checkpoint(s) step_{STEPS}" in out and "resumed from" in out and "step_20" in out
    # the damaged checkpoint was neither loaded nor deleted: the re-save of its step set it aside
    aside = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(f"step_{STEPS}.damaged-")]
    assert len(aside) == 1 and (run / "checkpoints" / f"step_{STEPS}").is_dir()
    assert _losses(run)[:STEPS] == _losses(reference)  # steps 21..30 redone, exactly as before


def test_a_truncated_newest_checkpoint_falls_back_with_a_warning(reference, tmp_path):
    run = _copy(reference, tmp_path)
    victim = _optimizer_file(run / "checkpoints" / f"step_{STEPS}")
    os.truncate(victim, victim.stat().st_size // 2)
    rc, out, err = _done(_train(run, f"train.steps={STEPS}", "checkpoint.every=10", "--resume", "auto"))
    assert rc == 0, err[-3000:]
    assert f"skipping damaged checkpoint(s) step_{STEPS}" in out and "truncated" in out
    assert f"resumed from {run / 'checkpoints' / 'step_20'}" in out
    assert _losses(run) == _losses(reference)


def test_when_every_checkpoint_is_damaged_the_run_is_refused_and_nothing_is_touched(reference, tmp_path):
    run = _copy(reference, tmp_path)
    folders = sorted((run / "checkpoints").glob("step_*"))
    for folder in folders:
        victim = _optimizer_file(folder)
        os.truncate(victim, 100)
    before = {str(p): p.stat().st_size for p in (run / "checkpoints").rglob("*") if p.is_file()}
    rc, _, err = _done(_train(run, f"train.steps={STEPS}", "checkpoint.every=10", "--resume", "auto"))
    assert rc == 2 and "none is intact" in err and "nothing was deleted" in err.lower()
    rc, _, err = _done(_train(run, f"train.steps={STEPS}", "checkpoint.every=10"))  # a new run: refused too
    assert rc == 2 and "holds checkpoints of an earlier run" in err
    after = {str(p): p.stat().st_size for p in (run / "checkpoints").rglob("*") if p.is_file()}
    assert after == before


# --------------------------------------------------------------------------- full disk


@pytest.fixture()
def small_disk(tmp_path):
    """A 3 MB tmpfs (this suite runs as root on CI); the test frees space by growing it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"this test needs root to mount a tmpfs: {proc.stderr}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_named_leaves_the_previous_checkpoint_and_resume_works_after(reference, tmp_path,
                                                                                    small_disk):
    run = small_disk / "run"
    rc, out, err = _done(_train(run, "train.steps=4", "checkpoint.every=2"))
    assert rc == 2, (rc, err[-3000:])
    assert "no space left on the device while saving checkpoint step" in err and "Traceback" not in err
    ckpts = run / "checkpoints"
    intact = [p.name for p in ckpts.iterdir() if p.name.startswith("step_") and ".tmp-" not in p.name]
    assert not [p for p in ckpts.iterdir() if ".tmp-" in p.name]  # the partial save was removed
    if intact:
        assert f"the previous checkpoint {max(intact)} is intact" in err
        assert _cli("checkpoint", "verify", str(run))[0] == 0
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    rc, out, err = _done(_train(run, "train.steps=4", "checkpoint.every=2", "--resume", "auto"))
    assert rc == 0, err[-3000:]
    assert _cli("checkpoint", "verify", str(run))[0] == 0


# --------------------------------------------------------------------------- divergence


# ZeRO 0 (fp32): our own clipping drops the update; 3: DeepSpeed's optimizer (one process runs ZeRO 1 and 2 as 0)
@pytest.mark.parametrize("zero", [0, 3])
def test_non_finite_steps_are_skipped_up_to_a_limit_then_stop(tmp_path, zero):
    """Weights initialised at 1e36 overflow in the first forward: every step's loss is NaN. With
    on_nonfinite=skip each update is dropped and counted; the third in a row exceeds max_skips=2."""
    run = tmp_path / "run"
    bad = ["model.init_std=1e36", f"parallel.zero_stage={zero}", "checkpoint.every=1", "train.steps=6"]
    rc, out, err = _done(_train(run, *bad, "train.on_nonfinite=skip", "train.max_skips=2"))
    assert rc == 2 and "3 steps in a row, more than train.max_skips=2" in err and "Traceback" not in err
    assert out.count("its update was dropped (skip") == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 2] and all(r["loss"] is None for r in records)
    assert all(r["lr"] == records[0]["lr"] for r in records)  # the LR schedule held still
    # the weights never changed, so the checkpoints of the skipped steps hold the finite initial weights
    assert _cli("checkpoint", "verify", str(run))[0] == 0
    rc, _, err = _done(_train(tmp_path / "stop", *bad))  # the default policy stops at the first one
    assert rc == 2 and "step 1: the training loss is nan" in err and "its update was dropped" in err
    assert not (tmp_path / "stop" / "checkpoints").exists()


def test_loss_spikes_are_dropped_before_their_update_and_the_run_resumes_exactly(tmp_path):
    """train.spike_factor=1.0001 over a window of 3 makes a spike of every loss above the median of the
    last three accepted ones, so in 12 steps the policy runs several times: each such update is dropped
    (LR held, counted in skipped_steps), every accepted loss is at most the factor × the median before
    it (recomputed here from the records), a run stopped at step 6 and resumed matches the straight run
    bit for bit (the window is in the checkpoint), and on_spike=stop ends the run at the first spike."""
    import statistics

    spiky = ["train.spike_factor=1.0001", "train.spike_window=3", "train.max_skips=20", "checkpoint.every=6"]
    straight = tmp_path / "straight"
    rc, out, err = _done(_train(straight, *spiky, "train.steps=12"))
    assert rc == 0, err[-3000:]
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    accepted, skipped_at, previous_skips = [], [], 0
    for r in records:
        if r["skipped_steps"] > previous_skips:
            skipped_at.append(r["step"])
            assert r["loss"] is None and r["grad_norm"] is None and r["lr"] == records[r["step"] - 2]["lr"]
            median = statistics.median(accepted[-3:])
            assert f"step {r['step']}: the training loss" in out and f"× {median:.4g} (the median" in out
        else:
            if len(accepted) >= 3:
                assert r["loss"] <= 1.0001 * statistics.median(accepted[-3:]), (r, accepted)
            accepted.append(r["loss"])
        previous_skips = r["skipped_steps"]
    assert 2 <= len(skipped_at) <= 9, skipped_at

    run = tmp_path / "run"
    assert _done(_train(run, *spiky, "train.steps=6"))[0] == 0
    rc, out, err = _done(_train(run, *spiky, "train.steps=12", "--resume", "auto"))
    assert rc == 0, err[-3000:]
    assert _losses(run) == _losses(straight)

    rc, out, err = _done(_train(tmp_path / "stop", *spiky, "train.steps=12", "train.on_spike=stop"))
    assert rc == 2 and f"step {skipped_at[0]}: the training loss" in err and "is a spike" in err, err[-3000:]
    assert "Traceback" not in err
