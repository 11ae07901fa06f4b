"""Checkpoint loading never executes code from the file.

A pickle can name any importable callable and have the loader call it. torch.load(weights_only=True)
refuses that: it rebuilds only tensors, containers, primitives and an allowlist of types. DeepSpeed
calls torch.load(weights_only=False) internally, so around every load we (1) set
TORCH_FORCE_WEIGHTS_ONLY_LOAD, which torch reads at each call and which overrides an explicit
weights_only=False, and (2) allowlist the three plain data types DeepSpeed's ZeRO/bf16 optimizer
state contains. None of them runs code when rebuilt: an int enum, a two-field dataclass, and a
loss-scaler record whose state is restored by attribute assignment.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import zipfile
from typing import Iterator

import torch

from prime_scale.errors import UserError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
NO_FORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

# (module, name) of every non-builtin type found in DeepSpeed 0.19 checkpoints of ZeRO 0-3, fp32 and
# bf16, with and without the pipeline engine (listed with torch.serialization.get_unsafe_globals_in_checkpoint).
DEEPSPEED_TYPES = [
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
]


def allowed_types() -> list:
    """The allowlisted classes that are importable here (DeepSpeed is optional for plain loads)."""
    types = []
    for module, name in DEEPSPEED_TYPES:
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return types


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every torch.load inside this block is weights-only, whatever its caller asks for."""
    saved = {k: os.environ.get(k) for k in (FORCE_ENV, NO_FORCE_ENV)}
    os.environ[FORCE_ENV] = "1"
    os.environ.pop(NO_FORCE_ENV, None)  # both set is an error in torch; ours wins
    try:
        with torch.serialization.safe_globals(allowed_types()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class UnsafeCheckpoint(UserError):
    """A checkpoint file holds objects that weights-only loading refuses to rebuild."""


def detail(err: Exception) -> str:
    """The informative line of torch's weights-only refusal (it names the offending global)."""
    text = str(err)
    lines = text.splitlines()
    named = next((line.strip() for line in lines if "Unsupported global" in line), None)
    if named:
        return named
    # otherwise torch puts the unpickler's own message after a blank line, below a generic preamble
    _, _, rest = text.partition("\n\n")
    return next((line.strip() for line in rest.splitlines() if line.strip()),
                lines[0] if lines else type(err).__name__)


def refusal(path, err: Exception) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{path}: refused to load: the file holds objects that only arbitrary code could "
                            f"rebuild (checkpoints are loaded weights-only; a file from an untrusted source may "
                            f"be malicious). Detail: {detail(err)}")


class UnreadableCheckpoint(UserError):
    """A checkpoint file that is not a torch file prime-scale or DeepSpeed could have written."""


RESTORE = ("copy the step folder again from where the run wrote it, or use another checkpoint step "
           "(prime-scale convert and eval take a step_<N> folder)")


def load(path, mmap: bool = False):
    """torch.load of one file, weights only, on the CPU; UnsafeCheckpoint if the file is refused,
    UnreadableCheckpoint if it is not a torch file we write (FileNotFoundError passes through)."""
    if mmap and os.path.isfile(path) and not zipfile.is_zipfile(path):
        # torch.save and DeepSpeed write zip archives; torch's own error for anything else talks
        # about mmap and repeats the path as if it were the object saved
        raise UnreadableCheckpoint(f"{path}: not a zip-format torch file (it is truncated, not a torch file, or an "
                                   "old-style pickle from torch.save(..., _use_new_zipfile_serialization=False), "
                                   f"which prime-scale and DeepSpeed never write); {RESTORE}")
    try:
        with weights_only_loading():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None
    except FileNotFoundError:
        raise
    except Exception as e:  # a damaged file fails in the zip reader or the unpickler, each its own way
        raise UnreadableCheckpoint(f"{path}: unreadable checkpoint file ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}); {RESTORE}") from None
