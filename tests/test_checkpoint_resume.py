"""A process killed in the middle of a save leaves the previous checkpoint loadable; resuming from it
repeats the uninterrupted run's losses exactly (dropout on, data stream, LR warm-up, EMA); and a
checkpoint file carrying a malicious pickle is refused without running it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch

from prime_scale import cli
from prime_scale.checkpoint import catalog as mf
from prime_scale.checkpoint import safe_load
from harness.checkpoints import popen_single

STEPS = 6


def _wait(procs, timeout=180):
    deadline = time.time() + timeout
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1, deadline - time.time()))
        except Exception:
            p.kill()
            raise
        out.append((p.returncode, err))
    return out


class Payload:
    """Unpickling this calls open(path, 'w'): a harmless stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(folder, rel, marker):
    """Replace one file of a checkpoint by a malicious pickle and fix up the manifest, as an attacker
    who hands out a self-consistent checkpoint would."""
    torch.save({"module": Payload(str(marker))}, folder / rel)
    m = json.loads((folder / mf.MANIFEST).read_text())
    for entry in m["files"]:
        if entry["path"] == rel:  # sizes and content hashes: the manifest vouches for the payload
            entry["bytes"] = (folder / rel).stat().st_size
            entry[mf.HASH] = mf.file_digest(folder / rel)
    (folder / mf.MANIFEST).write_text(json.dumps(m))
    assert mf.is_complete(folder) and not mf.damage(folder)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Run A saves at step 2 and is killed inside its step-4 save; run B trains STEPS steps unbroken."""
    a = tmp_path_factory.mktemp("crash")
    b = tmp_path_factory.mktemp("reference")
    tok = a / "tok"
    tok.mkdir()
    (tok / "spm.model").write_bytes(os.urandom(300))
    (tok / "vocab.txt").write_text("a\nb\n")
    crash = popen_single(["train", str(a), json.dumps({"steps": 4, "save_at": [2, 4], "hang_at_save": 4,
                                                        "tokenizer": str(tok)})], a)
    ref = popen_single(["train", str(b), json.dumps({"steps": STEPS})], b)
    deadline = time.time() + 180
    while not (a / "hanging").exists():
        assert crash.poll() is None, crash.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached its step-4 save"
        time.sleep(0.2)
    os.kill(crash.pid, signal.SIGKILL)
    crash.wait()
    [(rc, err)] = _wait([ref])
    assert rc == 0, err[-3000:]
    return a, b


def test_kill_during_save_leaves_previous_checkpoint(crashed):
    a, _ = crashed
    ckpt = a / "ckpt"
    names = sorted(p.name for p in ckpt.iterdir())
    assert "step_2" in names and "step_4" not in names
    assert any(n.startswith("step_4.tmp-") for n in names)  # the interrupted save, unpublished
    assert (ckpt / "latest").read_text() == "step_2"
    assert mf.find_latest_complete(ckpt) == ckpt / "step_2"
    m = mf.read_manifest(ckpt / "step_2")
    assert m["tokenizer"]["files"] == ["spm.model", "vocab.txt"]


@pytest.fixture(scope="module")
def resumed(crashed, tmp_path_factory):
    """Resume A from its newest complete checkpoint (and save again with keep_last=1); then, in the same
    process, load a copy of A's checkpoint whose optimizer file carries a malicious pickle."""
    a, b = crashed
    evil = tmp_path_factory.mktemp("evil")
    shutil.copytree(a / "ckpt" / "step_2", evil / "ckpt" / "step_2")
    marker = evil / "pwned"
    _plant(evil / "ckpt" / "step_2", "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    res = popen_single(["resume", str(a), json.dumps({"steps": STEPS, "save_at": [STEPS], "keep_last": 1,
                                                       "tokenizer": str(a / "tok"),
                                                       "then_load": str(evil / "ckpt")})], a)
    [(rc, err)] = _wait([res])
    assert rc == 0, err[-3000:]
    return a, b, evil, marker, (a / "then_load.txt").read_text()


