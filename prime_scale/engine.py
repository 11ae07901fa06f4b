"""The training engine: a Prime model inside DeepSpeed, one interface for both of its engines.

- pp = 1: DeepSpeed's engine (ZeRO 0–3) around the whole model, given megatron-core's groups through
  the MegatronMPU adapter (TP ranks reduce nothing, DP ranks reduce gradients, the gradient norm
  counts TP-sharded parameters on every TP rank and replicated ones once).
- pp > 1: DeepSpeed's pipeline engine over the model's layer sequence (LayerSpecs), with the
  parallel state's PipeModelDataParallelTopology; ZeRO ≤ 1 (the pipeline engine's limit; the recipe
  validator rejects more). megatron's TP group still serves the TP layers and the losses.
Both: torch AdamW (`torch_adam`, no JIT-compiled optimizer), gradient clipping, fp32 or bf16, the
LR schedule of cfg.optim, and global batch = micro_batch × dp × gradient accumulation steps, so a
recipe trains on the same global batches under every layout.

Batches carry their Prime noise (prime_scale.noise): it is applied where the batch is built, so
every pipeline stage and TP peer holds the same y_t, t, x0. Sizes, ranks and groups come from the
ParallelState the engine is handed.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from prime_scale.config import Config, resolve_zero_stage
from prime_scale.model import ModelArgs, PrimeObjective, PrimeTransformer, layer_builders, name_map
from prime_scale.noise import Batch
from prime_scale.optim import WeightEMA, lr_factor, parameter_groups, undo_priming_step
from prime_scale.parallel.state import MegatronMPU, ParallelState, import_deepspeed

# --------------------------------------------------------------------------- configuration

def grad_accumulation_steps(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch // (cfg.train.micro_batch * dp)


def deepspeed_config(cfg: Config, dp: int) -> dict:
    o, stage = cfg.optim, resolve_zero_stage(cfg, dp)
    zero: dict = {"stage": stage}
    if stage == 3 and o.ema > 0:
        # EMA swaps weights through each rank's partition (ds_tensor); persistent (never released)
        # small parameters would keep their gathered copy and miss the swap
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": grad_accumulation_steps(cfg, dp),
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": True}},
        "gradient_clipping": o.clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        **_accumulation(cfg, stage),
        "zero_optimization": zero,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def _accumulation(cfg: Config, stage: int) -> dict:
    """bf16: gradients accumulate (over the gas micro-batches) and are reduced over DP in fp32.
    Without this key DeepSpeed accumulates in the model's dtype: 32–64 bf16 additions into
    param.grad lose the small micro-batches' contributions (8 mantissa bits). DeepSpeed 0.19 honours
    it as: ZeRO 1 → its BF16_Optimizer (fp32 gradient buffer per partition, the pipeline engine's
    bf16 path too); ZeRO 2 → the stage-1/2 optimizer's fp32 gradient partitions; ZeRO 3 → fp32
    accumulation buffers. ZeRO 0 with bf16 and fp32 accumulation is refused by DeepSpeed
    (NotImplementedError in _do_optimizer_sanity_check): there the key is left out and bf16
    accumulation remains (fp32 master weights still hold the update)."""
    if cfg.precision != "bf16" or stage == 0:
        return {}
    return {"data_types": {"grad_accum_dtype": "fp32"}}


def sum_of_squares(t: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Σ t² as a float64 scalar without a float64 copy of t: each chunk's norm in t's precision, the
    chunks' squares summed in float64. The error is one chunk's rounding at most (~1e-7 relative),
    and far less over many chunks (1e-10 at 25 M elements), where one float32 norm over the whole
    tensor is 3e-3 off. A float64 copy costs 10–25× more at large vocabularies (the input table and
    the head are 25 M elements each at V = 50257, D = 512)."""
    flat = t.reshape(-1)
    whole = flat.numel() - flat.numel() % chunk
    norms = torch.linalg.vector_norm(flat[:whole].view(-1, chunk), dim=1, dtype=torch.float32)
    total = norms.double().pow(2).sum()
    return total + flat[whole:].double().pow(2).sum()


# --------------------------------------------------------------------------- modules


class TrainModule(nn.Module):
    """pp = 1: the whole model plus the objective, so DeepSpeed's engine sees one forward.
    Training: the mean loss. Evaluation (evaluate=True): per row, Σ ELBO and Σ joint [B, 2]."""

    def __init__(self, model: PrimeTransformer, objective: PrimeObjective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, yt, x0, t, mask=None, evaluate: bool = False):
        logits = self.model(yt)
        if evaluate:
            return self.objective.sequence_sums(logits, x0, yt, t, mask)
        return self.objective(logits, (x0, yt, t, mask))  # the training loss (backward follows)


