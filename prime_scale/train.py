"""`prime-scale train [RECIPE] [key=value ...] [--nproc N]`: train a Prime model from a recipe.

One process (CPU or one GPU) by default. Several processes come from a standard launcher, which
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (docs/training.md):
    torchrun --nproc-per-node N -m prime_scale.train RECIPE ...
    deepspeed --num_gpus N --module prime_scale.train RECIPE ...       (on CPU: set OMP_NUM_THREADS)
`--nproc N` starts torchrun locally for you.

A run directory (run.dir) receives the resolved recipe (recipe.yaml), metrics.jsonl (one JSON object
per logged step: step, loss, lr, grad_norm, tokens_per_s, step_time_s, and on validation steps
val_nll_bound and val_ppl), wandb's files (offline by default) and loss.png at the end.
Validation numbers are the sub-token ELBO (the valid NLL bound) per original token; the perplexity
is exp(Σ nll / Σ tokens). The training loss is the recipe's objective (model.objective).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from prime_scale.config import Config, load_recipe, resolve_recipe_path
from prime_scale.errors import UserError

EVAL_OBJECTIVE = "prime_elbo"


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", default=None,
                        help="recipe file or name in recipes/ (default: the embedded tiny-cpu recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides with dotted keys, e.g. model.layers=4 parallel.tp=2")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="start N local processes with torchrun (CPU: OMP_NUM_THREADS = cores / N)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: 'auto' = from the newest complete checkpoint in the run's "
                             "checkpoint directory (or from scratch if there is none); PATH = from that "
                             "checkpoint (same layout; see docs/checkpoints.md)")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="start a new run from the weights of a consolidated checkpoint (prime-scale "
                             "convert), in any layout; the optimizer starts fresh")
    # the deepspeed launcher passes --local_rank; the rank is read from the environment instead
    parser.add_argument("--samples", type=int, default=2, metavar="N",
                        help="decode N samples from the final checkpoint at the end (0: none; one-process "
                             "runs and --nproc only: under an external launcher use prime-scale sample)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _split_recipe_and_overrides(args) -> tuple[Optional[str], list[str]]:
    """`prime-scale train model.layers=2` has no recipe, only overrides."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        overrides.insert(0, recipe)
        recipe = None
    return recipe, overrides


def main(args) -> int:
    recipe, overrides = _split_recipe_and_overrides(args)
    cfg = load_recipe(recipe, overrides)  # a bad recipe fails here, before any process starts
    from prime_scale.checkpoint import training as ckpt

    ckpt.preflight(cfg, args.resume, args.init_from)  # checkpoint mix-ups fail here too
    if args.nproc is not None:
        extra = (["--resume", args.resume] if args.resume else []) + \
                (["--init-from", args.init_from] if args.init_from else [])
        rc = launch_local(args.nproc, recipe, overrides, cfg, extra)
        return rc or show_samples(cfg, args.samples)
    from prime_scale.config import resolve_dp
    from prime_scale.parallel.state import read_launch_env

    # bad launcher input or a layout that cannot work: a clear error before the heavy imports
    world_size = read_launch_env().world_size
    resolve_dp(cfg, world_size)
    trainer = Trainer(cfg, init_from=args.init_from)
    ckpt.install(trainer, args.resume)
    rc = trainer.run()
    return rc or (show_samples(cfg, args.samples) if world_size == 1 else 0)


def show_samples(cfg: Config, n: int) -> int:
    """The main job ends with words: decode a few samples from the final checkpoint (one process,
    after the training's process groups are gone)."""
    if n < 1:
        return 0
    from prime_scale.checkpoint.training import checkpoint_dir
    from prime_scale.inference import load_model
    from prime_scale.sample import generate

    weights = "ema" if cfg.optim.ema > 0 else "raw"
    with load_model(checkpoint_dir(cfg), weights) as loaded:
        if loaded.tokenizer_dir is None:
            print("samples: the data's tokenizer is external (ids only); nothing to decode", flush=True)
            return 0
        texts, r = generate(loaded, steps=min(128, cfg.model.seq_len), num=n, seed=cfg.seed)
    for i, text in enumerate(texts):
        print(f"--- sample {i} ({weights} weights) ---\n{text.strip()}", flush=True)
    print(f"--- {r.steps} sampling steps, {r.nfe} network calls (idle-step ratio {r.isr:.1%})", flush=True)
    return 0