def test_resume_repeats_uninterrupted_losses_exactly(resumed):
    a, b, *_ = resumed
    assert (a / "resumed_from").read_text() == "step_2"
    full = json.loads((b / "train_losses.json").read_text())
    first = json.loads((a / "train_losses.json").read_text())
    again = json.loads((a / "resume_losses.json").read_text())
    assert len(full) == STEPS and len(again) == STEPS - 2
    assert first[:2] == full[:2]
    assert again == full[2:]  # bit-identical: every stream and state was restored


def test_next_save_cleans_up_and_keeps_last(resumed):
    a, *_ = resumed
    names = sorted(p.name for p in (a / "ckpt").iterdir() if p.is_dir())
    assert names == [f"step_{STEPS}"]  # the stale .tmp- folder and step_2 (keep_last=1) are gone
    assert (a / "ckpt" / "latest").read_text() == f"step_{STEPS}"


def test_tokenizer_travels_into_conversion(resumed, tmp_path):
    a, *_ = resumed
    out = tmp_path / "hf"
    assert cli.main(["convert", str(a / "ckpt"), "--out", str(out), "--weights", "ema"]) == 0
    assert (out / "tokenizer" / "spm.model").read_bytes() == (a / "tok" / "spm.model").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer"]["sha256"] == mf.read_manifest(a / "ckpt" / f"step_{STEPS}")["tokenizer"]["sha256"]


def test_malicious_optimizer_file_is_refused_by_deepspeed_load(resumed):
    *_, marker, outcome = resumed
    assert outcome.startswith("UnsafeCheckpoint: ") and "refused to load" in outcome, outcome
    assert "Unsupported global" in outcome
    assert not marker.exists()  # the payload never ran


def test_payload_is_live_and_refused_by_every_loader(resumed, tmp_path):
    *_, evil, marker, _ = resumed
    bad = evil / "ckpt" / "step_2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with pytest.raises(safe_load.UnsafeCheckpoint, match="refused to load.*Unsupported global.*open"):
        safe_load.load(bad)
    # under the guard even an explicit weights_only=False (what DeepSpeed passes) is refused
    with safe_load.weights_only_loading(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(bad, weights_only=False)
    assert not marker.exists()
    assert os.environ.get(safe_load.FORCE_ENV) is None  # the guard cleans up after itself
    # control: an ordinary unpickling does run it, so the refusals above are meaningful
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_convert_refuses_malicious_checkpoint(resumed, tmp_path, capsys):
    *_, evil, marker, _ = resumed
    folder = evil / "ckpt" / "step_2"
    _plant(folder, "extra/rank_00000.pt", tmp_path / "m2")  # not read by convert: still converts
    if marker.exists():
        marker.unlink()
    assert cli.main(["convert", str(folder), "--out", str(tmp_path / "out"), "--weights", "raw"]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resume_past_the_requested_steps_says_so_and_trains_nothing(tiny_trained, tmp_path):
    """--resume auto train.steps=5 over a step-10 checkpoint: a warning naming both numbers, no step
    trained, nothing rewritten but the resolved recipe, exit 0 (docs/cli.md, --resume). In a
    process of its own: a training in pytest's process would leave gloo's and torch's threads in
    it, and later tests fork from it."""
    import subprocess
    import sys

    from harness.tiny_run import TINY

    run = tmp_path / "run"
    shutil.copytree(tiny_trained[0], run)
    before = (run / "metrics.jsonl").read_text()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "prime_scale.cli", "train", "tiny-cpu", *TINY, "train.steps=5",
                           f"run.dir={run}", "--resume", "auto", "--samples", "0"],
                          env=dict(env, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("warning: --resume: the checkpoint step_10 is at step 10, past the requested train.steps=5: "
            "nothing is trained") in out, out
    assert "step 6/" not in out and "done: 10 steps" in out
    assert (run / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ckpts
