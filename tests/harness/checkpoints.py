"""Harness for the checkpoint tests: a tiny model of megatron-core tensor-parallel layers, trained by
real DeepSpeed engines (plain or pipeline) in gloo processes started with torchrun.

The test modules call `launch(nproc, scenario)`; the worker (this file run as a script) executes
the scenario's steps and writes JSON results and reference tensors into the scenario's directory.
The reference tensors are computed independently of prime_scale.checkpoint: the live parameters
(or DeepSpeed's fp32 master copies) gathered across TP ranks with torch.distributed and torch.cat.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
V, H, L = 37, 16, 6  # vocab, hidden, sequence length: odd sizes exercise ZeRO and TP padding
N_BLOCKS = 2
SEED = 1234


def launch(nproc: int, scenario: dict, workdir: Path, timeout: float = 240) -> dict:
    """Run the worker on nproc gloo processes; return rank 0's results (raises with the logs on failure)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "scenario.json"
    spec.write_text(json.dumps(scenario))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TMPDIR=str(workdir),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={port}", "--master-addr=127.0.0.1", __file__, str(spec)]
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads((workdir / "results.json").read_text())


def popen_single(args: list[str], workdir: Path) -> subprocess.Popen:
    """One worker process (world size 1) without torchrun, so that a test can kill it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TMPDIR=str(workdir), RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    return subprocess.Popen([sys.executable, __file__, *args], env=env, cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# =========================================================================== worker side
# Everything below runs inside the gloo processes.


def _setup_process():
    import importlib

    import torch.distributed as dist

    dist.init_process_group("gloo")
    import deepspeed

    # the CPU accelerator's shared-memory op is only for inference all-reduce; skip its JIT build
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
    deepspeed.init_distributed("gloo")


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


def _save_refs(run: Run, refs: dict, path_prefix: Path):
    import torch

    tp, pp, dp = run.coords()
    if tp == 0 and dp == 0:
        torch.save(refs, f"{path_prefix}_pp{pp}.pt")


def load_refs(path_prefix: Path) -> dict:
    import glob

    import torch

    out = {}
    for f in sorted(glob.glob(f"{path_prefix}_pp*.pt")):
        out.update(torch.load(f, weights_only=True))
    return out


def worker_layouts(sc: dict, work: Path) -> dict:
    """For each layout: train, save, take one more step, rebuild with other weights, load, repeat the
    step (exact resume), record references; then reshard consolidated checkpoints into other layouts."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    results = {}
    for lay in sc["layouts"]:
        name = lay["name"]
        ckpt = work / name / "ckpt"
        run = Run(lay)
        for _ in range(2):
            run.train_step()
        run.save(ckpt, keep_last=1)
        master = run.bf16 or lay.get("zero", 0) > 0
        _save_refs(run, run.full_reference(master), work / name / "ref")
        if lay.get("ema"):
            _save_refs(run, run.ema_reference(), work / name / "ema_ref")
        ev = run.eval_loss()
        after = [run.train_step()]
        run.close()

        fresh = Run(lay, init_seed=SEED + 17)  # other initial weights: the load must overwrite them
        before = fresh.eval_loss()
        fresh.load(ckpt)
        resumed_eval = fresh.eval_loss()
        resumed = [fresh.train_step()]
        fresh.close()
        results[name] = {"eval": ev, "fresh_eval": before, "resumed_eval": resumed_eval, "after": after,
                         "resumed": resumed}

    from prime_scale.export.consolidate import consolidate
    from prime_scale.checkpoint.catalog import find_latest_complete

    for rs in sc.get("reshard", []):
        src = work / rs["from"]
        out = work / f"{rs['name']}_consolidated"
        if rank == 0:
            consolidate(find_latest_complete(src / "ckpt"), out, weights="raw")
        dist.barrier()
        target = dict(rs["target"], load_consolidated=str(out))
        run = Run(target, init_seed=SEED + 5)
        ref = load_refs(src / "ref")
        mismatch = []
        for pname, p in run.engine.module.named_parameters():
            full = ref[pname]
            if pname in UNPADDED:  # this layout's padding rows: zero
                full = torch.cat([full, torch.zeros(padded(V, run.tp) - V, *full.shape[1:])])
            want = full
            if getattr(p, "tensor_model_parallel", False) and run.tp > 1:
                want = torch.chunk(full, run.tp, dim=p.partition_dim)[run.coords()[0]]
            got = (p.ds_tensor if hasattr(p, "ds_id") else p).detach().float()
            if not hasattr(p, "ds_id") and not torch.equal(got, want.to(p.dtype).float()):
                mismatch.append(pname)
        results[rs["name"]] = {"eval": run.eval_loss(), "mismatch": mismatch}
        run.close()
    return results


def worker_single(args: list[str]) -> None:
    """World size 1 commands for the crash / resume / safety tests (see test_checkpoint_resume.py)."""
    import torch

    cmd, work = args[0], Path(args[1])
    sc = json.loads(args[2]) if len(args) > 2 else {}
    lay = {"tp": 1, "pp": 1, "zero": sc.get("zero", 1), "dropout": 0.1, "micro_batch": 2, "global_batch": 4,
           "ema": True}
    ckpt = work / "ckpt"
    run = Run(lay)
    losses = []
    if cmd == "train":  # steps with saves at the given steps; optionally hang inside one save
        hang_at = sc.get("hang_at_save")
        if hang_at is not None:
            _hang_in_save(run, hang_at, work / "hanging")
        for step in range(1, sc["steps"] + 1):
            losses.append(run.train_step())
            (work / "train_losses.json").write_text(json.dumps(losses))  # survives a kill
            if step in sc.get("save_at", []):
                run.save(ckpt, keep_last=sc.get("keep_last"), tokenizer=sc.get("tokenizer"))
    elif cmd == "resume":
        r = run.load(ckpt, sc.get("tag"))
        while run.step < sc["steps"]:
            losses.append(run.train_step())
            if run.step in sc.get("save_at", []):
                run.save(ckpt, keep_last=sc.get("keep_last"), tokenizer=sc.get("tokenizer"))
        (work / "resumed_from").write_text(r.path.name)
        if sc.get("then_load"):  # then try a (tampered) checkpoint elsewhere: record how it ends
            try:
                run.load(Path(sc["then_load"]), None)
                outcome = "loaded"
            except Exception as e:  # the safety test expects a refusal
                outcome = f"{type(e).__name__}: {e}"
            (work / "then_load.txt").write_text(outcome)
    (work / f"{cmd}_losses.json").write_text(json.dumps(losses))
    del torch


def _hang_in_save(run: Run, step: int, marker: Path):
    """Make the process stop in the middle of the save at `step`, after DeepSpeed wrote its first file,
    so that the test can kill it there: a real crash point, not a simulated folder."""
    import time

    engine_ce = run.engine.checkpoint_engine
    original = engine_ce.save

    def save(state_dict, path):
        original(state_dict, path)
        if run.step == step:
            marker.write_text(path)
            time.sleep(3600)

    engine_ce.save = save


def _main():
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if sys.argv[1].endswith(".json"):
        spec = Path(sys.argv[1])
        sc = json.loads(spec.read_text())
        _setup_process()
        import torch.distributed as dist

        results = worker_layouts(sc, spec.parent)
        if dist.get_rank() == 0:
            (spec.parent / "results.json").write_text(json.dumps(results, indent=1))
        dist.barrier()
        dist.destroy_process_group()
    else:
        _setup_process()
        worker_single(sys.argv[1:])


if __name__ == "__main__":
    _main()
