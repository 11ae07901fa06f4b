"""The Trainer: builds a recipe's run on this rank and drives its training loop.

It composes the parts that each own one concern: the parallel state (prime_scale.parallel), the
data loaders (prime_scale.data), the engine (DeepSpeed around the model, prime_scale.engine), the
noise of each batch (prime_scale.noise) and the run's outputs (prime_scale.metrics). Checkpointing
plugs in through hooks (prime_scale.checkpointing): the Trainer knows nothing about files
beyond its run log. It knows nothing about launchers either: prime_scale.cli.train starts it.

Validation runs the one estimator of prime_scale.evaluation under the training layout (the engine
computes the losses; totals are summed over data-parallel ranks): the sub-token ELBO per original
token (a valid NLL bound), its perplexity, standard error, bits per byte and the unigram baseline,
equal to `prime-scale eval` of the same step's checkpoint. The training loss is the recipe's
objective (model.objective).
"""

from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from prime_scale import evaluation, metrics
from prime_scale.config import Config
from prime_scale.errors import OK, PREEMPTED, UserError
from prime_scale.model.vocab_parallel import total_exact_overflow
from prime_scale.noise import make_batch

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # a scheduler's preemption notice, a user's request, Ctrl-C


def preflight(cfg: Config, resume: Optional[str], init_from: Optional[str], dp: int) -> None:
    """Checks that need no process group, run before anything starts: --resume and --init-from
    exclude each other, the checkpoint to continue from is complete (or the directory holds no
    earlier run) and, if written under another layout, reshardable into this one (dp data-parallel
    ranks), and consolidated weights to start from are of this model."""
    from prime_scale.checkpointing import check_resume
    from prime_scale.export.reshard import check_init_from

    if resume is not None and init_from is not None:
        raise UserError("give either --resume (continue a run) or --init-from (start a new run from "
                        "consolidated weights), not both")
    check_resume(cfg, resume, dp)
    if init_from is not None:
        check_init_from(cfg, init_from)


@dataclass
class TrainState:
    """What a checkpoint must restore besides the engine (DeepSpeed saves model, optimizer and LR
    schedule) and the data loader (its own state_dict)."""

    step: int = 0  # optimizer steps completed; also the Prime noise key of the next step
    tokens_seen: int = 0
    samples_seen: int = 0
    train_time_s: float = 0.0
    skipped_steps: int = 0  # steps whose update was dropped (train.on_nonfinite=skip, train.on_spike=skip)
    consecutive_skips: int = 0
    recent_losses: list = field(default_factory=list)  # the spike test's window of accepted step losses
    last_val: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, sd: dict) -> None:
        for key, value in sd.items():
            setattr(self, key, value)



