"""The one parallel-state module: process group, megatron-core groups, DeepSpeed topology, seeds.

Start-up order (measured with deepspeed 0.19 and megatron-core 0.16; others fail, docs/training.md):
  read the launcher's environment → threads per rank → torch process group (gloo on CPU, nccl on
  GPU) → skip DeepSpeed's CPU shared-memory op → deepspeed.init_distributed →
  megatron initialize_model_parallel(tp, pp) → DeepSpeed PipeModelDataParallelTopology, checked
  against megatron's groups rank by rank → seeds.

Rank layout shared by both libraries: rank = tp_rank + TP·dp_rank + TP·DP·pp_rank (megatron's
default order "tp-cp-ep-dp-pp"; DeepSpeed's axes pipe, data, model). We refuse to run if they
ever disagree, because a silent mismatch trains with the wrong peers.

This is the one module that reads megatron-core's global parallel state: everything else (the model,
the losses, the engine, checkpoints) is handed the sizes, ranks and groups held in ParallelState.
"""

from __future__ import annotations

import datetime
import importlib
import os
import random
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from prime_scale.config import Config, resolve_dp
from prime_scale.errors import UserError
from prime_scale.parallel import cpu_compat
from prime_scale.parallel.launch import LaunchEnv, read_launch_env, threads_per_rank

# --------------------------------------------------------------------------- the state


@dataclass
class ParallelState:
    """Where this process sits: sizes, coordinates, groups and DeepSpeed's topology."""

    tp: int
    pp: int
    dp: int
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    local_rank: int
    device: torch.device
    topology: object  # deepspeed PipeModelDataParallelTopology
    threads: int
    tp_group: object  # torch process groups (megatron's)
    dp_group: object
    pp_group: object  # the pipeline stages of this rank's replica (validation sums travel on it)
    model_parallel_group: object  # TP × PP: the ranks that hold one replica of the model

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes metrics and prints: global rank 0 sees the last stage's loss after
        DeepSpeed broadcasts it, and every other value is replicated."""
        return self.rank == 0

    def describe(self) -> str:
        return (f"world {self.world_size} = tp {self.tp} × pp {self.pp} × dp {self.dp}; "
                f"{self.threads} thread(s) per rank on {self.device.type}")


_STATE: Optional[ParallelState] = None


def is_initialized() -> bool:
    return _STATE is not None


def get_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("prime_scale.parallel.state.init() has not been called in this process")
    return _STATE


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU a rank uses among the `visible` ones: its LOCAL_RANK, or the only one there is
    (one GPU per process: srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per rank)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise UserError(f"LOCAL_RANK={local_rank} but this process sees {visible} GPU(s); launch at most one "
                    "process per GPU (or give each process exactly one, e.g. srun --gpus-per-task=1)")


def compute_device(local_rank: int) -> torch.device:
    """The device a rank computes on: its GPU, or the CPU on a machine without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count()))


