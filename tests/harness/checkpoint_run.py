"""The model side of the checkpoint harness: megatron-core TP layers in a tiny model, trained by a real
DeepSpeed engine (plain or pipeline), with its own data stream, EMA and reference tensors gathered
independently of prime_scale.checkpoint. Imported by checkpoint_worker.py inside the gloo processes."""

from __future__ import annotations

import os
from pathlib import Path

from checkpoints import N_BLOCKS, SEED, H, L, V  # this folder is sys.path[0] in the worker processes


def _megatron(tp: int, pp: int, seed: int = SEED):
    from megatron.core import parallel_state as ps

    from prime_scale.parallel.cpu_compat import seed_model_parallel_stream

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_model_parallel_stream(seed, ps.get_tensor_model_parallel_rank())
    return ps


class Mpu:
    """The minimal megatron-style adapter DeepSpeed's plain engine asks for (pp = 1)."""

    def __init__(self, ps):
        self.ps = ps

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()


def _layers(tp: int, dropout: float):
    """The model as a list of (class, kwargs): embedding, N_BLOCKS MLP blocks, vocab-parallel head."""
    import torch
    from megatron.core import tensor_parallel as mtp
    from megatron.core.model_parallel_config import ModelParallelConfig

    cfg = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                              params_dtype=torch.float32, perform_initialization=True)
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731

    def init_vocab(w):  # rows past V pad the vocabulary to a multiple of TP: zero, and never trained
        with torch.no_grad():
            w.zero_()
            w[:V].normal_(std=0.2)

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = mtp.VocabParallelEmbedding(padded(V, tp), H, init_method=init_vocab, config=cfg)

        def forward(self, ids):
            return self.emb(ids)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(H)
            self.fc1 = mtp.ColumnParallelLinear(H, 4 * H, config=cfg, init_method=init, bias=True,
                                                gather_output=False)
            self.fc2 = mtp.RowParallelLinear(4 * H, H, config=cfg, init_method=init, bias=True,
                                             input_is_parallel=True, skip_bias_add=False)
            self.drop = torch.nn.Dropout(dropout)

        def forward(self, h):
            y, _ = self.fc1(self.ln(h))
            with mtp.get_cuda_rng_tracker().fork():  # TP-split activations: the per-TP-rank stream
                y = self.drop(torch.nn.functional.gelu(y))
            z, _ = self.fc2(y)
            return h + self.drop(z)  # replicated activations: the default stream

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(H)
            self.out = mtp.ColumnParallelLinear(H, padded(V, tp), config=cfg, init_method=init_vocab,
                                                bias=False, gather_output=False)

        def forward(self, h):
            logits, _ = self.out(self.ln(h))
            return logits

    return [Embed] + [Block] * N_BLOCKS + [Head]


def padded(size: int, tp: int) -> int:
    return -(-size // tp) * tp


UNPADDED = {"0.emb.weight": V, f"{N_BLOCKS + 1}.out.weight": V}  # canonical name -> true rows


def _loss(logits, labels):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as mtp

    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    pad = torch.arange(start, start + local) >= V  # padding classes: masked, so they get no gradient
    logits = logits.float().masked_fill(pad, -1e4).contiguous()
    return mtp.vocab_parallel_cross_entropy(logits, labels).mean()


def _seed_layer(seed: int):
    import torch

    torch.manual_seed(seed)


def build_model(tp: int, pp: int, dp: int, dropout: float, init_seed: int = SEED):
    """A plain nn.Sequential (pp = 1) or a DeepSpeed PipelineModule. Both name parameters
    '<layer index>.<name>' and seed every layer alike, so all layouts start from the same weights."""
    import torch

    classes = _layers(tp, dropout)
    if pp == 1:
        mods = []
        for i, cls in enumerate(classes):
            _seed_layer(init_seed + i)
            mods.append(cls())

        class Seq(torch.nn.Sequential):
            def forward(self, ids, labels):
                return _loss(super().forward(ids), labels)

            def logits(self, ids):
                return torch.nn.Sequential.forward(self, ids)

        return Seq(*mods)
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    return PipelineModule(layers=[LayerSpec(c) for c in classes], loss_fn=_loss, topology=topo,
                          partition_method="uniform", seed_layers=True, base_seed=init_seed, seed_fn=_seed_layer)


class Loader:
    """A stateful data stream: its own NumPy generator (state_dict/load_state_dict) plus draws from the
    global python and NumPy generators, so exact resume needs every one of them restored."""

    def __init__(self, seed: int, global_batch: int):
        import numpy as np

        self.rs = np.random.RandomState(seed)
        self.g = global_batch

    def next_global(self):
        import random

        import numpy as np
        import torch

        ids = torch.from_numpy(self.rs.randint(0, V, size=(self.g, L))).long()
        ids = ids[torch.from_numpy(np.random.permutation(self.g))]
        shift = random.randrange(V)
        labels = (ids.roll(-1, dims=1) + shift) % V
        return ids, labels

    def state_dict(self):
        import torch

        kind, keys, pos, has_gauss, cached = self.rs.get_state()
        return {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss),
                "cached": float(cached)}

    def load_state_dict(self, s):
        import numpy as np

        self.rs.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


