"""Faults around launching (issue 10, items 3 and 4), with real `prime-scale train` runs of a tiny
model: a second training in a run directory whose first run is alive is refused (exit 2, naming the
holder) and leaves the first run's files alone; a run killed with kill -9 leaves no stale lock; under
`--nproc 2` the launcher holds the lock for its ranks, and kill -9 of the launcher takes its ranks
with it, so that no checkpoint is written unsupervised."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prime_scale.checkpoint.catalog import find_latest_complete, list_step_dirs

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.seq_len=32", "train.global_batch=4",
        "train.micro_batch=2", "train.log_every=1", "logging.wandb=disabled", "eval.every=0", "eval.batches=1",
        "eval.mc_samples=1", "data.num_workers=0", "checkpoint.keep_last=2", "eval.final_batches=null"]


@pytest.fixture(scope="module", autouse=True)
def _demo_corpus():
    # built once here, before runs would queue on its lock (PRIME_SCALE_DEMO_DIR: tests/conftest.py)
    from data_prep.demo import ensure_demo_corpus

    ensure_demo_corpus(seq_len=32)


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prime_scale.cli", "train", *TINY, f"run.dir={run}", "--samples", "0", *extra]


def _start(run: Path, *extra: str) -> subprocess.Popen:
    # output to a file, not a pipe nobody reads: a full pipe would stall the run
    log = open(run.parent / f"{run.name}-{time.monotonic_ns()}.log", "w")
    proc = subprocess.Popen(_command(run, *extra), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    proc.log = Path(log.name)
    return proc


def _refused(run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(run, *extra), env=_env(), capture_output=True, text=True, timeout=120)


def _wait_for(what, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not what():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) first:\n{proc.log.read_text()[-3000:]}")
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.02)


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _newest(run: Path) -> int:
    """The step of the newest published checkpoint (0: none yet)."""
    return max((step for step, _ in list_step_dirs(run / "checkpoints")), default=0)


def _proc_stat(pid: int):
    """(state, ppid) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = text.rpartition(")")[2].split()[:2]
    return state, int(ppid)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie is dead, only not reaped yet


def _assert_all_die(pids: list[int], what: str, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), what


def _assert_refused(result: subprocess.CompletedProcess, holder_pid: int, key: str = "run.dir") -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stderr
    assert "in use by another training" in err and f"pid {holder_pid}" in err and socket.gethostname() in err, err
    assert f"another {key}" in err and "Traceback" not in err, err


def test_a_second_training_in_a_busy_run_directory_is_refused(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"  # a checkpoint.dir outside run.dir is locked too
    first = _start(run, "train.steps=40", "checkpoint.every=20", f"checkpoint.dir={ckpt}")
    try:
        _wait_for(lambda: len(_records(run)) >= 1, first)
        # paused, so that it is surely alive during the refusals however fast it trains: a stopped
        # holder holds its lock all the same
        os.kill(first.pid, signal.SIGSTOP)
        recipe, metrics = (run / "recipe.yaml").read_bytes(), (run / "metrics.jsonl").stat().st_ino
        _assert_refused(_refused(run, "train.steps=40", "seed=1"), first.pid)  # a new run
        _assert_refused(_refused(run, "train.steps=40", "--resume", "auto"), first.pid)
        _assert_refused(_refused(tmp_path / "other", f"checkpoint.dir={ckpt}", "--resume", "auto"), first.pid,
                        "checkpoint.dir")
        # under torchrun, rank 0 is refused (exit 2) and torchrun stops the other rank
        rank_argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                     "prime_scale.cli.train", *TINY, f"run.dir={run}", "--resume", "auto"]
        torchrun = subprocess.run(rank_argv, env=_env(), capture_output=True, text=True, timeout=120)
        assert torchrun.returncode != 0 and f"pid {first.pid}" in torchrun.stderr, torchrun.stderr[-3000:]
        assert "exitcode  : 2" in torchrun.stderr, torchrun.stderr[-3000:]
        assert first.poll() is None
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=180) == 0, first.log.read_text()[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
    assert (run / "recipe.yaml").read_bytes() == recipe
    assert sorted(p.name for p in run.glob("metrics*")) == ["metrics.jsonl"]  # nothing moved aside
    assert (run / "metrics.jsonl").stat().st_ino == metrics
    assert [r["step"] for r in _records(run)] == list(range(1, 41))
    assert [p.name for _, p in list_step_dirs(ckpt)] == ["step_20", "step_40"]


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    first = _start(run, "train.steps=5000", "checkpoint.every=5")
    try:
        _wait_for(lambda: find_latest_complete(run / "checkpoints") is not None, first)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    step = int(find_latest_complete(run / "checkpoints").name.split("_")[1])
    second = _start(run, f"train.steps={step + 2}", "checkpoint.every=5", "--resume", "auto")
    assert second.wait(timeout=180) == 0, second.log.read_text()[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step}'}" in second.log.read_text()


def test_the_nproc_launcher_holds_the_lock_and_its_ranks_die_with_it(tmp_path):
    run = tmp_path / "run"
    launcher = _start(run, "train.steps=5000", "checkpoint.every=10", "--nproc", "2")
    ranks = []
    try:
        _wait_for(lambda: len(_records(run)) >= 1, launcher)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2
        _assert_refused(_refused(run, "train.steps=50", "--nproc", "2"), launcher.pid)
        # the ranks train on under their launcher's lock; kill it right after a save, 10 steps
        # before the next one would be due
        seen = _newest(run)
        _wait_for(lambda: _newest(run) > seen, launcher)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        at_kill = _newest(run)
        _assert_all_die(ranks, "the ranks outlived their launcher")
        steps = len(_records(run))
        time.sleep(2)
        assert _newest(run) == at_kill and len(_records(run)) == steps  # nothing trained on
    finally:
        launcher.kill()
        for pid in ranks:  # orphans if the launcher did not take them along
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()


def test_torchrun_workers_die_with_their_agent(tmp_path):
    """kill -9 of torchrun's agent: its workers (direct children, recognised by the agent's command
    line) get SIGKILL from the kernel, as our own launcher's ranks do, and nothing trains on."""
    run = tmp_path / "run"
    log = open(tmp_path / "torchrun.log", "w")
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "prime_scale.cli.train", *TINY, f"run.dir={run}", "--samples", "0",
                              "train.steps=5000", "checkpoint.every=0"], env=_env(), stdout=log,
                             stderr=subprocess.STDOUT)
    agent.log = Path(log.name)
    workers = []
    try:
        _wait_for(lambda: len(_records(run)) >= 1, agent)
        workers = _children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        _assert_all_die(workers, "torchrun's workers outlived it")
        steps = len(_records(run))
        time.sleep(1)
        assert len(_records(run)) == steps
    finally:
        agent.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        agent.wait()


