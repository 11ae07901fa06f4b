"""`prime-scale train [RECIPE] [key=value ...] [--nproc N] [--resume auto|PATH]`: train a Prime model.

One process (CPU or one GPU) by default. Several processes come from a standard launcher, which
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (docs/training.md):
    torchrun --nproc-per-node N -m prime_scale.cli.train RECIPE ...
    deepspeed --num_gpus N --module prime_scale.cli.train RECIPE ...   (on CPU: set OMP_NUM_THREADS)
`--nproc N` starts N local processes for you. Checks that need no process group (the recipe, the
layout, the launcher's environment, the checkpoint directory) run first, before anything is built.
A run directory takes one training at a time (prime_scale/run_lock.py); the ranks of `--nproc`
die with their launcher (prime_scale/parallel/launch.py, die_with_launcher).
"""

from __future__ import annotations

import argparse
import os
import sys

from prime_scale.cli.common import add_recipe_arguments, recipe_and_overrides

END_SAMPLES = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="start N local processes (CPU: OMP_NUM_THREADS = cores / N); default: this "
                             "process only, or the ranks a launcher started")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: 'auto' = from the newest complete checkpoint in the run's "
                             "checkpoint directory (or from scratch if there is none); PATH = from that "
                             "checkpoint (same layout; docs/checkpoints.md). Default: a new run")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="start a new run from the weights of a consolidated checkpoint (prime-scale "
                             "convert), in any layout; the optimizer starts fresh. Default: random weights")
    parser.add_argument("--samples", type=int, default=END_SAMPLES, metavar="N",
                        help="decode N samples from the final checkpoint at the end (0: none; one-process "
                             "runs and --nproc only: under an external launcher use prime-scale sample)")
    # the deepspeed launcher passes --local_rank; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    from prime_scale.parallel import preemption
    from prime_scale.parallel.launch import LAUNCHER_ENV, check_nproc, die_with_launcher, read_launch_env

    # what a stop signal to our launcher gives this rank, read before die_with_launcher takes its variable
    grace = preemption.stop_grace(os.environ, preemption.parent_argv(), own_launcher=LAUNCHER_ENV in os.environ)
    die_with_launcher()  # a rank of our --nproc launcher: before anything else, so none outlives it
    from prime_scale import run_lock
    from prime_scale.config import load_recipe, resolve_dp

    recipe, overrides = recipe_and_overrides(args)
    cfg = load_recipe(recipe, overrides)  # a bad recipe fails here, before any process starts
    if args.nproc is not None:
        check_nproc(args.nproc)
        dp = resolve_dp(cfg, args.nproc)  # a layout that cannot work fails here, not in N tracebacks
        lock_here = True  # the launcher holds the lock; its ranks inherit it
    else:
        launch = read_launch_env()  # bad launcher input: a clear error
        dp = resolve_dp(cfg, launch.world_size)
        lock_here = launch.rank == 0  # under torchrun / deepspeed: global rank 0 only
    from prime_scale.parallel.fd_limit import ensure_open_file_limit

    world = args.nproc if args.nproc is not None else launch.world_size
    import torch  # the backend decides the sockets: gloo on the CPU (a full mesh per group), NCCL on GPUs

    note = ensure_open_file_limit(world, cfg.data.num_workers, gloo=not torch.cuda.is_available())
    if note and lock_here:
        print(note, flush=True)
    # one training per run directory, locked before --resume reads it or anything is written there
    with run_lock.hold(run_lock.lock_dirs(cfg), take=lock_here) as locks:
        from prime_scale.train import preflight  # torch: imported once the directory is ours

        preflight(cfg, args.resume, args.init_from, dp)  # checkpoint mix-ups fail here too
        _ensure_demo_corpus(cfg)
        if args.nproc is not None:
            from prime_scale.parallel.launch import launch_local

            rc = launch_local(args.nproc, "prime_scale.cli.train", _rank_argv(args, recipe, overrides),
                              environ={**os.environ, **locks.child_env()}, pass_fds=locks.fds)
            return rc or show_samples(cfg, args.samples)
        from prime_scale import checkpointing as hooks
        from prime_scale.train import Trainer

        trainer = Trainer(cfg, init_from=args.init_from)
        checkpoints = hooks.install(trainer, args.resume)
        before_loop, after_step = _warn_if_a_preemption_cannot_save(grace, checkpoints)
        trainer.before_loop_hooks.append(before_loop)
        trainer.after_step_hooks.append(after_step)
        rc = trainer.run()
        return rc or (show_samples(cfg, args.samples) if read_launch_env().world_size == 1 else 0)