class Run:
    """One engine in one layout."""

    def __init__(self, sc: dict, init_seed: int = SEED):
        import deepspeed
        import torch
        import torch.distributed as dist

        self.sc = sc
        self.tp, self.pp = sc.get("tp", 1), sc.get("pp", 1)
        world = dist.get_world_size()
        self.dp = world // (self.tp * self.pp)
        self.ps = _megatron(self.tp, self.pp)
        self.bf16 = sc.get("precision", "fp32") == "bf16"
        self.mb = sc.get("micro_batch", 2)
        self.g = sc.get("global_batch", 8)  # fixed across layouts: micro-batches absorb the difference
        self.ga = self.g // (self.mb * self.dp)
        import random

        import numpy as np

        torch.manual_seed(SEED)
        random.seed(SEED)
        np.random.seed(SEED)
        self.model = build_model(self.tp, self.pp, self.dp, sc.get("dropout", 0.0), init_seed)
        if sc.get("load_consolidated"):
            from prime_scale.export.reshard import load_consolidated_into

            load_consolidated_into(self.model, sc["load_consolidated"],
                                   tp_rank=self.ps.get_tensor_model_parallel_rank(), tp_size=self.tp)
        ds_cfg = {
            "train_batch_size": self.g, "train_micro_batch_size_per_gpu": self.mb,
            "gradient_accumulation_steps": self.ga,
            "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.01, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 5e-3, "warmup_max_lr": 2e-2,
                                                          "warmup_num_steps": 4}},
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": sc.get("zero", 0)},
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10 ** 9,
        }
        kw = {} if self.pp > 1 else {"mpu": Mpu(self.ps)}
        self.engine, *_ = deepspeed.initialize(model=self.model, config=ds_cfg,
                                               model_parameters=[p for p in self.model.parameters()], **kw)
        self.dp_rank = (self.engine.grid.get_data_parallel_rank() if self.pp > 1
                        else self.ps.get_data_parallel_rank())
        self.loader = Loader(SEED, self.g)
        self.ema = None
        self.step = 0

    def _micro(self, ids, labels):
        rows = self.mb * self.ga
        ids = ids[self.dp_rank * rows:(self.dp_rank + 1) * rows]
        labels = labels[self.dp_rank * rows:(self.dp_rank + 1) * rows]
        return [(ids[i * self.mb:(i + 1) * self.mb], labels[i * self.mb:(i + 1) * self.mb]) for i in range(self.ga)]

    def train_step(self) -> float:
        import torch
        import torch.distributed as dist

        self.engine.train()
        micro = self._micro(*self.loader.next_global())
        if self.pp > 1:
            loss = float(self.engine.train_batch(iter(micro)))
        else:
            total = 0.0
            for ids, labels in micro:
                out = self.engine(ids, labels)
                self.engine.backward(out)
                self.engine.step()
                total += float(out.detach().float())
            t = torch.tensor([total / self.ga], dtype=torch.float64)
            dist.all_reduce(t, group=self.ps.get_data_parallel_group())
            loss = float(t) / self.dp
        self.step += 1
        if self.sc.get("ema"):
            self._update_ema()
        return loss

    def _update_ema(self):
        import torch

        with torch.no_grad():  # ZeRO-3: the average of this rank's partition, as the trainer keeps it
            cur = {n: getattr(p, "ds_tensor", p).detach().float().clone()
                   for n, p in self.engine.module.named_parameters()}
            if self.ema is None:
                self.ema = cur
            else:
                for n, v in cur.items():
                    self.ema[n].mul_(0.5).add_(v, alpha=0.5)

    def eval_loss(self, seed: int = 99) -> float:
        """Loss of a fixed batch, dropout off; every data-parallel rank takes its share."""
        import torch
        import torch.distributed as dist

        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, V, (self.g, L), generator=gen)
        labels = torch.randint(0, V, (self.g, L), generator=gen)
        micro = self._micro(ids, labels)
        self.engine.eval()
        with torch.no_grad():
            if self.pp > 1:
                return float(self.engine.eval_batch(iter(micro)))
            vals = [float(self.engine(i, l).float()) for i, l in micro]
        t = torch.tensor([sum(vals) / len(vals)], dtype=torch.float64)
        dist.all_reduce(t, group=self.ps.get_data_parallel_group())
        return float(t) / self.dp

    def save(self, ckpt_dir, keep_last=None, tokenizer=None):
        from prime_scale.checkpoint import store

        return store.save(self.engine, ckpt_dir, self.step,
                          extra_state={"loader": self.loader.state_dict(), "step": self.step},
                          ema=self.ema, keep_last=keep_last, unpadded=UNPADDED,
                          meta={"recipe": {"model": {"ell": 2, "vocab_size": V, "objective": "prime_elbo"}},
                                "vocab_size": V, "tokenizer": tokenizer, "note": "harness"})

    def load(self, ckpt_dir, tag=None):
        from prime_scale.checkpoint import store

        r = store.load(self.engine, ckpt_dir, tag)
        self.loader.load_state_dict(r.extra["loader"])
        self.step = r.extra["step"]
        self.ema = None if r.ema is None else {k: v.clone() for k, v in r.ema.items()}
        return r

    def full_reference(self, master: bool) -> dict:
        """Full (TP-gathered) tensors of this pipeline stage, from the live engine: the fp32 master copy
        where the optimizer keeps one, else the module weights. Collective."""
        import deepspeed
        import torch
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_fp32_param

        tp_group = self.ps.get_tensor_model_parallel_group()
        out = {}
        for name, p in self.engine.module.named_parameters():
            if hasattr(p, "ds_id"):  # ZeRO-3
                if master:
                    local = safe_get_full_fp32_param(p)
                else:
                    with deepspeed.zero.GatheredParameters([p]):
                        local = p.detach().clone()
            else:
                local = safe_get_full_fp32_param(p) if master else None
                if local is None:
                    local = p.detach().clone()
            local = local.float().contiguous()
            if getattr(p, "tensor_model_parallel", False) and self.tp > 1:
                parts = [torch.empty_like(local) for _ in range(self.tp)]
                dist.all_gather(parts, local, group=tp_group)
                local = torch.cat(parts, dim=p.partition_dim)
            out[name] = local[:V] if name in UNPADDED else local
        return out

    def ema_reference(self) -> dict:
        import torch
        import torch.distributed as dist

        out = {}
        for name, p in self.engine.module.named_parameters():
            local = self.ema[name].contiguous()
            if hasattr(p, "ds_tensor"):  # ZeRO-3 partitions: gather over the data-parallel group
                parts = [torch.empty_like(local) for _ in range(self.dp)]
                dist.all_gather(parts, local, group=self.ps.get_data_parallel_group())
                local = torch.cat(parts)[:p.ds_numel].view(p.ds_shape)
            if getattr(p, "tensor_model_parallel", False) and self.tp > 1:
                parts = [torch.empty_like(local) for _ in range(self.tp)]
                dist.all_gather(parts, local, group=self.ps.get_tensor_model_parallel_group())
                local = torch.cat(parts, dim=p.partition_dim)
            out[name] = local[:V] if name in UNPADDED else local
        return out

    def coords(self):
        if self.pp > 1:
            g = self.engine.grid
            return g.get_slice_parallel_rank(), g.get_pipe_parallel_rank(), g.get_data_parallel_rank()
        return self.ps.get_tensor_model_parallel_rank(), 0, self.ps.get_data_parallel_rank()

    def close(self):
        import gc

        self.engine.destroy() if hasattr(self.engine, "destroy") else None
        del self.engine, self.model
        gc.collect()