def test_sigint_to_a_background_nproc_launcher_saves_and_exits_3(tmp_path):
    """A launcher started with `&` or nohup inherits SIGINT ignored: Python then installs no
    KeyboardInterrupt handler, and `kill -INT` of the launcher used to do nothing (the run trained
    on and exited 0). It must reach the ranks, which save and stop as on Ctrl-C: exit 3."""
    run = tmp_path / "run"
    log = open(tmp_path / "background.log", "w")
    launcher = subprocess.Popen(_command(run, "train.steps=5000", "checkpoint.every=0", "--nproc", "2"),
                                env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    launcher.log = Path(log.name)
    try:
        _wait_for(lambda: len(_records(run)) >= 2, launcher)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=120) == 3, launcher.log.read_text()[-3000:]
    finally:
        launcher.kill()
        launcher.wait()
    stopped = max(r["step"] for r in _records(run))
    assert find_latest_complete(run / "checkpoints").name == f"step_{stopped}"
    assert "SIGINT received" in launcher.log.read_text()


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint file would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_refusal_on_one_rank_is_the_named_error_not_its_peers_traceback(tmp_path):
    """Rank 1's ZeRO optimizer file is a pickle that would run a command (its manifest entry
    re-recorded, so the checkpoint passes its hashes): rank 1 refuses it with a named error while rank 0 waits in a
    collective and then dies in gloo. The launcher prints the named error and exits 2, not 1."""
    import hashlib

    import torch

    run = tmp_path / "run"
    steps = ["train.steps=2", "checkpoint.every=2", "parallel.zero_stage=1", "--nproc", "2"]
    first = subprocess.run(_command(run, *steps), env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    step = run / "checkpoints" / "step_2"
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    target = next(step.rglob(name))
    pwned = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _RunsCode(f"touch {pwned}")}, target)
    manifest = json.loads((step / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"].endswith(name):
            entry["bytes"] = target.stat().st_size
            if "sha256" in entry:
                entry["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (step / "manifest.json").write_text(json.dumps(manifest))
    resumed = subprocess.run(_command(run, *steps, "train.steps=4", "--resume", "auto"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2, (resumed.returncode, resumed.stderr[-3000:])
    assert name in resumed.stderr and "prime-scale train: error:" in resumed.stderr
    assert "failed (exit codes" not in resumed.stderr and not pwned.exists()


def test_the_deepspeed_runners_workers_stop_with_it(tmp_path):
    """kill -9 of the top `deepspeed` runner (one node): its per-node launcher asks for no
    parent-death signal and used to live on with its workers, training unsupervised. The workers
    see their launcher re-parented and stop as on SIGTERM (the runner also dies of Ctrl-C or
    SLURM's SIGTERM, which must save): a checkpoint of the step they reached, then the launcher
    follows them."""
    run = tmp_path / "run"
    log = open(tmp_path / "deepspeed.log", "w")
    runner = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--module", "prime_scale.cli.train", *TINY,
                               f"run.dir={run}", "--samples", "0", "train.steps=5000", "checkpoint.every=0"],
                              env=_env(), stdout=log, stderr=subprocess.STDOUT)
    runner.log = Path(log.name)
    launchers, workers = [], []
    try:
        _wait_for(lambda: len(_records(run)) >= 1, runner)
        launchers = _children(runner.pid)
        workers = [w for pid in launchers for w in _children(pid)]
        assert len(launchers) == 1 and len(workers) == 2, (launchers, workers)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        _assert_all_die(workers, "the deepspeed runner's workers outlived it", within_s=60.0)
        _assert_all_die(launchers, "its per-node launcher outlived its workers", within_s=15.0)
        stopped = max(r["step"] for r in _records(run))
        assert find_latest_complete(run / "checkpoints").name == f"step_{stopped}"
        assert "SIGTERM received" in runner.log.read_text()
    finally:
        runner.kill()
        for pid in launchers + workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
