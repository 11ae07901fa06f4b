"""The one parallel-state module: process group, megatron-core groups, DeepSpeed topology, seeds.

Start-up order (measured in ../shared/docs/stack-notes.md; others fail):
  read the launcher's environment → threads per rank → torch process group (gloo on CPU, nccl on
  GPU) → skip DeepSpeed's CPU shared-memory op → deepspeed.init_distributed →
  megatron initialize_model_parallel(tp, pp) → DeepSpeed PipeModelDataParallelTopology, checked
  against megatron's groups rank by rank → seeds.

Rank layout shared by both libraries: rank = tp_rank + TP·dp_rank + TP·DP·pp_rank (megatron's
default order "tp-cp-ep-dp-pp"; DeepSpeed's axes pipe, data, model). We refuse to run if they
ever disagree, because a silent mismatch trains with the wrong peers.
"""

from __future__ import annotations

import datetime
import importlib
import os
import random
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from prime_scale.config import Config, resolve_dp
from prime_scale.errors import UserError
from prime_scale.parallel import cpu_compat

LAUNCH_HELP = ("start several processes with `torchrun --nproc-per-node N -m prime_scale.train ...`, "
               "`deepspeed --num_gpus N ...` or `prime-scale train --nproc N`")


# --------------------------------------------------------------------------- launcher environment


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _int_var(environ: Mapping[str, str], name: str) -> Optional[int]:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer; {LAUNCH_HELP}") from None
    if value < 0:
        raise UserError(f"environment variable {name}={value} is negative; {LAUNCH_HELP}")
    return value


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """The rank layout the launcher gave this process. No launcher variables at all means a
    single process. A partial or inconsistent set is an error naming the variable."""
    environ = os.environ if environ is None else environ
    rank, world = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
    local_rank = _int_var(environ, "LOCAL_RANK")
    if rank is None and world is None and local_rank is None:
        return LaunchEnv(0, 1, 0, 1, "127.0.0.1", _free_port())
    missing = [n for n, v in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)) if v is None]
    if missing:
        raise UserError(f"launcher environment incomplete: {', '.join(missing)} not set while "
                        f"{'RANK' if rank is not None else 'WORLD_SIZE' if world is not None else 'LOCAL_RANK'} "
                        f"is; {LAUNCH_HELP}")
    if world < 1:
        raise UserError(f"environment variable WORLD_SIZE={world} must be at least 1")
    if rank >= world:
        raise UserError(f"environment variable RANK={rank} is not below WORLD_SIZE={world}; {LAUNCH_HELP}")
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = _int_var(environ, "LOCAL_WORLD_SIZE") or _int_var(environ, "LOCAL_SIZE") or 1
    if local_rank >= max(local_world, 1) and local_world > 1:
        raise UserError(f"environment variable LOCAL_RANK={local_rank} is not below the local world size "
                        f"{local_world}; {LAUNCH_HELP}")
    addr = environ.get("MASTER_ADDR")
    port = _int_var(environ, "MASTER_PORT")
    if world > 1 and (not addr or port is None):
        raise UserError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set; {LAUNCH_HELP}")
    return LaunchEnv(rank, world, local_rank, max(local_world, 1), addr or "127.0.0.1", port or _free_port())


def threads_per_rank(local_world_size: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """OMP_NUM_THREADS when the user set it (torchrun sets 1), else the cores this process may use
    divided among the ranks of this node, so ranks never oversubscribe the cores."""
    environ = os.environ if environ is None else environ
    explicit = _int_var(environ, "OMP_NUM_THREADS")
    if explicit:
        return explicit
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


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

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

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


def _skip_deepspeed_shm_op() -> None:
    # The CPU accelerator JIT-builds a shared-memory all-reduce (~30 s, files in /dev/shm) that only
    # inference all-reduce uses. The module must be fetched by name: `import deepspeed.comm.torch`
    # would bind the torch package.
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


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

    # the launcher variables every library below reads (a single process gets them here)
    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                       "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.master_addr,
                       "MASTER_PORT": str(env.master_port)})
    threads = threads_per_rank(env.local_world_size, environ)
    torch.set_num_threads(threads)

    use_cuda = cpu_compat.cuda()
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={env.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                            "launch at most one process per GPU")
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        # env:// reads the variables set above; under torchrun it joins the agent's store
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)

    if not use_cuda:
        _skip_deepspeed_shm_op()
    import deepspeed

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
        device=cpu_compat.device(env.local_rank), topology=topology, threads=threads,
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