class _PoisonGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward. A vetoed step (a loss spike) backpropagates
    through it: every gradient becomes NaN and the optimizer's own non-finite check drops the
    update, exactly as for a NaN loss (DeepSpeed's ZeRO and bf16 optimizers, our ZeRO-0 clipping
    path), with the LR schedule held and the step counted as skipped. One drop path for both."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class _GuardedLoss:
    """Pipeline loss function of training (last stage): the objective, plus the loss-spike veto.
    When the engine has a loss ceiling, the step's loss (mean over this rank's micro-batches, then
    over DP) is known at the last micro-batch's forward, before any backward of it: above the
    ceiling, that micro-batch's gradient is poisoned. DP peers of the last stage reach this point of
    the schedule alike, so the all-reduce over them cannot cross another collective."""

    def __init__(self, objective: PrimeObjective, engine: "Engine"):
        self.objective, self.engine = objective, engine
        self.reset()

    def reset(self) -> None:
        self.total, self.count = None, 0

    def __call__(self, logits_shard, labels):
        loss = self.objective(logits_shard, labels)
        engine = self.engine
        if engine.loss_ceiling is None:
            return loss
        # the very operations by which DeepSpeed's pipeline engine forms the loss train_batch returns,
        # so that the veto here and the engine's report of it (from that loss) always agree
        if self.total is None:
            self.total = torch.zeros_like(loss)
        self.total += loss.detach()
        self.count += 1
        if self.count == engine.gas:
            mean = self.total / engine.gas
            if engine.state.dp > 1:
                dist.all_reduce(mean, group=engine.state.dp_group)
                mean /= engine.state.dp
            if engine.veto_above(mean, engine.loss_ceiling):
                loss = _PoisonGradient.apply(loss)
            self.reset()
        return loss


class _SequenceSums:
    """Pipeline loss function of evaluation: per row, Σ ELBO and Σ joint [B, 2]."""

    def __init__(self, objective: PrimeObjective):
        self.objective = objective

    def __call__(self, logits_shard, labels):
        x0, yt, t, mask = labels
        return self.objective.sequence_sums(logits_shard, x0, yt, t, mask)


@dataclass
class StepResult:
    loss: float  # the training objective, mean over the global batch
    grad_norm: Optional[float]  # before clipping
    skipped: bool  # the update was dropped (a non-finite gradient norm, or a spike)
    lr: float  # the learning rate this step used
    spike: bool = False  # the loss exceeded the step's ceiling: the update was dropped before it was applied


# --------------------------------------------------------------------------- the engine


