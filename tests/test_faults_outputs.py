"""A full disk while a run's own outputs are written (issue 24, item 18): the plot, the metrics, the
resolved recipe, eval's JSON. Each is a named error (exit 2, no traceback), the file is not left
half-written, and what was saved before (every step's record, every checkpoint) is intact.

The disk is made full at the file boundary: every write to the chosen file fails with ENOSPC, as
the kernel reports it (a tmpfs small enough to fill at the plot but not before is not portable)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest

TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.seq_len=32", "optim.warmup_steps=1",
        "optim.ema=0", "train.global_batch=8", "train.micro_batch=8", "train.log_every=1", "eval.every=0",
        "eval.batches=1", "eval.final_batches=null", "logging.wandb=disabled"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class _NoSpaceLeft(io.RawIOBase):
    """A file on a full disk: opening works, every write fails as the kernel's ENOSPC."""

    def __init__(self, real):
        self.real = real

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.real.name)

    def fileno(self):
        return self.real.fileno()

    def close(self):
        self.real.close()
        super().close()


@pytest.fixture()
def full_disk_for(monkeypatch):
    """full_disk_for(predicate): from now on, files whose path satisfies it cannot be written."""
    real_open = builtins.open
    chosen = []

    def open_maybe_full(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wa+") and isinstance(file, (str, os.PathLike)) and chosen[0](Path(file)):
            return _NoSpaceLeft(f)
        return f

    def arm(predicate):
        chosen.append(predicate)
        monkeypatch.setattr(builtins, "open", open_maybe_full)
        monkeypatch.setattr(io, "open", open_maybe_full)  # pathlib's write_text opens through io.open

    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return arm


def _cli(capsys, *argv):
    from prime_scale import cli

    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_full_disk_at_the_plot_is_named_and_the_run_is_intact(tmp_path, capsys, full_disk_for, monkeypatch):
    run = tmp_path / "run"
    real_open = builtins.open
    full_disk_for(lambda p: p.suffix == ".png")  # the last output a run writes
    code, out, err = _cli(capsys, "train", "tiny-cpu", *TINY, "train.steps=2", "checkpoint.every=2",
                          f"run.dir={run}")
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "no space left on the device" in err and "loss.png" in err, err
    assert "done: 2 steps" in out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not list(run.glob(".loss*")) and not (run / "loss.png").exists()  # no temp, no half a file
    assert "Nothing before it was lost: metrics.jsonl and every checkpoint were saved" in err
    assert _cli(capsys, "checkpoint", "verify", str(run))[0] == 0  # the step-2 checkpoint is whole
    monkeypatch.setattr(builtins, "open", real_open)  # space freed: what the message promises
    monkeypatch.setattr(io, "open", real_open)
    code, out, err = _cli(capsys, "train", "tiny-cpu", *TINY, "train.steps=2", "checkpoint.every=2",
                          f"run.dir={run}", "--resume", "auto")
    assert code == 0, err[-3000:]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("how", ["write_atomic", "publish_file", "publish_dir"])
def test_every_publishing_path_names_a_full_disk_and_keeps_the_old_file(tmp_path, full_disk_for, how):
    """eval --json, the resolved recipe, metrics truncation (write_atomic); plots (publish_file);
    exports (publish_dir): the old content stays, no temporary is left behind."""
    from prime_scale import fsio

    target = tmp_path / ("out" if how == "publish_dir" else "result.json")
    if how == "publish_dir":
        target.mkdir()
        (target / "old.txt").write_text("old")
    else:
        target.write_text("old")
    full_disk_for(lambda p: p.parent == tmp_path or p.parent.parent == tmp_path)
    with pytest.raises(fsio.DiskFullError) as info:
        if how == "write_atomic":
            fsio.write_atomic(target, "new")
        elif how == "publish_file":
            fsio.publish_file(target, lambda tmp: tmp.write_text("new"))
        else:
            fsio.publish_dir(target, lambda tmp: (tmp / "new.txt").write_text("new"), overwrite=True)
    assert str(target) in str(info.value) and "MiB free" in str(info.value)
    assert info.value.free and info.value.path == target
    if how == "publish_dir":
        assert [p.name for p in target.iterdir()] == ["old.txt"]
    else:
        assert Path(target).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left behind
