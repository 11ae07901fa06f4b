"""Checkpoints inside the training loop: periodic saves and `--resume`.

- Saves every `checkpoint.every` steps (0: only at the end) and at the end, into `checkpoint.dir`
  (default `<run.dir>/checkpoints`), keeping the newest `checkpoint.keep_last`.
- `--resume auto` continues from the newest intact checkpoint in that directory (or starts fresh
  when it holds none at all); `--resume PATH` continues from a given checkpoint and fails if it is
  absent or damaged. Intact = complete (every file at its recorded size) and every file's content
  hash as recorded; the ranks verify a share of the files each. A damaged newest checkpoint is named
  in a warning and the next older intact one is used (retention then never deletes the damaged one);
  when checkpoints exist but none is intact the run is refused: it never starts over silently.
- Starting a new run (no --resume) where complete checkpoints already exist is refused: its saves
  would interleave with the old run's and a later resume could pick the wrong one.
- A checkpoint of another model, seed or tokenizer is refused before anything is loaded, naming
  what differs and what to do. One of another layout (TP, PP, DP, ZeRO stage, precision) is
  resharded into this run's (export/elastic.py), or refused before any process starts if it cannot be.

The trainer stays unaware of checkpoint files: this module plugs into Trainer's hooks and saves what Trainer
exposes (TrainState, the data loader's state_dict, the engine's EMA).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from prime_scale import fsio
from prime_scale.checkpoint import catalog as mf
from prime_scale.checkpoint.layout import Coords, engine_layout, planned_layout, same_layout
from prime_scale.data.tokenizer import tokenizer_identity
from prime_scale.errors import UserError
from prime_scale.model.naming import name_map, unpadded_sizes

# recipe sections that must match for a checkpoint to continue a run exactly
MUST_MATCH = ("model", "seed")


def checkpoint_dir(cfg) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.dir) / "checkpoints"


def check_resume(cfg, resume: Optional[str], dp: int) -> None:
    """Before anything starts: a new run must not write into a checkpoint directory of an earlier
    run; a named checkpoint must exist and be complete; one of another layout must be reshardable
    into this run's (dp data-parallel ranks)."""
    directory = checkpoint_dir(cfg)
    published = mf.list_step_dirs(directory)
    if resume is None:
        if published:
            raise UserError(f"{directory} holds checkpoints of an earlier run (newest: {published[-1][1].name}); "
                            f"continue it with --resume auto, or give this run another run.dir or checkpoint.dir")
    elif resume == "auto":
        if published and not any(mf.is_complete(p) for _, p in published):
            raise no_intact_checkpoint(directory, {p.name: mf.damage(p) for _, p in published})
        newest = mf.find_latest_complete(directory)
        if newest is not None:
            _check_reshardable(cfg, newest, dp)
    else:
        # contents are verified by every rank at start
        _check_reshardable(cfg, mf.resolve_checkpoint(Path(resume), verify=False), dp)


def _check_reshardable(cfg, folder: Path, dp: int) -> None:
    """A checkpoint of another layout must be one that can be resharded into this run's: refused
    here, before any process starts (the ranks check again on the one they pick)."""
    from prime_scale.export import elastic

    saved, now = mf.read_manifest(folder)["layout"], planned_layout(cfg, dp)
    if not same_layout(saved, now):
        elastic.resume_plan(saved, now, cfg.model.dropout, folder)


def no_intact_checkpoint(directory: Path, damaged: dict) -> UserError:
    detail = "; ".join(f"{name}: {problems[0]}" for name, problems in damaged.items())
    return UserError(f"--resume auto: {directory} holds checkpoints but none is intact ({detail}). Nothing was "
                     "started and nothing was deleted: restore a checkpoint from a copy, or start a new run in "
                     "another run.dir (or checkpoint.dir)")


def _collective_damage(folder: Path, par) -> list[str]:
    """What is wrong with a checkpoint folder, decided together: sizes on every rank (cheap), then
    each rank re-hashes every world_size-th file and the findings are gathered on all ranks."""
    import torch.distributed as dist

    mine = mf.damage(folder, (par.rank, par.world_size))  # an incomplete folder too: every rank gathers
    everyone = [None] * par.world_size
    dist.all_gather_object(everyone, mine)
    return list(dict.fromkeys(p for part in everyone for p in part))