def _warn_if_a_preemption_cannot_save(grace, checkpoints):
    """Hooks: rank 0 says, with the fix, when the launcher would kill the ranks before a
    preemption's checkpoint is written (a signal it does not forward, a grace shorter than a save):
    before the loop from an estimate, after the run's first save from that save's own time."""
    from prime_scale.parallel.preemption import estimated_save_s, preemption_warnings

    slurm = "SLURM_JOB_ID" in os.environ
    checked = []

    def before_loop(trainer) -> None:
        if trainer.par.is_logging_rank:
            save_s = estimated_save_s(checkpoint_bytes_per_rank(trainer.engine))
            for line in preemption_warnings(grace, save_s, slurm=slurm):
                print(f"warning: {line}", flush=True)

    def after_step(trainer) -> None:
        if checked or checkpoints.last_saved != trainer.state.step:
            return
        checked.append(True)
        if trainer.par.is_logging_rank:
            for line in preemption_warnings(grace, checkpoints.last_save_s, slurm=False, measured=True):
                print(f"warning: {line}", flush=True)
    return before_loop, after_step


def checkpoint_bytes_per_rank(engine) -> int:
    """About what this rank writes in a save: its module weights, the fp32 master and two Adam
    moments (split over the DP ranks from ZeRO 1 on) and its share of the fp32 EMA (every DP rank
    writes part of it). Under ZeRO 3 a rank holds, and writes, its partition of each parameter."""
    params = list(engine.module.parameters())
    local = [p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params]
    numel = sum(local)
    weights = sum(n * p.element_size() for n, p in zip(local, params))
    split = engine.state.dp if 1 <= engine.zero_stage < 3 else 1  # ZeRO 3: the partitions are local already
    optimizer = 12 * numel // split
    ema = 4 * numel // (engine.state.dp if engine.zero_stage < 3 else 1) if engine.ema is not None else 0
    return weights + optimizer + ema


def _rank_argv(args, recipe, overrides) -> list[str]:
    """What each rank runs: the same recipe and overrides, without --nproc (and no end samples:
    the launcher's process decodes them once the ranks are done)."""
    from prime_scale.config import resolve_recipe_path

    out = ([str(resolve_recipe_path(recipe))] if recipe else []) + list(overrides)
    if args.resume:
        out += ["--resume", args.resume]
    if args.init_from:
        out += ["--init-from", args.init_from]
    return out + ["--samples", "0"]


def _ensure_demo_corpus(cfg) -> None:
    """A recipe without data.path or data.mixture reads the demo corpus: build it if absent (once
    per machine: concurrent ranks wait on its lock)."""
    if cfg.data.path is None and not cfg.data.mixture:
        from data_prep.demo import ensure_demo_corpus

        ensure_demo_corpus(seq_len=cfg.model.seq_len)


def show_samples(cfg, n: int) -> int:
    """The main job ends with words: decode a few samples from the final checkpoint (one process,
    after the training's process groups are gone)."""
    if n < 1:
        return 0
    from prime_scale.checkpointing import checkpoint_dir
    from prime_scale.inference import generate, load_model

    with load_model(checkpoint_dir(cfg)) as loaded:
        if loaded.tokenizer_dir is None:
            print("samples: the data's tokenizer is external (ids only); nothing to decode", flush=True)
            return 0
        texts, r = generate(loaded, steps=min(128, cfg.model.seq_len), num=n, seed=cfg.seed)
        share = samples_word_share(loaded, texts)
    for i, text in enumerate(texts):
        print(f"--- sample {i} ({loaded.weights} weights) ---\n{text.strip()}", flush=True)
    print(f"--- {r.steps} sampling steps, {r.nfe} network calls (idle-step ratio {r.isr:.1%})", flush=True)
    if share is not None:
        print(f"--- words: {share.describe()}", flush=True)
    return 0


def samples_word_share(loaded, texts):
    """How many of the samples' words the training text has (prime_scale.sample_words); None when
    the data is remote (never fetched for this) or its tokenizer cannot decode."""
    from prime_scale.data import load_tokenizer
    from prime_scale.data.loader import load_manifests
    from prime_scale.inference import remote_data
    from prime_scale.sample_words import training_words, word_share

    cfg = loaded.cfg
    if remote_data(cfg):
        return None
    words = training_words(load_manifests(cfg, "train"), load_tokenizer(loaded.tokenizer_dir))
    return word_share(texts, words) if words is not None else None


if __name__ == "__main__":  # torchrun / deepspeed launcher entry point: one rank
    from prime_scale.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