def launch_local(nproc: int, recipe: Optional[str], overrides: list[str], cfg: Config,
                 extra: Optional[list[str]] = None) -> int:
    """`--nproc N`: torchrun on this machine, each rank running `python -m prime_scale.train`."""
    import subprocess

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    from prime_scale.config import resolve_dp

    resolve_dp(cfg, nproc)  # a layout that cannot work fails here, not in N tracebacks
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "prime_scale.train"]
    cmd += ([str(resolve_recipe_path(recipe))] if recipe else []) + overrides + list(extra or [])
    return subprocess.call(cmd, env=env)


# --------------------------------------------------------------------------- run state


@dataclass
class TrainState:
    """What a checkpoint must restore besides the engine (DeepSpeed saves model, optimizer and LR
    schedule) and the data loader (its own state_dict)."""

    step: int = 0  # optimizer steps completed; also the Prime noise key of the next step
    tokens_seen: int = 0
    samples_seen: int = 0
    train_time_s: float = 0.0
    last_val: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, sd: dict) -> None:
        for key, value in sd.items():
            setattr(self, key, value)


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds everything for a recipe and runs the training loop on this rank.

    Extension points for checkpointing (next issue): `state` (TrainState), `train_loader`
    (state_dict / load_state_dict), `engine.ds` (DeepSpeed save_checkpoint / load_checkpoint),
    `engine.ema` (state_dict), and `after_step_hooks`: callables(trainer) run after every step
    on every rank (e.g. a periodic save), and `before_loop_hooks` (e.g. --resume)."""

    def __init__(self, cfg: Config, init_from: Optional[str] = None):
        self.cfg = cfg
        self.init_from = init_from  # a consolidated checkpoint whose weights start the run
        self.state = TrainState()
        self.after_step_hooks: list[Callable[["Trainer"], None]] = []
        self.before_loop_hooks: list[Callable[["Trainer"], None]] = []
        self.metrics_file = None
        self.wandb = None

    # ---- set-up

    def setup(self) -> None:
        _quiet_libraries()
        from prime_scale.parallel import state as pstate

        cfg = self.cfg
        self.par = pstate.init(cfg)
        self.run_dir = Path(cfg.run.dir)
        self._prepare_data()
        from prime_scale.data.loader import build_loader, load_manifests

        self.manifests = load_manifests(cfg, "train")  # checks vocab_size / seq_len against the recipe
        manifest = self.manifests[0]
        self.vocab_size = int(manifest["vocab_size"])
        cfg.model.vocab_size = self.vocab_size  # the resolved recipe records what the data decided
        self.train_loader = build_loader(cfg, "train", self.par.dp_rank, self.par.dp, cfg.train.micro_batch, cfg.seed)
        self.val_loader = None
        if "val" in manifest["splits"] and manifest["splits"]["val"]["sequences"] > 0:
            self.val_loader = build_loader(cfg, "val", self.par.dp_rank, self.par.dp, cfg.train.micro_batch, cfg.seed)
            self.val_start = self.val_loader.state_dict()
        from prime_scale.engine import Engine

        self.engine = Engine(cfg, self.par, self.vocab_size, init_from=self.init_from)
        from prime_scale.model import count_parameters, train_flops_per_token

        self.n_params = count_parameters(self.engine.args)["total"]
        self.flops_per_token = train_flops_per_token(self.engine.args)

    def _prepare_data(self) -> None:
        """The embedded demo corpus is built once per node (local rank 0) before anyone reads it;
        an error there stops every rank with the same message."""
        import torch.distributed as dist

        cfg = self.cfg
        error = None
        if cfg.data.path is None and not cfg.data.mixture and self.par.local_rank == 0:
            try:
                from prime_scale.data.demo import ensure_demo_corpus

                ensure_demo_corpus(seq_len=cfg.model.seq_len)
            except Exception as e:  # every rank must hear about it, not only this one
                error = str(e) if isinstance(e, UserError) else f"preparing the demo corpus failed: {e!r}"
        errors = [None] * self.par.world_size
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise UserError(first)

    def _open_outputs(self) -> None:
        cfg, run_dir = self.cfg, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(run_dir / "recipe.yaml", cfg.to_yaml().encode())
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and self.state.step == 0:  # a resumed run (step > 0) appends instead
            # a new run in an old directory keeps the old numbers beside it instead of mixing them
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(metrics.stat().st_mtime))
            metrics.rename(run_dir / f"metrics.{stamp}.jsonl")
        self.metrics_file = open(metrics, "a", buffering=1)
        if cfg.logging.wandb != "disabled":
            # wandb hooks imports of some libraries; a DataLoader worker forked later that imports
            # one of them (mosaicml-streaming pulls in transformers) would trip wandb's fork guard.
            # Import them here, once, before wandb starts.
            if any(m["format"] == "mds" for m in self.manifests):
                from prime_scale.data.streaming_compat import import_streaming

                import_streaming()
            os.environ["WANDB_DIR"] = str(run_dir.resolve())
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.run.name, dir=str(run_dir.resolve()),
                                    mode=cfg.logging.wandb, config=cfg.to_dict())

    # ---- the loop

    def run(self) -> int:
        try:
            self.setup()
            for hook in self.before_loop_hooks:  # e.g. a resume restores state, engine and loader
                hook(self)
            if self.par.is_logging_rank:
                self._open_outputs()
            self._banner()
            self.loop()
            self.finish()
        finally:
            self.close()
        return 0

    def micro_batches(self, iterator, step: int):
        from prime_scale.engine import make_batch

        cfg = self.cfg
        out = []
        for _ in range(self.engine.gas):
            with _rng_untouched():  # a new pass of the DataLoader draws its seed from torch's generator
                raw = next(iterator)
            out.append(make_batch(raw["input_ids"], raw["index"], seed=cfg.seed, step=step,
                                  global_batch=cfg.train.global_batch, vocab_size=self.vocab_size,
                                  ell=cfg.model.ell))
        return out

    def loop(self) -> None:
        cfg = self.cfg
        tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
        train_iter = iter(self.train_loader)
        window_time, window_steps, window_loss, window_norms = 0.0, 0, 0.0, []
        while self.state.step < cfg.train.steps:
            step = self.state.step
            batches = self.micro_batches(train_iter, step)
            t0 = time.perf_counter()
            result = self.engine.train_step(batches)
            dt = time.perf_counter() - t0
            self.state.step += 1
            self.state.tokens_seen += tokens_per_step
            self.state.samples_seen += cfg.train.global_batch
            self.state.train_time_s += dt
            window_time += dt
            window_steps += 1
            window_loss += result.loss
            if result.grad_norm is not None:
                window_norms.append(result.grad_norm)
            done = self.state.step
            last = done == cfg.train.steps
            record = None
            if not math.isfinite(result.loss):
                raise UserError(f"step {done}: the training loss is {result.loss}; lower optim.lr or "
                                "enable clipping (optim.clip)")
            if done % cfg.train.log_every == 0 or last or done == 1:
                # means over the steps since the last line: one step's Prime loss is noisy (its t)
                step_time = window_time / window_steps
                record = {"step": done, "loss": window_loss / window_steps, "lr": result.lr,
                          "grad_norm": sum(window_norms) / len(window_norms) if window_norms else None,
                          "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                          "tokens_seen": self.state.tokens_seen}
                window_time, window_steps, window_loss, window_norms = 0.0, 0, 0.0, []
            if self.val_loader is not None and ((cfg.eval.every and done % cfg.eval.every == 0) or last):
                with _rng_untouched():  # validating must not change the training that follows
                    val = self.validate()
                record = {**(record or {"step": done}), **val}
            if record is not None:
                self.log(record)
            for hook in self.after_step_hooks:
                hook(self)

    # ---- validation

    def validate(self) -> dict:
        """The sub-token ELBO over eval.batches global batches of the validation split (or all of
        it), eval.mc_samples noise draws per sequence; EMA weights when optim.ema > 0."""
        from prime_scale.engine import EVAL_NOISE_STEP, make_batch

        cfg = self.cfg
        total_nll, total_tokens = 0.0, 0.0
        self.val_loader.load_state_dict(self.val_start)
        chunks, chunk = [], []
        for i, raw in enumerate(self.val_loader):
            if i >= cfg.eval.batches * self.engine.gas:
                break
            chunk.append(raw)
            if len(chunk) == self.engine.gas:
                chunks.append(chunk)
                chunk = []
        if chunk:
            chunks.append(chunk)
        self.val_loader.load_state_dict(self.val_start)
        t0 = time.perf_counter()
        for k in range(cfg.eval.mc_samples):
            for chunk in chunks:
                batches = [make_batch(r["input_ids"], r["index"], seed=cfg.seed, step=EVAL_NOISE_STEP + k,
                                      global_batch=cfg.train.global_batch, vocab_size=self.vocab_size,
                                      ell=cfg.model.ell, valid=r.get("valid")) for r in chunk]
                nll, tokens = self.engine.evaluate(batches, EVAL_OBJECTIVE)
                total_nll += nll
                total_tokens += tokens
        bound = total_nll / max(total_tokens, 1.0)
        result = {"val_nll_bound": bound, "val_ppl": math.exp(min(bound, 700.0)),
                  "val_tokens": int(total_tokens / cfg.eval.mc_samples),
                  "val_weights": "ema" if self.engine.ema is not None else "raw",
                  "val_time_s": time.perf_counter() - t0}
        self.state.last_val = result
        return result

    # ---- output

    def log(self, record: dict) -> None:
        if not self.par.is_logging_rank:
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None},
                           step=record["step"])
        self._print_progress(record)

    def _print_progress(self, r: dict) -> None:
        cfg = self.cfg
        if "loss" in r:
            left = cfg.train.steps - r["step"]
            eta = left * r["step_time_s"]
            gnorm = "-" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
            print(f"step {r['step']:>{len(str(cfg.train.steps))}}/{cfg.train.steps} | loss {r['loss']:.4f} | "
                  f"lr {r['lr']:.2e} | grad norm {gnorm} | {r['tokens_per_s']:,.0f} tok/s | "
                  f"{r['step_time_s']:.3f} s/step | ETA {_fmt_duration(eta)}", flush=True)
        if "val_nll_bound" in r:
            print(f"  validation @ step {r['step']}: NLL bound {r['val_nll_bound']:.4f} nats/token, "
                  f"perplexity {r['val_ppl']:.2f} ({r['val_tokens']:,} tokens, {r['val_weights']} weights)",
                  flush=True)

    def _banner(self) -> None:
        if not self.par.is_logging_rank:
            return
        cfg, m = self.cfg, self.cfg.model
        print(f"prime-scale train: {self.n_params / 1e6:.2f}M parameters (ℓ={m.ell}, V={self.vocab_size}, "
              f"{m.layers}×{m.hidden}, seq {m.seq_len}), objective {m.objective}, {cfg.precision}, "
              f"ZeRO {cfg.parallel.zero_stage}", flush=True)
        print(f"  {self.par.describe()}; global batch {cfg.train.global_batch} = micro {cfg.train.micro_batch} × "
              f"dp {self.par.dp} × accumulation {self.engine.gas}; {cfg.train.steps} steps; run dir {self.run_dir}",
              flush=True)

    def finish(self) -> None:
        if not self.par.is_logging_rank:
            return
        s = self.state
        print(f"done: {s.step} steps, {s.tokens_seen:,} tokens seen in {_fmt_duration(s.train_time_s)} of "
              f"training ({s.tokens_seen / max(s.train_time_s, 1e-9):,.0f} tokens/s)", flush=True)
        if s.last_val:
            v = s.last_val
            print(f"validation (sub-token ELBO, {v['val_weights']} weights): NLL bound {v['val_nll_bound']:.4f} "
                  f"nats/token, perplexity {v['val_ppl']:.2f} over {v['val_tokens']:,} tokens", flush=True)
        else:
            print("validation: the data has no 'val' split (prepare it with --val-fraction > 0)", flush=True)
        plot = self.plot_losses()
        print(f"run directory: {self.run_dir} (recipe.yaml, metrics.jsonl"
              f"{', ' + plot.name if plot else ''}{', wandb/' if self.wandb is not None else ''})", flush=True)

    def plot_losses(self) -> Optional[Path]:
        """loss.png: training objective per logged step and the validation NLL bound."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.metrics_file is not None:
            self.metrics_file.flush()
        # from the file, so a resumed run plots its whole history
        records = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_nll_bound"]) for r in records if "val_nll_bound" in r]
        if not train:
            return None
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        ax.plot(*zip(*train), label=f"training loss ({self.cfg.model.objective})", lw=1.4)
        if val:
            ax.plot(*zip(*val), "o-", label="validation NLL bound (sub-token ELBO)", lw=1.4)
        ax.set_xlabel("step")
        ax.set_ylabel("nats per token")
        ax.set_title(f"{self.cfg.run.name or self.run_dir.name}: ℓ={self.cfg.model.ell}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.run_dir / "loss.png"
        tmp = self.run_dir / f".loss.png.tmp-{os.getpid()}.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        from prime_scale.parallel import state as pstate

        if pstate.is_initialized():
            pstate.destroy()


def _rng_untouched():
    """Run a block without moving torch's default CPU generator: fetching data (a DataLoader pass
    draws its base seed from it) and validating then leave the training's random streams (dropout)
    where they were, so eval.every and a resume (which starts a new pass) do not change the losses."""
    import torch

    return torch.random.fork_rng(devices=[])


def _quiet_libraries() -> None:
    """Keep the console for our progress: DeepSpeed logs every set-up detail at INFO, and
    megatron-core warns about optional CUDA packages at import."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


if __name__ == "__main__":  # torchrun / deepspeed launcher entry point
    from prime_scale.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
