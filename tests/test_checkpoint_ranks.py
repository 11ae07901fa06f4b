"""What each rank does in a save, with a real DeepSpeed engine on 2 gloo processes (ZeRO 1, DP 2, EMA):

- every rank hashes the files it wrote itself (never another rank's), also when a step is saved
  again over an existing checkpoint of that step; the EMA is written by both data-parallel ranks;
  rank 0 logs the bytes and seconds of the save per rank, matching the files on disk;
- a write that fails on one rank inside DeepSpeed's own save_checkpoint (an I/O error halfway through
  a file, injected at torch.save) ends the save with an error on every rank within seconds: no
  mismatched collective (the ranks' next all-reduce still adds up), no partial save left, and the
  previous checkpoint intact and loadable with its EMA."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from harness.dist import launch

HARNESS = Path(__file__).resolve().parent / "harness"
LOG_RE = re.compile(r"rank (\d+) wrote ([\d.]+) MiB in ([\d.]+) s")


def _inject_write_failure(name_part: str, armed: dict):
    """torch.save fails halfway through the file whose name contains name_part while armed:
    the storage failing under DeepSpeed, not a changed DeepSpeed."""
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if armed.get("on") and isinstance(f, (str, Path)) and name_part in str(f):
            armed["on"] = False
            real_save(obj, f, *args, **kwargs)
            size = Path(f).stat().st_size
            with open(f, "r+b") as fh:
                fh.truncate(size // 2)
            # what torch.save raises when the storage fails under it: never an OSError
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                               "writing file data/0: file write failed (injected)")
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _hashed_paths(log: list):
    """Record (not replace) the files this rank hashes."""
    from prime_scale.checkpoint import catalog

    real = catalog.file_digest

    def digest(path):
        log.append(str(path))
        return real(path)

    catalog.file_digest = digest


def _within(paths: list, ckpt: Path, folder: str) -> list:
    """The paths under ckpt/<folder> (a prefix of the folder's name when it ends in '-'), relative to it."""
    out = []
    for p in map(Path, paths):
        top = p.relative_to(ckpt).parts[0]
        if top == folder or (folder.endswith("-") and top.startswith(folder)):
            out.append(str(p.relative_to(ckpt / top)))
    return sorted(out)


def _save_failing(run, ckpt: Path) -> dict:
    import torch
    import torch.distributed as dist

    start = time.monotonic()
    try:
        run.save(ckpt)
        outcome = "saved"
    except Exception as e:  # what every rank must see
        outcome = f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - start
    check = torch.tensor([dist.get_rank() + 1], dtype=torch.int64)
    dist.all_reduce(check)  # still paired with the other rank's all-reduce
    return {"outcome": outcome, "seconds": elapsed, "check": int(check.item()),
            "leftovers": sorted(p.name for p in ckpt.iterdir() if ".tmp-" in p.name)}


def save_worker(work: str) -> dict:
    import contextlib
    import io

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HARNESS))
    from checkpoint_run import Run
    from checkpoint_worker import _setup_process

    from prime_scale.checkpoint import catalog as mf

    _setup_process()
    rank = dist.get_rank()
    ckpt = Path(work) / "ckpt"
    run = Run({"tp": 1, "pp": 1, "zero": 1, "dropout": 0.1, "micro_batch": 2, "global_batch": 4, "ema": True})
    armed = {}
    if rank == 1:
        _inject_write_failure("zero_pp_rank_1_mp_rank_00_optim_states.pt", armed)
    else:
        _inject_write_failure("mp_rank_00_model_states.pt", armed)
    hashed: list = []
    _hashed_paths(hashed)
    out = {"rank": rank}

    run.train_step()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run.save(ckpt)
    out["log"] = log.getvalue()
    out["hashed_at_save"] = _within(hashed, ckpt, "step_1.tmp-")
    saved_ema = {k: v.clone() for k, v in run.ema.items()}
    dist.barrier()

    hashed.clear()
    run.save(ckpt)  # the same step again: the existing step_1 is checked before it is replaced
    out["hashed_at_resave"] = _within(hashed, ckpt, "step_1")  # of the existing checkpoint

    run.train_step()
    armed["on"] = rank == 1  # rank 1 fails writing its optimizer partition
    out["rank1_fails"] = _save_failing(run, ckpt)
    armed["on"] = rank == 0  # rank 0 fails writing the model states (rank 1 is writing its partition)
    out["rank0_fails"] = _save_failing(run, ckpt)

    latest = mf.find_latest_complete(ckpt)
    out["latest"] = latest.name
    out["damage"] = mf.damage(latest)
    restored = run.load(ckpt)
    out["restored_step"] = restored.step
    out["ema_equal"] = all(torch.equal(restored.ema[k], v) for k, v in saved_ema.items()) and \
        set(restored.ema) == set(saved_ema)
    run.close()
    return out


def _files_of(ckpt: Path, rank: int) -> set:
    """The files rank `rank` writes (ZeRO 1, DP 2, TP 1): DeepSpeed's model states on data-parallel
    rank 0, its optimizer partition, its extra state; its part of the EMA."""
    own = {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"extra/rank_{rank:05d}.pt"}
    if rank == 0:
        own.add("mp_rank_00_model_states.pt")
    own |= {str(p.relative_to(ckpt)) for p in (ckpt / "ema").glob(f"*dp{rank:03d}*")}
    return own


def test_ranks_hash_what_they_wrote_log_it_and_agree_on_a_failed_write(tmp_path):
    r0, r1 = launch(2, "test_checkpoint_ranks:save_worker", {"work": str(tmp_path)}, timeout=150,
                    extra_env={"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    ckpt = tmp_path / "ckpt" / "step_1"
    written = {r: _files_of(ckpt, r) for r in (0, 1)}
    # both data-parallel ranks wrote a part of the EMA
    assert all(any(p.startswith("ema/") for p in written[r]) for r in (0, 1)), written
    for mine, other in ((r0, 1), (r1, 0)):
        r = mine["rank"]
        for when in ("hashed_at_save", "hashed_at_resave"):
            assert written[r] <= set(mine[when]), (r, when, mine[when])
            assert not set(mine[when]) & written[other], (r, when, mine[when])

    figures = {int(r): (float(mib), float(s)) for r, mib, s in LOG_RE.findall(r0["log"])}
    assert set(figures) == {0, 1}, r0["log"]  # the most and the least of the two ranks
    for r in (0, 1):
        on_disk = sum((ckpt / p).stat().st_size for p in written[r])
        assert abs(figures[r][0] - on_disk / 2 ** 20) < 0.006, (r, figures, on_disk)

    for case, failing in (("rank1_fails", 1), ("rank0_fails", 0)):
        for res in (r0, r1):
            got = res[case]
            assert got["outcome"] != "saved" and got["seconds"] < 30, (case, res["rank"], got)
            assert got["check"] == 3 and not got["leftovers"], (case, res["rank"], got)
            if res["rank"] == failing:
                assert got["outcome"].startswith("UserError") and "file write failed" in got["outcome"], got
                assert f"rank {failing} could not write" in got["outcome"], got
            else:
                assert f"failed on rank {failing}" in got["outcome"], got
            assert "step_1 is intact" in got["outcome"], got
    for res in (r0, r1):
        assert res["latest"] == "step_1" and res["damage"] == [] and res["restored_step"] == 1 and res["ema_equal"]