def _weights_finite(module, par) -> bool:
    """Every rank's parameters (ZeRO-3: its partitions) are finite; decided together."""
    import torch
    import torch.distributed as dist

    ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()) for p in module.parameters())
    if par.world_size > 1:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=par.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def install(trainer, resume: Optional[str]) -> "TrainingCheckpoints":
    hooks = TrainingCheckpoints(trainer, resume)
    trainer.before_loop_hooks.insert(0, hooks.before_loop)
    trainer.after_step_hooks.append(hooks.after_step)
    return hooks


def _tokenizer_dir(trainer) -> Optional[Path]:
    spec = trainer.train_loader.tokenizer
    if spec.get("kind") != "sentencepiece" or not spec.get("dir"):
        return None
    return Path(trainer.train_loader.dataset_dirs[0]) / spec["dir"]


def _differences(saved: dict, current: dict) -> list[str]:
    out = []
    for key in MUST_MATCH:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of steps after `step` (written before a crash; the resumed run redoes them),
    so that metrics.jsonl holds every step once. Returns how many were dropped."""
    import json

    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        fsio.write_atomic(path, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


class TrainingCheckpoints:
    def __init__(self, trainer, resume: Optional[str]):
        self.trainer = trainer
        self.resume = resume
        self.dir = checkpoint_dir(trainer.cfg)
        self.resumed_from: Optional[Path] = None
        self.last_saved: Optional[int] = None
        self.last_save_s: Optional[float] = None  # the last save's wall time on this rank (all ranks' writes)
        self.damaged: set = set()  # checkpoints found damaged at resume: retention keeps them

    # ---- what goes into a checkpoint

    def _ema(self) -> Optional[dict]:
        ema = self.trainer.engine.ema
        if ema is None:
            return None
        names = [n for n, _ in self.trainer.engine.module.named_parameters()]
        return dict(zip(names, ema.shadow))

    def save(self) -> Path:
        from prime_scale.checkpoint import store

        t = self.trainer
        module = t.engine.module
        if not _weights_finite(module, t.par):
            raise UserError(f"step {t.state.step}: the weights hold NaN or infinite values, so this state is not "
                            f"saved (the newest checkpoint in {self.dir} stays the last good one); lower optim.lr "
                            "and continue from it with --resume auto")
        started = time.monotonic()
        path = store.save(
            t.engine.ds, self.dir, t.state.step,
            extra_state={"train": t.state.state_dict(), "loader": t.train_loader.state_dict()},
            ema=self._ema(),
            meta={"recipe": t.cfg.to_dict(), "vocab_size": t.vocab_size, "tokenizer": _tokenizer_dir(t),
                  "tokenizer_spec": t.train_loader.tokenizer, "tokens_seen": t.state.tokens_seen},
            keep_last=t.cfg.checkpoint.keep_last, name_map=name_map(module),
            unpadded=unpadded_sizes(module, t.vocab_size), where=Coords.of(t.par), protect=tuple(self.damaged))
        self.last_saved, self.last_save_s = t.state.step, time.monotonic() - started
        if t.par.is_logging_rank:
            print(f"  checkpoint @ step {t.state.step}: {path} ({self.last_save_s:.1f} s)", flush=True)
        return path

    def after_step(self, trainer) -> None:
        every, step = trainer.cfg.checkpoint.every, trainer.state.step
        if (every and step % every == 0) or step == trainer.cfg.train.steps or trainer.stop_reason:
            self.save()

    # ---- resume

    def _find(self) -> Optional[Path]:
        """The checkpoint to continue from (collective: every rank verifies a share of each
        candidate's files, and all take the same decision)."""
        if self.resume is None:
            return None
        if self.resume != "auto":
            folder = mf.resolve_checkpoint(Path(self.resume), verify=False)
            problems = _collective_damage(folder, self.trainer.par)
            if problems:
                raise mf.damaged_checkpoint_error(folder, problems)
            return folder
        damaged = {}
        for _, folder in reversed(mf.list_step_dirs(self.dir)):
            problems = _collective_damage(folder, self.trainer.par)
            if not problems:
                if damaged and self.trainer.par.is_logging_rank:
                    print(f"warning: --resume auto: skipping damaged checkpoint(s) "
                          f"{'; '.join(f'{n} ({p[0]})' for n, p in damaged.items())}; they are kept as they are. "
                          f"Continuing from {folder.name}", flush=True)
                self.damaged = set(damaged)
                return folder
            damaged[folder.name] = problems
        if damaged:
            raise no_intact_checkpoint(self.dir, damaged)
        return None

    def before_loop(self, trainer) -> None:
        if trainer.par.rank == 0 and self.dir.is_dir():
            mf.remove_stale(self.dir)  # partial saves a crash or a full disk left behind
        folder = self._find()
        if folder is None:
            if self.resume == "auto" and trainer.par.is_logging_rank:
                print(f"--resume auto: no checkpoint in {self.dir}; starting from step 0", flush=True)
            return
        from prime_scale.checkpoint import store

        manifest = mf.read_manifest(folder)
        self.check_compatible(folder, manifest)
        where = Coords.of(trainer.par)
        saved, now = manifest["layout"], engine_layout(trainer.engine.ds, where)
        if same_layout(saved, now):
            restored = store.load(trainer.engine.ds, folder.parent, folder.name, where=where)
            extra = restored.extra
            self._restore_ema(folder, restored.ema)
        else:  # another layout: every tensor is cut anew for this rank, RNG streams start fresh
            from prime_scale.export import elastic

            plan = elastic.resume_plan(saved, now, trainer.cfg.model.dropout, folder)
            if trainer.par.is_logging_rank:
                print("\n".join(plan), flush=True)
            result = {}

            def reshard():
                result["extra"] = elastic.load_resharded(trainer.engine, folder, manifest, trainer.vocab_size)

            store.on_every_rank(f"{folder}: resharding into this layout", reshard)
            extra = result["extra"]
            elastic.seed_streams(trainer.cfg.seed, int(extra["train"]["step"]), trainer.par)
        trainer.state.load_state_dict(extra["train"])
        trainer.train_loader.load_state_dict(extra["loader"])
        self.resumed_from = folder
        if trainer.par.is_logging_rank:
            dropped = truncate_metrics(Path(trainer.cfg.run.dir) / "metrics.jsonl", trainer.state.step)
            print(f"resumed from {folder} (step {trainer.state.step}, {trainer.state.tokens_seen:,} tokens seen"
                  f"{f'; {dropped} metrics records after it dropped' if dropped else ''})", flush=True)
            self._warn_if_past_the_requested_steps(folder)

    def _warn_if_past_the_requested_steps(self, folder: Path) -> None:
        """A checkpoint beyond train.steps is not cut back: nothing is trained and the run stays at
        its step (exit 0, as for resuming a finished run; docs/cli.md). Said, naming both numbers."""
        step, steps = self.trainer.state.step, self.trainer.cfg.train.steps
        if step <= steps:
            return
        earlier = [f for s, f in mf.list_step_dirs(folder.parent) if s <= steps]
        print(f"warning: --resume: the checkpoint {folder.name} is at step {step}, past the requested "
              f"train.steps={steps}: nothing is trained and the run stays at step {step}. To train on, set "
              f"train.steps above {step}" + (f"; to continue from an earlier state, --resume "
                                              f"{earlier[-1]}" if earlier else ""), flush=True)

    def _restore_ema(self, folder: Path, saved: Optional[dict]) -> None:
        engine = self.trainer.engine
        if engine.ema is None:
            return
        names = [n for n, _ in engine.module.named_parameters()]
        engine.ema.load_state_dict({"shadow": [saved[n] for n in names]})

    def check_compatible(self, folder: Path, manifest: dict) -> None:
        """Refuse, before loading anything, a checkpoint this run cannot continue: another model,
        seed or tokenizer, or a layout change that cannot be resharded (export/elastic.py)."""
        from prime_scale.export import elastic

        t = self.trainer
        saved = manifest.get("recipe") or {}
        diff = _differences(saved, t.cfg.to_dict())
        if diff:
            raise UserError(f"{folder} was written by a different run: " + "; ".join(diff) +
                            ". Resume with the checkpoint's recipe (its recipe is in the manifest), or start "
                            "a new run from its weights after `prime-scale convert`")
        tok = manifest.get("tokenizer")
        tok_dir = _tokenizer_dir(t)
        if tok and tok_dir is not None and tokenizer_identity(tok_dir)["sha256"] != tok["sha256"]:
            raise UserError(f"{folder}: the data's tokenizer ({tok_dir}) is not the one the checkpoint was "
                            "trained with; resume with the original data")
        if t.engine.ema is not None and not manifest.get("ema"):
            raise UserError(f"{folder}: the run keeps an EMA (optim.ema={t.cfg.optim.ema}) but the checkpoint "
                            "holds none; resume with optim.ema=0 or start a new run")
        now = engine_layout(t.engine.ds, Coords.of(t.par))
        if not same_layout(manifest["layout"], now):
            elastic.resume_plan(manifest["layout"], now, t.cfg.model.dropout, folder)  # raises if unsupported
