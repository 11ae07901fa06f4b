"""Every random-number stream a training process draws from, captured and restored for exact resume.

Streams: torch CPU, torch CUDA (all devices), Python's `random`, NumPy's legacy global generator, and
megatron-core's named model-parallel streams (its RNG tracker, CPU or CUDA). The captured state holds
only tensors, ints, floats, strings and tuples, so it loads weights-only.
"""

from __future__ import annotations

import os
import random
import sys
import warnings

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
        state["torch_cuda_device"] = torch.cuda.current_device()  # the one this process draws on
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
        _restore_cuda(state)
    if "megatron" in state:
        tracker = _megatron_tracker()
        if tracker is None:
            raise RuntimeError("the checkpoint holds megatron RNG streams, but this process has no "
                               "initialised megatron RNG tracker to restore them into (seed it first)")
        tracker.set_states(state["megatron"])


def cuda_restore_plan(saved: int, visible: int, saved_device, current: int, local_rank=None):
    """[(saved index, device index)] to restore, and the saved indices left out. All of them when
    every saved device is visible. Otherwise (a resume with fewer visible GPUs, e.g. one per
    process under --gpus-per-task=1) only the stream this process drew on: the saved state of the
    device it computed on (recorded at capture; for older checkpoints its LOCAL_RANK, as
    parallel.state chose it) goes to the device it computes on now."""
    if saved <= visible:
        return [(i, i) for i in range(saved)], []
    src = saved_device if saved_device is not None else local_rank
    src = src if src is not None and 0 <= int(src) < saved else 0
    return [(int(src), current)], [i for i in range(saved) if i != int(src)]


def _restore_cuda(state: dict) -> None:
    from prime_scale.parallel import state as pstate

    states = state["torch_cuda"]
    # the node-local rank (an older checkpoint's device, as parallel.state chose it then): the
    # launcher's, not the LOCAL_RANK the parallel state now exports (the GPU's index among the visible)
    if pstate.is_initialized():
        local = pstate.get_state().local_rank
    else:
        raw = os.environ.get("LOCAL_RANK")
        local = int(raw) if raw and raw.isdigit() else None
    plan, left_out = cuda_restore_plan(len(states), torch.cuda.device_count(), state.get("torch_cuda_device"),
                                       torch.cuda.current_device(), local)
    for src, dst in plan:
        torch.cuda.set_rng_state(states[src], dst)
    if left_out:
        warnings.warn(f"resume: the checkpoint holds CUDA RNG states of {len(states)} devices, this process sees "
                      f"{torch.cuda.device_count()}: restored saved device {plan[0][0]}'s state (the one that "
                      f"process drew on) into cuda:{plan[0][1]}; not restored: saved devices {left_out}, "
                      "which this process does not draw on", stacklevel=2)
