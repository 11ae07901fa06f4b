"""What a run shows and leaves behind: metrics.jsonl, wandb, the progress line, the banner, the
final summary and the loss plot. Written by the logging rank only (global rank 0).

metrics.jsonl holds one JSON object per logged step (docs/training.md lists the fields and units):
step, loss (the recipe's objective, nats per token, mean since the previous record), lr, grad_norm
(before clipping), tokens_per_s, step_time_s, tokens_seen, elapsed_s (wall seconds since this
process's loop began, evaluations included); validation steps add val_nll_bound
(sub-token ELBO, nats per token: an upper bound on the NLL), val_stderr, val_ppl, val_bits_per_byte,
val_bits_per_byte_estimated (true: a part of the split, whose bits per byte figures are estimates),
the unigram baseline val_unigram_nll and val_unigram_bits_per_byte, val_tokens, val_sequences,
val_weights and val_time_s (a figure the data cannot give, such as bytes of pre-tokenized data, is null).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Optional

from prime_scale import fsio
from prime_scale.config import Config, resolve_zero_stage
from prime_scale.errors import UserError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def quiet_libraries() -> None:
    """Keep the console for our progress: DeepSpeed logs every set-up detail at INFO, and
    megatron-core warns about optional CUDA packages at import."""
    import torch

    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")
    if not torch.cuda.is_available():
        # a CUDA setting, meaningless on the CPU. On a GPU the warning stays: parallel.state sets the
        # variable for TP > 1 runs, so it appears only when the user's own value loses the overlap
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    from prime_scale.parallel.state import import_deepspeed

    import_deepspeed()
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


class RunLog:
    """The logging rank's outputs in run.dir: recipe.yaml, metrics.jsonl, wandb, loss.png."""

    def __init__(self, cfg: Config, run_dir: Path, resumed: bool, import_before_wandb=None):
        self.cfg, self.run_dir = cfg, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        fsio.write_atomic(run_dir / "recipe.yaml", cfg.to_yaml())
        metrics = run_dir / METRICS_FILE
        if metrics.exists() and not resumed:  # a resumed run appends instead
            # a new run in an old directory keeps the old numbers beside it instead of mixing them
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(metrics.stat().st_mtime))
            metrics.rename(run_dir / f"metrics.{stamp}.jsonl")
        self.file = open(metrics, "a", buffering=1)
        self.wandb = None
        if cfg.logging.wandb != "disabled":
            if import_before_wandb is not None:
                # wandb hooks imports of some libraries; a DataLoader worker forked later that imports
                # one of them would trip wandb's fork guard: import them once, before wandb starts
                import_before_wandb()
            os.environ["WANDB_DIR"] = str(run_dir.resolve())
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.run.name, dir=str(run_dir.resolve()),
                                    mode=cfg.logging.wandb, config=cfg.to_dict())

    def log(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: say which file, not a bare errno
            full = fsio.out_of_space(e, self.run_dir)
            cause = f"no space left on the device, {full}" if full else e.strerror
            raise UserError(f"{self.run_dir / METRICS_FILE}: cannot write the step {record.get('step')} record "
                            f"({cause}); free space, then continue with --resume auto") from None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None},
                           step=record["step"])
        print_progress(self.cfg, record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def print_progress(cfg: Config, r: dict) -> None:
    if "loss" in r:
        eta = (cfg.train.steps - r["step"]) * r["step_time_s"]
        gnorm = "-" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
        loss = "- (update skipped)" if r["loss"] is None else f"{r['loss']:.4f}"  # every step since the last line
        print(f"step {r['step']:>{len(str(cfg.train.steps))}}/{cfg.train.steps} | loss {loss} | "
              f"lr {r['lr']:.2e} | grad norm {gnorm} | {r['tokens_per_s']:,.0f} tok/s | "
              f"{r['step_time_s']:.3f} s/step | ETA {fmt_duration(eta)}", flush=True)
    if "val_nll_bound" in r:
        print(f"  validation @ step {r['step']}: {describe_validation(r)}", flush=True)


def _num(value, fmt: str) -> str:
    return "unknown" if value is None else fmt.format(value)


def describe_validation(v: dict) -> str:
    """One line: the bound in nats per token (± s.e.), perplexity, bits per byte, the unigram baseline."""
    per_byte = "bits/byte, estimated" if v.get("val_bits_per_byte_estimated") else "bits/byte"
    return (f"NLL bound {v['val_nll_bound']:.4f} ± {_num(v.get('val_stderr'), '{:.4f}')} nats/token, "
            f"perplexity {_num(v.get('val_ppl'), '{:.2f}')}, {_num(v.get('val_bits_per_byte'), '{:.4f}')} {per_byte} "
            f"(unigram baseline {_num(v.get('val_unigram_nll'), '{:.4f}')} nats/token, "
            f"{_num(v.get('val_unigram_bits_per_byte'), '{:.4f}')} {per_byte}; {v['val_tokens']:,} tokens, "
            f"{v['val_weights']} weights)")


def compare_with_baselines(v: dict, vocab_size: Optional[int], reference: Optional[dict]) -> Optional[str]:
    """The bound beside the unigram baselines, in bits per byte of the same validation text: the
    tokenizer's own (a model that learned nothing beyond token frequencies sits at 1.00×) and, for
    data that records one (the demo: source.reference_unigram), a fixed reference tokenizer's."""
    bound, own = v.get("val_bits_per_byte"), v.get("val_unigram_bits_per_byte")
    if bound is None or own is None:
        return None
    rows = [("valid bound (sub-token ELBO)", bound, ""),
            (f"unigram baseline, this tokenizer{f' ({vocab_size} pieces)' if vocab_size else ''}", own,
             f"bound = {bound / own:.3f} × this")]
    if reference and reference.get("bits_per_byte") and reference.get("vocab_size") != vocab_size:
        ref = float(reference["bits_per_byte"])
        rows.append((f"unigram baseline, reference tokenizer ({reference['vocab_size']} pieces)", ref,
                     f"bound = {bound / ref:.3f} × this"))
    width = max(len(r[0]) for r in rows)
    lines = [f"  {name.ljust(width)}  {value:.4f} bits/byte  {note}".rstrip() for name, value, note in rows]
    part = ("; estimated: a part of the split, each sequence credited its split's mean bytes"
            if v.get("val_bits_per_byte_estimated") else "")
    return "\n".join([f"bits per byte of the validation text ({v['val_tokens']:,} tokens{part}):", *lines])


def zero_description(cfg: Config, dp: int) -> str:
    """The recipe's ZeRO stage, and the one DeepSpeed runs where they differ (config.resolve_zero_stage)."""
    run = resolve_zero_stage(cfg, dp)
    if run == cfg.parallel.zero_stage:
        return f"ZeRO {run}"
    return f"ZeRO {cfg.parallel.zero_stage} (runs as ZeRO {run}: one data-parallel rank has nothing to partition)"


def print_banner(cfg: Config, n_params: int, vocab_size: int, par, gas: int, run_dir: Path) -> None:
    m = cfg.model
    print(f"prime-scale train: {n_params / 1e6:.2f}M parameters (ℓ={m.ell}, V={vocab_size}, "
          f"{m.layers}×{m.hidden}, seq {m.seq_len}), objective {m.objective}, {cfg.precision}, "
          f"{zero_description(cfg, par.dp)}", flush=True)
    print(f"  {par.describe()}; global batch {cfg.train.global_batch} = micro {cfg.train.micro_batch} × "
          f"dp {par.dp} × accumulation {gas}; {cfg.train.steps} steps; run dir {run_dir}", flush=True)


def print_summary(state, run_log: RunLog, stop_reason: Optional[str] = None, vocab_size: Optional[int] = None,
                  reference: Optional[dict] = None) -> None:
    """The end of a run: what it did, its validation bound (next to the unigram baselines), and
    where its outputs are."""
    head = f"stopped early at step {state.step} ({stop_reason})" if stop_reason else f"done: {state.step} steps"
    print(f"{head}, {state.tokens_seen:,} tokens seen in {fmt_duration(state.train_time_s)} of "
          f"training ({state.tokens_seen / max(state.train_time_s, 1e-9):,.0f} tokens/s)", flush=True)
    if state.last_val:
        v = state.last_val
        print(f"validation (sub-token ELBO): {describe_validation(v)}", flush=True)
        comparison = compare_with_baselines(v, vocab_size, reference)
        if comparison:
            print(comparison, flush=True)
    elif stop_reason:
        print("validation: none yet (the run stopped before its first validation)", flush=True)
    else:
        print("validation: the data has no 'val' split (prepare it with --val-fraction > 0)", flush=True)
    if stop_reason:
        print("  a checkpoint of this step was saved (if checkpointing is on): continue with --resume auto",
              flush=True)
    try:
        plot = plot_losses(run_log.cfg, run_log.run_dir)
    except fsio.DiskFullError as e:  # the last write of a run: say that nothing before it was lost
        raise fsio.DiskFullError(e.path, e.free, f"Nothing before it was lost: {METRICS_FILE} and every checkpoint "
                                 f"were saved. Free space, then the same command with --resume auto writes "
                                 f"{PLOT_FILE} (no finished step is trained again)") from None
    print(f"run directory: {run_log.run_dir} (recipe.yaml, {METRICS_FILE}"
          f"{', ' + plot.name if plot else ''}{', wandb/' if run_log.wandb is not None else ''})", flush=True)


def plot_losses(cfg: Config, run_dir: Path) -> Optional[Path]:
    """loss.png: training objective per logged step and the validation NLL bound, from metrics.jsonl
    (so a resumed run plots its whole history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_nll_bound"]) for r in records if "val_nll_bound" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(*zip(*train), label=f"training loss ({cfg.model.objective})", lw=1.4)
    if val:
        ax.plot(*zip(*val), "o-", label="validation NLL bound (sub-token ELBO)", lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title(f"{cfg.run.name or run_dir.name}: ℓ={cfg.model.ell}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    try:
        fsio.publish_file(path, fig.savefig)
    finally:
        plt.close(fig)
    return path