class Trainer:
    """Builds everything for a recipe and runs the training loop on this rank.

    Hooks: `before_loop_hooks` (e.g. --resume restores state, engine and loader) and
    `after_step_hooks` (e.g. a periodic save): callables(trainer) run on every rank. What a hook
    may read or restore: `state` (TrainState), `train_loader` (state_dict / load_state_dict),
    `engine.ds` (the DeepSpeed engine), `engine.ema`, `par` (the ParallelState)."""

    def __init__(self, cfg: Config, init_from: Optional[str] = None):
        self.cfg = cfg
        self.init_from = init_from  # a consolidated checkpoint whose weights start the run
        self.state = TrainState()
        self.after_step_hooks: list[Callable[["Trainer"], None]] = []
        self.before_loop_hooks: list[Callable[["Trainer"], None]] = []
        self.run_log: Optional[metrics.RunLog] = None
        self.stop_reason: Optional[str] = None  # set, on every rank alike, when the run stops early
        self._requested: Optional[str] = None  # this rank's pending stop request (a signal's name)

    # ---- set-up

    def setup(self) -> None:
        metrics.quiet_libraries()
        from prime_scale.data.loader import build_loader, load_manifests
        from prime_scale.data.stats import SplitStats
        from prime_scale.engine import Engine
        from prime_scale.model import count_parameters
        from prime_scale.parallel import state as pstate

        cfg = self.cfg
        self.par = pstate.init(cfg)
        self.run_dir = Path(cfg.run.dir)
        self.manifests = load_manifests(cfg, "train")  # checks vocab_size / seq_len against the recipe
        manifest = self.manifests[0]
        self.vocab_size = int(manifest["vocab_size"])
        cfg.model.vocab_size = self.vocab_size  # the resolved recipe records what the data decided
        self.train_loader = build_loader(cfg, "train", self.par.dp_rank, self.par.dp, cfg.train.micro_batch, cfg.seed)
        self.val_loader = None
        if "val" in manifest["splits"] and manifest["splits"]["val"]["sequences"] > 0:
            self.val_loader = build_loader(cfg, "val", self.par.dp_rank, self.par.dp, cfg.train.micro_batch, cfg.seed)
            self.val_start = self.val_loader.state_dict()
            self.val_stats = SplitStats(self.manifests, "val", self.val_loader.weights)
        self.engine = Engine(cfg, self.par, self.vocab_size, init_from=self.init_from)
        self.n_params = count_parameters(self.engine.args)["total"]

    def _open_outputs(self) -> None:
        def import_streaming():  # mosaicml-streaming pulls in libraries wandb hooks
            if any(m["format"] == "mds" for m in self.manifests):
                from prime_scale.data.streaming_compat import import_streaming as load

                load()

        self.run_log = metrics.RunLog(self.cfg, self.run_dir, resumed=self.state.step > 0,
                                      import_before_wandb=import_streaming)

    def reference_unigram(self) -> Optional[dict]:
        """A fixed unigram baseline recorded by the data (the demo's, source.reference_unigram) for
        the run's split and sequence length; None for a mixture or data that records none."""
        if len(self.manifests) != 1:
            return None
        ref = (self.manifests[0].get("source") or {}).get("reference_unigram")
        return ref if isinstance(ref, dict) and ref.get("seq_len") == self.cfg.model.seq_len else None

    # ---- the loop

    def run(self) -> int:
        try:
            self.setup()
            for hook in self.before_loop_hooks:
                hook(self)
            if self.par.is_logging_rank:
                self._open_outputs()
                metrics.print_banner(self.cfg, self.n_params, self.vocab_size, self.par, self.engine.gas,
                                     self.run_dir)
            with self._stop_requests():
                self.loop()
            if self.run_log is not None:
                self.run_log.file.flush()
                metrics.print_summary(self.state, self.run_log, self.stop_reason, self.vocab_size,
                                      self.reference_unigram())
        finally:
            self.close()
        return PREEMPTED if self.stop_reason else OK

    # ---- stopping early: signals and the time budget

    def _stop_requests(self):
        """While the loop runs, SIGTERM / SIGUSR1 / SIGINT only ask for a stop: the run checkpoints at
        the next step boundary (every rank agrees there) and exits with PREEMPTED. A second Ctrl-C
        aborts at once."""
        import contextlib

        @contextlib.contextmanager
        def installed():
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {}

            def request(signum, _frame):
                name = signal.Signals(signum).name
                # a second Ctrl-C aborts; the first may reach a rank twice (the terminal's process group
                # and the local launcher's forward), so only one a second or more later counts
                if name == "SIGINT" and self._requested == "SIGINT" and time.monotonic() - self._requested_at > 1.0:
                    raise KeyboardInterrupt
                if self._requested:
                    return
                self._requested, self._requested_at = name, time.monotonic()
                if self.par.is_logging_rank:
                    print(f"\n{name} received: stopping after this step with a checkpoint"
                          f"{' (Ctrl-C again to abort without one)' if name == 'SIGINT' else ''}", flush=True)

            for name in STOP_SIGNALS:
                previous[name] = signal.signal(getattr(signal, name), request)
            try:
                yield
            finally:
                for name, handler in previous.items():
                    signal.signal(getattr(signal, name), handler)

        return installed()

    def _agree_to_stop(self) -> Optional[str]:
        """Collective, at every step boundary: the reason to stop now if any rank has one (a signal,
        or train.max_minutes of wall time used by this process), else None."""
        import torch.distributed as dist

        minutes = self.cfg.train.max_minutes
        over_time = bool(minutes) and time.monotonic() - self._started > 60 * minutes
        code = 2 if self._requested else (1 if over_time else 0)
        if self.par.world_size > 1:
            flag = torch.tensor([code], dtype=torch.int64, device=self.par.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return {0: None, 1: f"train.max_minutes={minutes:g} reached", 2: "a stop was requested (signal)"}[code]

    def micro_batches(self, iterator, step: int):
        cfg = self.cfg
        out = []
        for _ in range(self.engine.gas):
            with _rng_untouched():  # a new pass of the DataLoader draws its seed from torch's generator
                raw = next(iterator)
            out.append(make_batch(raw["input_ids"], raw["index"], raw["position"], seed=cfg.seed, step=step,
                                  global_batch=cfg.train.global_batch, vocab_size=self.vocab_size,
                                  ell=cfg.model.ell))
        return out

    def loop(self) -> None:
        cfg = self.cfg
        tokens_per_step = cfg.train.global_batch * cfg.model.seq_len
        train_iter = iter(self.train_loader)
        self._started = time.monotonic()
        window_time, window_steps, window_loss, window_norms = 0.0, 0, [], []
        while self.state.step < cfg.train.steps:
            step = self.state.step
            batches = self.micro_batches(train_iter, step)
            t0 = time.perf_counter()
            ceiling = self._loss_ceiling()
            result = self.engine.train_step(batches, loss_ceiling=ceiling)
            dt = time.perf_counter() - t0
            self.state.step += 1
            self.state.tokens_seen += tokens_per_step
            self.state.samples_seen += cfg.train.global_batch
            self.state.train_time_s += dt
            window_time += dt
            window_steps += 1
            done = self.state.step
            last = done == cfg.train.steps
            record = None
            if self._accept(done, result, ceiling):
                window_loss.append(result.loss)
                if result.grad_norm is not None:
                    window_norms.append(result.grad_norm)
            if done % cfg.train.log_every == 0 or last or done == 1:
                # means over the steps since the last line: one step's Prime loss is noisy (its t)
                step_time = window_time / window_steps
                record = {"step": done, "loss": sum(window_loss) / len(window_loss) if window_loss else None,
                          "lr": result.lr, "skipped_steps": self.state.skipped_steps,
                          "grad_norm": sum(window_norms) / len(window_norms) if window_norms else None,
                          "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                          "tokens_seen": self.state.tokens_seen,
                          # wall seconds since this process's loop began (evaluations included)
                          "elapsed_s": time.monotonic() - self._started,
                          # GPU training: extreme-logit positions beyond the loss's exact capacity (every
                          # rank's, since the last record; read here, where the host syncs anyway)
                          "capped_positions": total_exact_overflow(self.par.tp_rank == 0, self.par.device)}
                window_time, window_steps, window_loss, window_norms = 0.0, 0, [], []
            if self.val_loader is not None and ((cfg.eval.every and done % cfg.eval.every == 0) or last):
                with _rng_untouched():  # validating must not change the training that follows
                    val = self.validate(final=last)
                record = {**(record or {"step": done}), **val, "elapsed_s": time.monotonic() - self._started}
            if record is not None:
                self._log(record)
            self.stop_reason = self._agree_to_stop() if done < cfg.train.steps else None
            for hook in self.after_step_hooks:  # a checkpoint hook saves here when stop_reason is set
                hook(self)
            if self.stop_reason:
                break

    def _loss_ceiling(self) -> Optional[float]:
        """The spike test's threshold for the next step: train.spike_factor × the median training loss
        of the last train.spike_window accepted steps; None while the test is off or still filling its
        window. The window is part of the checkpointed state, so a resumed run tests alike."""
        t = self.cfg.train
        if not t.spike_factor or len(self.state.recent_losses) < t.spike_window:
            return None
        return t.spike_factor * statistics.median(self.state.recent_losses)

    def _accept(self, step: int, result, ceiling: Optional[float]) -> bool:
        """True for a step whose update stands: a finite loss and gradient norm, and no spike. A
        non-finite step follows train.on_nonfinite and a spike train.on_spike: `stop` ends the run with
        a named error and nothing is saved after it; `skip` counts the step (the engine dropped its
        update) and stops after train.max_skips consecutive skipped steps."""
        t = self.cfg.train
        bad = [f"{what} is {value}" for what, value in (("the training loss", result.loss),
                                                         ("the gradient norm", result.grad_norm))
               if value is not None and not math.isfinite(value)]
        if result.spike:  # the engine judged the loss against `ceiling` and dropped the update
            policy = t.on_spike
            what = (f"step {step}: the training loss {result.loss:.4g} is a spike, above train.spike_factor="
                    f"{t.spike_factor:g} × {ceiling / t.spike_factor:.4g} (the median of the last "
                    f"{t.spike_window} accepted steps)")
            hint = ("check the data around this step and lower optim.lr; if such losses are this run's normal "
                    "noise, raise train.spike_factor or train.spike_window")
        elif bad:
            policy, what = t.on_nonfinite, f"step {step}: {' and '.join(bad)}"
            hint = ("lower optim.lr or raise optim.warmup_steps (clipping is on already), and check the data "
                    "around this step" if self.cfg.optim.clip > 0 else
                    "lower optim.lr or enable clipping (optim.clip)")
        else:
            self.state.consecutive_skips = 0
            if t.spike_factor:
                self.state.recent_losses = (self.state.recent_losses + [result.loss])[-t.spike_window:]
            return True
        if policy == "skip" and result.skipped:
            self.state.skipped_steps += 1
            self.state.consecutive_skips += 1
            if self.state.consecutive_skips <= t.max_skips:
                if self.par.is_logging_rank:
                    print(f"  {what}: its update was dropped (skip {self.state.consecutive_skips} of at most "
                          f"{t.max_skips} in a row)", flush=True)
                return False
            what += f" ({self.state.consecutive_skips} steps in a row, more than train.max_skips={t.max_skips})"
        kept = "its update was dropped, " if result.skipped else ""
        raise UserError(f"{what}; {kept}the run stops without saving this state. {hint}; then continue from the "
                        "newest checkpoint with --resume auto")

    # ---- validation

    def validate(self, final: bool = False) -> dict:
        """The bound over the first eval.batches global batches of the validation split (or all of
        it; the last step's: eval.final_batches, 0 = all), eval.mc_samples noise draws per sequence;
        EMA weights when optim.ema > 0."""
        cfg = self.cfg
        batches = cfg.eval.batches
        if final and cfg.eval.final_batches is not None:
            batches = cfg.eval.final_batches or None
        self.val_loader.load_state_dict(self.val_start)
        chunks, chunk = [], []
        for i, raw in enumerate(self.val_loader):
            if batches is not None and i >= batches * self.engine.gas:
                break
            chunk.append(raw)
            if len(chunk) == self.engine.gas:
                chunks.append(chunk)
                chunk = []
        if chunk:
            chunks.append(chunk)
        self.val_loader.load_state_dict(self.val_start)
        t0 = time.perf_counter()
        totals = evaluation.estimate(self.engine.evaluate, chunks, vocab_size=self.vocab_size, ell=cfg.model.ell,
                                     seed=cfg.seed, mc_samples=cfg.eval.mc_samples, stats=self.val_stats,
                                     reduce=self._sum_over_data_parallel)
        r = evaluation.EvalResult.from_totals(totals, split_sequences=sum(self.val_stats.sequences),
                                              mc_samples=cfg.eval.mc_samples, seed=cfg.seed,
                                              vocab_size=self.vocab_size, ell=cfg.model.ell,
                                              carry_over=cfg.model.carry_over)
        result = {"val_nll_bound": r.nll_per_token, "val_stderr": r.stderr, "val_ppl": r.ppl,
                  "val_bits_per_byte": r.bits_per_byte, "val_bits_per_byte_estimated": r.bits_per_byte_estimated,
                  "val_unigram_nll": r.unigram_nll_per_token,
                  "val_unigram_bits_per_byte": r.unigram_bits_per_byte, "val_tokens": r.tokens,
                  "val_sequences": r.sequences, "val_weights": "ema" if self.engine.ema is not None else "raw",
                  "val_time_s": time.perf_counter() - t0}
        result = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
        self.state.last_val = result
        return result

    def _sum_over_data_parallel(self, totals: torch.Tensor) -> torch.Tensor:
        if self.par.dp > 1:
            import torch.distributed as dist

            totals = totals.to(self.par.device)
            dist.all_reduce(totals, group=self.par.dp_group)
        return totals.cpu()

    def _log(self, record: dict) -> None:
        if self.run_log is not None:
            self.run_log.log(record)

    def close(self) -> None:
        if self.run_log is not None:
            self.run_log.close()
            self.run_log = None
        from prime_scale.parallel import state as pstate

        if pstate.is_initialized():
            pstate.destroy()


def _rng_untouched():
    """Run a block without moving torch's default CPU generator: fetching data (a DataLoader pass
    draws its base seed from it) and validating then leave the training's random streams (dropout)
    where they were, so eval.every and a resume (which starts a new pass) do not change the losses."""
    return torch.random.fork_rng(devices=[])
