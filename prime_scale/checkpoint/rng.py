"""Every random-number stream a training process draws from, captured and restored for exact resume.

Streams: torch CPU, torch CUDA (all devices), Python's `random`, NumPy's legacy global generator, and
megatron-core's named model-parallel streams (its RNG tracker, CPU or CUDA). The captured state holds
only tensors, ints, floats, strings and tuples, so it loads weights-only.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch


def _megatron_tracker():
    # only if the process already uses megatron: importing it costs seconds
    mod = sys.modules.get("megatron.core.tensor_parallel.random")
    if mod is None:
        return None
    try:
        tracker = mod.get_cuda_rng_tracker()
    except Exception:  # not initialised in this process
        return None
    return tracker if tracker.get_states() else None


def capture() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_tracker()
    if tracker is not None:
        state["megatron"] = tracker.get_states()
    return state


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if "megatron" in state:
        tracker = _megatron_tracker()
        if tracker is None:
            raise RuntimeError("the checkpoint holds megatron RNG streams, but this process has no "
                               "initialised megatron RNG tracker to restore them into (seed it first)")
        tracker.set_states(state["megatron"])
