"""Lets megatron-core's tensor-parallel layers run where CUDA is absent.

megatron-core keeps its dropout RNG streams in a "CUDA RNG tracker" built on torch.cuda generators.
On a CPU-only machine we install a tracker with the same interface over the CPU generator, so code
that forks the model-parallel stream (attention dropout on head shards) behaves the same on both.
Everything here is inert when CUDA is available: GPU runs take the libraries' own path.
"""

from __future__ import annotations

import contextlib
import os

import torch

MODEL_PARALLEL_STREAM = "model-parallel-rng"  # megatron's name for the per-TP-rank stream


def use_deepspeed_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator at import; without CUDA it must be told to take the CPU one
    (unless the user chose one)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


class CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker interface (add / fork / get_states / set_states) over the
    CPU default generator: fork() swaps the named state in, runs the block, and swaps it out."""

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_.clear()
        self.seeds_.clear()

    def get_states(self) -> dict:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"RNG seed {seed} already used by another stream")
        if name in self.states_:
            raise RuntimeError(f"RNG stream {name!r} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_STREAM):
        if name not in self.states_:
            raise RuntimeError(f"RNG stream {name!r} was never added (seed the run first)")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_model_parallel_stream(seed: int, tp_rank: int) -> None:
    """Seed megatron's per-TP-rank dropout stream (different on every TP rank, same across DP).
    On CUDA this is megatron's own model_parallel_cuda_manual_seed."""
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0,
                                                force_reset_rng=True)
        return
    tracker = CpuRNGStatesTracker()
    # the same offset megatron uses, so a CPU and a GPU run of one recipe seed alike
    tracker.add(MODEL_PARALLEL_STREAM, seed + 2718 + tp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
