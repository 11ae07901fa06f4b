"""The typed recipe schema: what keys exist, their types, their defaults, and what they mean.

The dataclasses are the single source of truth. The loader builds them from YAML (type-checking
every value), `recipe show --defaults` prints their defaults, and docs/recipes.md is rendered from
them together with DOCS, so adding a key here without a DOCS line fails the tests.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml


@dataclass
class ModelConfig:
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    vocab_size: Optional[int] = None  # None: taken from the data manifest
    seq_len: int = 128
    ell: int = 1  # token granularity: sub-tokens per token
    carry_over: bool = True
    objective: Literal["prime_joint", "prime_elbo"] = "prime_elbo"
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    recompute: Literal["none", "selective", "full"] = "none"  # activations recomputed in the backward pass


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.1  # floor of cosine/linear decay, as a fraction of lr
    clip: float = 1.0  # 0 disables clipping
    ema: float = 0.0  # EMA decay of the weights; 0 disables EMA


@dataclass
class MixtureEntry:
    path: str
    weight: float = 1.0


@dataclass
class DataConfig:
    path: Optional[str] = None  # a prepared dataset (prime-scale prep shard); None: the demo corpus
    mixture: list[MixtureEntry] = field(default_factory=list)  # several datasets with weights
    format: Literal["auto", "mds", "wds"] = "auto"
    num_workers: int = 1
    shuffle: bool = True
    shuffle_block: int = 262144  # samples shuffled together (the loader's locality/randomness trade-off)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 0  # 0: world size / (tp * pp)
    zero_stage: int = 1


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 8
    micro_batch: int = 8
    log_every: int = 10
    max_minutes: float = 0.0  # 0: no limit; else checkpoint and stop once this much wall time has passed
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a step whose loss or gradient norm is not finite
    max_skips: int = 3  # consecutive skipped steps (non-finite or spiking) before the run stops
    spike_factor: float = 0.0  # 0: off; else a loss above this × the recent median is a spike
    spike_window: int = 50  # accepted steps whose median loss the spike test compares against
    on_spike: Literal["stop", "skip"] = "skip"  # a spiking step: stop the run, or drop its update


@dataclass
class EvalConfig:
    every: int = 100  # validation every N steps (and at the end); 0: only at the end
    batches: int = 4
    mc_samples: int = 1  # Monte Carlo noise draws per sequence
    # the validation at the last step: this many global batches, 0 = the whole split, None = eval.batches
    final_batches: Optional[int] = None


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep_last: int = 2
    dir: Optional[str] = None  # None: <run.dir>/checkpoints


@dataclass
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "prime-scale"


@dataclass
class RunConfig:
    dir: str = "runs/tiny-cpu"
    name: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# One line per key: what it means and what its special values do. Keys inside list items are
# spelled with "[]" (data.mixture[].path). The reference page and `recipe show --origin` read this.
DOCS: dict[str, str] = {
    "model.layers": "number of transformer blocks",
    "model.hidden": "width of the residual stream; must be divisible by model.heads and by model.ell",
    "model.heads": "attention heads; the head dim hidden / heads must be even (rotary positions) "
                   "and heads divisible by parallel.tp",
    "model.mlp_ratio": "MLP width as a multiple of model.hidden",
    "model.dropout": "dropout probability, in [0, 1)",
    "model.vocab_size": "vocabulary size V; null = taken from the prepared data's manifest",
    "model.seq_len": "tokens per sequence (L)",
    "model.ell": "token granularity ℓ: sub-tokens per token; model.hidden must be divisible by it; "
                 "ℓ = 1 is MDLM",
    "model.carry_over": "carry-over: predict only the classes consistent with the visible sub-tokens",
    "model.objective": "training loss: prime_elbo = the sub-token ELBO (a valid bound); "
                       "prime_joint = the paper's joint loss",
    "model.rotary_base": "base of the rotary position frequencies",
    "model.norm_eps": "epsilon of the LayerNorms",
    "model.init_std": "standard deviation of the normal weight initialisation",
    "model.recompute": "activation recompute in training: none = keep every activation for the backward "
                       "pass; selective = recompute the attention core (rotary, scores, softmax, dropout, "
                       "weighted sum) in the backward pass; full = keep only each block's input and recompute "
                       "the whole block (least memory, about one more forward of the blocks per step)",
    "optim.lr": "peak learning rate (AdamW), reached after the warm-up",
    "optim.betas": "AdamW (β1, β2): two numbers in [0, 1)",
    "optim.eps": "AdamW epsilon",
    "optim.weight_decay": "AdamW decoupled weight decay",
    "optim.warmup_steps": "steps of linear learning-rate warm-up; 0 = none",
    "optim.schedule": "learning rate after the warm-up: constant, or cosine / linear decay to "
                      "optim.min_lr_ratio × lr at train.steps",
    "optim.min_lr_ratio": "floor of the cosine / linear decay, as a fraction of optim.lr",
    "optim.clip": "gradient-norm clipping threshold; 0 disables clipping",
    "optim.ema": "EMA decay of the weights (validation uses the EMA weights); 0 disables EMA",
    "data.path": "a prepared dataset (`prime-scale prep shard`); null = the demo corpus "
                 "(`prime-scale prep demo`)",
    "data.mixture": "several prepared datasets sampled by weight: a list of {path, weight}; "
                    "give either this or data.path",
    "data.mixture[].path": "a prepared dataset of the mixture (required)",
    "data.mixture[].weight": "its sampling weight, relative to the others; must be positive",
    "data.format": "dataset format: auto = from the dataset's manifest, or require mds / wds",
    "data.num_workers": "data-loader worker processes per rank",
    "data.shuffle": "shuffle the training samples",
    "data.shuffle_block": "samples shuffled together: larger is more random, smaller reads more locally",
    "parallel.tp": "tensor-parallel degree; must divide model.heads and the MLP width",
    "parallel.pp": "pipeline-parallel stages (DeepSpeed's pipeline engine); at most model.layers",
    "parallel.dp": "data-parallel degree; 0 = auto: world size / (tp × pp)",
    "parallel.zero_stage": "DeepSpeed ZeRO stage, 0 to 3 (0 or 1 with pipeline parallelism; fp32 over one "
                           "data-parallel rank runs 1 and 2 as 0)",
    "train.steps": "optimizer steps to train",
    "train.global_batch": "sequences per optimizer step, over all data-parallel ranks",
    "train.micro_batch": "sequences per rank per forward/backward pass; each rank accumulates "
                         "global_batch / (micro_batch × dp) of them per step",
    "train.log_every": "log training metrics every N steps",
    "train.max_minutes": "wall-clock budget in minutes: at the first step boundary past it, save a checkpoint "
                         "and exit (code 3, resume with --resume auto); 0 = no limit",
    "train.on_nonfinite": "a step whose loss or gradient norm is not finite: stop (exit 2; nothing saved after "
                          "it) or skip (its update is dropped, counted in metrics as skipped_steps)",
    "train.max_skips": "with on_nonfinite=skip or on_spike=skip: stop after this many consecutive skipped steps",
    "train.spike_factor": "loss-spike test: a step whose training loss exceeds this × the median loss of the last "
                          "spike_window accepted steps is a spike (decided before its update); 0 = off, else > 1",
    "train.spike_window": "accepted steps whose median the spike test compares against; the test starts once "
                          "this many have run",
    "train.on_spike": "a spiking step: skip (its update is dropped before it is applied, counted in "
                      "skipped_steps) or stop (exit 2; nothing saved after it)",
    "eval.every": "validate every N steps (and at the end); 0 = only at the end",
    "eval.batches": "validation batches per evaluation",
    "eval.mc_samples": "Monte Carlo noise draws per validation sequence",
    "eval.final_batches": "validation batches at the last step; 0 = the whole validation split, null = eval.batches",
    "checkpoint.every": "save a checkpoint every N steps (and at the end); 0 = only at the end",
    "checkpoint.keep_last": "complete checkpoints kept; older ones are deleted",
    "checkpoint.dir": "where checkpoints go; null = run.dir/checkpoints",
    "logging.wandb": "Weights & Biases: offline writes under run.dir/wandb, sync later with "
                     "`wandb sync`; online needs network; disabled = no W&B",
    "logging.project": "Weights & Biases project name",
    "run.dir": "the run directory: resolved recipe, metrics.jsonl, checkpoints, wandb",
    "run.name": "run name for Weights & Biases and the loss plot; null = W&B picks one, the plot "
                "uses run.dir's name",
    "precision": "training precision: fp32, or bf16 mixed precision",
    "seed": "run seed: weight initialisation, data order and the diffusion noise",
}


REQUIRED = object()  # the "default" of a field a recipe must give (data.mixture[].path)


@dataclass(frozen=True)
class SchemaField:
    """One leaf key of the schema: a value a recipe can set (a list counts as one value)."""
    key: str
    type: Any
    default: Any  # REQUIRED when the key has no default


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def schema_fields(cls: type = Config, prefix: str = "", items: bool = True) -> list[SchemaField]:
    """The leaf keys of a schema dataclass, in declaration order.

    Sections (nested dataclasses) are descended into, not listed. A list of dataclasses
    (data.mixture) is one leaf, followed, when `items`, by its items' fields as `data.mixture[].path`
    so the reference can document them; those are not keys a recipe sets directly.
    """
    hints = typing.get_type_hints(cls)
    out: list[SchemaField] = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += schema_fields(tp, key + ".", items)
            continue
        out.append(SchemaField(key, tp, _default(f)))
        args = typing.get_args(tp)
        if items and typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out += schema_fields(args[0], key + "[].", items)
    return out


def leaf_keys() -> list[str]:
    """The dotted keys a recipe can set (`model.layers`, `data.mixture`, `seed`)."""
    return [f.key for f in schema_fields(items=False)]