class Engine:
    """One interface over DeepSpeed's engine (pp = 1) and pipeline engine (pp > 1)."""

    def __init__(self, cfg: Config, state: ParallelState, vocab_size: int, init_from: Optional[str] = None):
        deepspeed = import_deepspeed()

        self.cfg, self.state = cfg, state
        self.args = ModelArgs.from_config(cfg, vocab_size, tp=state.tp, tp_rank=state.tp_rank)
        self.objective = PrimeObjective(vocab_size, cfg.model.ell, cfg.model.objective, cfg.model.carry_over,
                                        tp_rank=state.tp_rank, tp_group=state.tp_group)
        self.gas = grad_accumulation_steps(cfg, state.dp)
        self.pipeline = state.pp > 1
        self.zero_stage = resolve_zero_stage(cfg, state.dp)  # what DeepSpeed runs (fp32 over one DP rank: 0)
        ds_cfg = deepspeed_config(cfg, state.dp)
        if self._own_clipping:
            ds_cfg["gradient_clipping"] = 0.0

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))

        if self.pipeline:
            from deepspeed.pipe import LayerSpec, PipelineModule

            # megatron's state exists already: the TP layers are built inside this constructor
            self._guarded_loss = _GuardedLoss(self.objective, self)
            module = PipelineModule(layers=[LayerSpec(cls, **kw) for cls, kw in layer_builders(self.args)],
                                    topology=state.topology, loss_fn=self._guarded_loss,
                                    partition_method="type:Block")
            mpu = None  # DeepSpeed's pipeline engine takes its groups from the topology
        else:
            module = TrainModule(PrimeTransformer(self.args), self.objective)
            mpu = MegatronMPU()
        if init_from is not None:  # consolidated weights, resharded to this layout before DeepSpeed copies them
            from prime_scale.export.reshard import load_consolidated_into

            load_consolidated_into(module, init_from, name_map=name_map(module), tp_rank=state.tp_rank,
                                   tp_size=state.tp)
        self.ds, _, _, self.lr_scheduler = deepspeed.initialize(
            model=module, model_parameters=parameter_groups(module, cfg.optim.weight_decay), config=ds_cfg,
            mpu=mpu, lr_scheduler=scheduler, dist_init_required=False)
        undo_priming_step(self.ds.optimizer)  # bf16 without ZeRO: DeepSpeed stepped AdamW once already
        if self.pipeline and self.zero_stage == 0 and state.dp == 1:  # as _gradient_reduction at pp = 1: the
            self.ds.pipeline_enable_backward_allreduce = False  # one-rank reduce, 3% of a step (benchmarks.md)
        self.module = module
        self._norm: Optional[float] = None
        self.loss_ceiling: Optional[float] = None  # this step's: a higher loss drops its update (a spike)
        if self._own_clipping:
            self.ds.optimizer.step = self._guarded_step(self.ds.optimizer)
        self.ema = WeightEMA(module, cfg.optim.ema) if cfg.optim.ema > 0 else None

    # ---- gradient norm for fp32 without ZeRO

    @property
    def _own_clipping(self) -> bool:
        """fp32 without ZeRO: DeepSpeed clips but keeps no norm, and in a pipeline it counts
        replicated parameters of later stages nowhere. We measure and clip ourselves there."""
        return self.zero_stage == 0 and self.cfg.precision == "fp32"

    def _guarded_step(self, optimizer):
        """The optimizer's step behind our norm and clipping; a step whose norm is not finite is
        dropped, as DeepSpeed's ZeRO optimizers drop it: `overflow` tells DeepSpeed's engine to count
        it in skipped_steps and to hold the LR schedule."""
        step = optimizer.step

        # functools.wraps keeps the marks torch's LR scheduler put on the step it wrapped: without them
        # every run would warn that optimizer.step() was overridden after the scheduler was made
        @functools.wraps(step)
        def guarded(*args, **kwargs):
            self._clip_before_step(optimizer)
            optimizer.overflow = not math.isfinite(self._norm)
            if optimizer.overflow:
                optimizer.zero_grad(set_to_none=True)
                return None
            return step(*args, **kwargs)

        return guarded

    @torch.no_grad()
    def _clip_before_step(self, optimizer, *_):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        sq = self._squared_norm(params, sum_of_squares)
        if not math.isfinite(float(sq)):  # the same on every model-parallel rank: the sum is reduced
            # a chunk's float32 Σg² overflows above ~3e38 where float64 does not: count again exactly,
            # so that only a truly non-finite gradient drops the step
            sq = self._squared_norm(params, lambda g: g.double().pow(2).sum())
        self._norm = norm = float(sq.sqrt())
        clip = self.cfg.optim.clip
        if clip > 0 and norm > clip:
            for p in params:
                p.grad.mul_(clip / (norm + 1e-6))

    def _squared_norm(self, params, square) -> torch.Tensor:
        """Σ square(grad) over the model: TP-sharded parameters count on every TP rank, replicated
        ones once; stages add up."""
        tp_rank = self.state.tp_rank
        sq = torch.zeros((), dtype=torch.float64, device=self.state.device)
        for p in params:
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                sq += square(p.grad.detach())
        if self.state.tp * self.state.pp > 1:
            dist.all_reduce(sq, group=self.state.model_parallel_group)
        return sq

    # ---- introspection

    @property
    def step(self) -> int:
        """Optimizer steps taken (DeepSpeed's counter; a checkpoint restores it)."""
        return int(self.ds.global_steps)

    def current_lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    # ---- training

    def train_step(self, micro_batches: Sequence[Batch], loss_ceiling: Optional[float] = None) -> StepResult:
        """One optimizer step over this rank's micro-batches of the global batch (gas of them).
        With a loss ceiling, a step whose loss (over the global batch) exceeds it has its update
        dropped before it is applied (the loss-spike policy; the same on every rank)."""
        if len(micro_batches) != self.gas:
            raise ValueError(f"train_step needs {self.gas} micro-batches (gradient accumulation), got {len(micro_batches)}")
        lr = self.current_lr()
        device = self.state.device
        skipped_before = int(self.ds.skipped_steps)
        self.loss_ceiling = loss_ceiling
        if self.pipeline:
            self._guarded_loss.reset()
            data = iter([(b.yt, b.labels()) for b in (m.to(device) for m in micro_batches)])
            loss = float(self.ds.train_batch(data_iter=data))
        else:
            self.ds.train()
            # on the compute device: NCCL reduces only GPU tensors
            total = torch.zeros((), dtype=torch.float64, device=device)
            for i, b in enumerate(micro_batches):
                b = b.to(device)
                mean = self.ds(b.yt, b.x0, b.t, b.mask)
                total += mean.detach().double()
                if i == len(micro_batches) - 1:
                    # every micro-batch has the same token count: the global mean is the mean of means,
                    # known before the last backward, so a spike's update can still be dropped
                    total /= len(micro_batches)
                    if self.state.dp > 1:
                        dist.all_reduce(total, group=self.state.dp_group)
                        total /= self.state.dp
                    if loss_ceiling is not None and self.veto_above(total, loss_ceiling):
                        mean = _PoisonGradient.apply(mean)
                with self._gradient_reduction():
                    self.ds.backward(mean)
                self.ds.step()
            loss = float(total)
        skipped = int(self.ds.skipped_steps) > skipped_before
        if self.ema is not None and not skipped:  # a dropped update leaves every weight as it was
            self.ema.update()
        # decided from the loss every rank holds, as the veto was: the same answer on every rank
        spike = loss_ceiling is not None and self.veto_above(loss, loss_ceiling)
        # a vetoed step's norm is the poison's, not the gradient's
        norm = None if spike else (self._norm if self._own_clipping else self.ds.get_global_grad_norm())
        return StepResult(loss=loss, grad_norm=None if norm is None else float(norm), lr=lr, skipped=skipped,
                          spike=spike)

    def _gradient_reduction(self):
        """Where the backward's DP all-reduce of the gradients runs. ZeRO 0 over one data-parallel
        rank has nothing to average, but DeepSpeed still flattens every gradient into a buffer,
        "reduces" it over the one rank and copies it back (a quarter of the step's non-matmul time at
        V = 50257 on CPU): its public no_sync() skips that, and the gradients are bitwise the same."""
        if self.zero_stage == 0 and self.state.dp == 1:
            return self.ds.no_sync()
        return contextlib.nullcontext()

    @staticmethod
    def veto_above(loss, ceiling: float) -> bool:
        """A finite loss above the ceiling (a non-finite one is dropped by the optimizer anyway)."""
        value = float(loss)
        return math.isfinite(value) and value > ceiling

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self, micro_batches: Sequence[Batch], use_ema: bool = True) -> torch.Tensor:
        """Per row of this rank's micro-batches, in order: Σ sub-token ELBO and Σ joint objective
        over its counted positions, [ΣB, 2] float64 on the CPU, the same on every rank of the
        model replica (TP peers compute it alike; the last pipeline stage broadcasts it). With EMA
        on, the averaged weights are evaluated. Summing over DP ranks is the caller's."""
        ctx = self.ema.swapped() if (use_ema and self.ema is not None) else contextlib.nullcontext()
        with ctx:
            if self.pipeline:
                return self._evaluate_pipeline(micro_batches)
            return self._evaluate_plain(micro_batches)

    def _evaluate_plain(self, micro_batches):
        self.ds.eval()
        out = [self.ds(b.yt, b.x0, b.t, b.mask, evaluate=True).double().cpu()
               for b in (m.to(self.state.device) for m in micro_batches)]
        self.ds.train()
        return torch.cat(out)

    def _evaluate_pipeline(self, micro_batches):
        device = self.state.device
        data = iter([(b.yt, b.labels()) for b in (m.to(device) for m in micro_batches)])
        saved = self.module.loss_fn
        self.module.loss_fn = _SequenceSums(self.objective)
        # eval_batch adds each output into the training's loss total, which only train_batch resets:
        # our [B, 2] rows would not broadcast into the scalar the last training step left there
        self.ds.total_loss = None
        try:
            # unreduced: the list of per-micro-batch outputs, on the last stage only
            outputs = self.ds.eval_batch(data_iter=data, num_micro_batches=len(micro_batches),
                                         reduce_output=None, bcast_loss=False)
        finally:
            self.module.loss_fn = saved
        rows = sum(b.x0.shape[0] for b in micro_batches)
        sums = torch.zeros(rows, 2, dtype=torch.float64, device=self.state.device)
        if self.ds.is_last_stage():
            sums.copy_(torch.cat([o.double() for o in outputs]))
        # stage s of a replica is global rank tp + TP·dp + TP·DP·s: the last stage has the largest rank
        last = max(dist.get_process_group_ranks(self.state.pp_group))
        dist.broadcast(sums, src=last, group=self.state.pp_group)
        return sums.cpu()