def library_environment(env: LaunchEnv, device: torch.device) -> dict:
    """The launcher variables every library below reads, from the ONE device decision above.
    DeepSpeed's engine (set_device(LOCAL_RANK)), its PipelineModule (.to(cuda:LOCAL_RANK)) and its
    init_process_group (device_id) each pick the GPU again from LOCAL_RANK, so LOCAL_RANK must be
    the index of our device among the visible ones - not the node-local rank: under
    srun --gpus-per-task=1 or a per-rank CUDA_VISIBLE_DEVICES, task 3 of a node sees one GPU,
    cuda:0, and LOCAL_RANK=3 would be an invalid device ordinal."""
    local = device.index if device.type == "cuda" and device.index is not None else env.local_rank
    return {"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(local),
            "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)}


def set_default_group_timeout(timeout: datetime.timedelta) -> tuple:
    """Make `timeout` the default of every process group created from now on; returns what to put
    back. DeepSpeed builds its pipeline grid, tied-weight and world groups with
    dist.new_group(ranks) and no timeout, which torch resolves at call time from these module
    defaults (NCCL: 10 minutes), not from the timeout the world group was given: a slow save or
    a long first compile on one stage would then abort the job at 10 minutes instead of 30."""
    c10d = dist.distributed_c10d
    before = (c10d.default_pg_timeout, c10d.default_pg_nccl_timeout)
    c10d.default_pg_timeout = timeout
    if isinstance(before[1], datetime.timedelta):  # None where torch was built without NCCL
        c10d.default_pg_nccl_timeout = timeout
    return before


def restore_default_group_timeout(before: tuple) -> None:
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = before


def tp_overlap_env(tp: int, use_cuda: bool, environ: Mapping[str, str]) -> dict:
    """The variables to set before CUDA starts: megatron's TP linear layers issue the input
    gradient's all-reduce asynchronously and rely on CUDA_DEVICE_MAX_CONNECTIONS=1 to have it
    scheduled before the weight-gradient GEMM, so the two overlap (megatron warns otherwise). The
    driver reads it when the CUDA context is created: only then, only for GPU runs with TP > 1,
    and never over the user's own value."""
    if use_cuda and tp > 1 and "CUDA_DEVICE_MAX_CONNECTIONS" not in environ:
        return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    return {}


def collective_device() -> torch.device:
    """Where tensors for a collective of the current process group must live (NCCL: the GPU)."""
    if _STATE is not None:
        return _STATE.device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def import_deepspeed():
    """deepspeed, imported with the accelerator of this machine: it picks one when first imported."""
    if not torch.cuda.is_available():
        cpu_compat.use_deepspeed_cpu_accelerator()
    import deepspeed

    return deepspeed


def _skip_deepspeed_shm_op() -> None:
    # The CPU accelerator JIT-builds a shared-memory all-reduce (~30 s, files in /dev/shm) that only
    # inference all-reduce uses. The module must be fetched by name: `import deepspeed.comm.torch`
    # would bind the torch package.
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_ENV_BEFORE: Optional[dict] = None  # those variables as they were before init() set them
_TIMEOUT_BEFORE: Optional[tuple] = None  # torch's default group timeouts before init() set them


def init(cfg: Config, *, timeout_s: float = 1800.0, environ: Optional[Mapping[str, str]] = None) -> ParallelState:
    """Bring up every process group for cfg.parallel and return this rank's ParallelState.
    Layout errors (world size vs tp × pp, pinned dp, batch divisibility) are raised before any
    group is created, identically on every rank."""
    global _STATE
    if _STATE is not None:
        raise RuntimeError("parallel state already initialised; call destroy() first")
    env = read_launch_env(environ)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = resolve_dp(cfg, env.world_size)

    threads = threads_per_rank(env.local_world_size, environ)
    torch.set_num_threads(threads)

    use_cuda = torch.cuda.is_available()
    overlap = tp_overlap_env(tp, use_cuda, os.environ)
    if overlap:
        if torch.cuda.is_initialized():  # too late for this process: say so instead of silently losing it
            warnings.warn("CUDA was initialised before the parallel state: CUDA_DEVICE_MAX_CONNECTIONS=1 "
                          "cannot take effect (TP all-reduce/GEMM overlap lost); export it in the launch "
                          "environment", stacklevel=2)
        os.environ.update(overlap)
    # the one device decision; every library below reads it back from LOCAL_RANK
    device = compute_device(env.local_rank)
    if use_cuda:
        torch.cuda.set_device(device)

    # the launcher variables every library below reads (a single process gets them here); destroy()
    # puts back what was there, so a process that loads a model in-process (eval, the lm-eval
    # backend, tests) does not hand this group's port and rank to the processes it starts later
    global _ENV_BEFORE, _TIMEOUT_BEFORE
    _ENV_BEFORE = {key: os.environ.get(key) for key in LAUNCH_KEYS}
    os.environ.update(library_environment(env, device))
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    _TIMEOUT_BEFORE = set_default_group_timeout(timeout)
    if not dist.is_initialized():
        # env:// reads the variables set above; under torchrun it joins the agent's store
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)

    if not use_cuda:
        import_deepspeed()
        _skip_deepspeed_shm_op()
    deepspeed = import_deepspeed()

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)

    from megatron.core import parallel_state as mps

    mps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  distributed_timeout_minutes=max(1, int(timeout_s // 60)),
                                  create_gloo_process_groups=False)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    check_layouts(topology, env.rank)

    _STATE = ParallelState(
        tp=tp, pp=pp, dp=dp, rank=env.rank, world_size=env.world_size,
        tp_rank=mps.get_tensor_model_parallel_rank(), pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(), local_rank=env.local_rank,
        device=device,
        topology=topology, threads=threads, tp_group=mps.get_tensor_model_parallel_group(),
        dp_group=mps.get_data_parallel_group(), pp_group=mps.get_pipeline_model_parallel_group(),
        model_parallel_group=mps.get_model_parallel_group(),
    )
    seed_everything(cfg.seed, _STATE)
    return _STATE


def destroy() -> None:
    """Tear everything down (tests run several layouts in one process tree)."""
    global _STATE
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    import deepspeed.comm.comm as dscomm

    dscomm.cdb = None
    _STATE = None
    global _ENV_BEFORE, _TIMEOUT_BEFORE
    if _TIMEOUT_BEFORE is not None:
        restore_default_group_timeout(_TIMEOUT_BEFORE)
    _TIMEOUT_BEFORE = None
    for key, value in (_ENV_BEFORE or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _ENV_BEFORE = None


# --------------------------------------------------------------------------- layout agreement


def check_layouts(topology, rank: int) -> None:
    """Compare this rank's coordinates and group members in DeepSpeed's topology with megatron's
    groups. Refuse to run on any difference (it would pair the wrong processes)."""
    from megatron.core import parallel_state as mps

    coord = topology.get_coord(rank)
    ours = {"model": mps.get_tensor_model_parallel_rank(), "pipe": mps.get_pipeline_model_parallel_rank(),
            "data": mps.get_data_parallel_rank()}
    theirs = {"model": coord.model, "pipe": coord.pipe, "data": coord.data}
    groups = {"model": mps.get_tensor_model_parallel_group(), "pipe": mps.get_pipeline_model_parallel_group(),
              "data": mps.get_data_parallel_group()}
    for axis, group in groups.items():
        members = sorted(dist.get_process_group_ranks(group))
        ds_members = next(sorted(lst) for lst in topology.get_axis_comm_lists(axis) if rank in lst) \
            if topology.get_dim(axis) > 1 else [rank]
        if ours[axis] != theirs[axis] or members != ds_members:
            raise UserError(
                f"rank {rank}: megatron-core and DeepSpeed disagree on the '{axis}' axis "
                f"(megatron: coordinate {ours[axis]}, group {members}; DeepSpeed: coordinate "
                f"{theirs[axis]}, group {ds_members}). Both must use rank = tp + TP·dp + TP·DP·pp; "
                "this build of the libraries changed its rank order - refusing to train with wrong peers")


# --------------------------------------------------------------------------- DeepSpeed's view of megatron's groups


class MegatronMPU:
    """The mpu interface DeepSpeed's (non-pipeline) engine asks for, answered from megatron-core's
    groups. "Model parallel" means TP × PP, "data parallel" the replicas that reduce gradients."""

    def __init__(self):
        from megatron.core import parallel_state as mps

        self._mps = mps

    def get_model_parallel_rank(self):
        return dist.get_rank(self._mps.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self._mps.get_model_parallel_group())

    def get_model_parallel_group(self):
        return self._mps.get_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self._mps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._mps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._mps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self):
        return self._mps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_rank(self):
        return self._mps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._mps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._mps.get_pipeline_model_parallel_group()

    def get_data_parallel_rank(self):
        return self._mps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._mps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._mps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self._mps.get_data_parallel_group())


# --------------------------------------------------------------------------- seeds


def seed_everything(seed: int, state: ParallelState) -> None:
    """Dropout and any host-side randomness. Identical across TP peers (their replicated
    activations must drop the same units), different across pipeline stages and DP replicas.
    The TP-sharded regions (attention heads) draw from megatron's per-TP-rank stream.
    Weights are NOT seeded here: the model seeds each layer from (seed, layer index), so the
    initial weights are the same under every layout. Prime noise has its own keyed generator."""
    default_seed = seed + 100 * state.pp_rank + 10_007 * state.dp_rank
    random.seed(default_seed)
    torch.manual_seed(default_seed)
    try:
        import numpy as np

        np.random.seed(default_seed % 2**32)
    except ImportError:
        pass
    cpu_compat.seed_model_parallel_stream(default_seed, state.tp_rank)
