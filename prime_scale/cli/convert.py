"""`prime-scale convert CKPT --out DIR`: one safetensors file + config.json + tokenizer from a sharded
checkpoint of any layout (TP × PP × ZeRO 0-3, fp32 or bf16)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prime_scale.cli.common import add_weights_argument

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="a checkpoint folder (step_<N>), a checkpoint directory or a run directory "
                                "(its newest complete checkpoint is used)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    add_weights_argument(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of floating tensors in the output (fp32: the master weights)")


def main(args: argparse.Namespace) -> int:
    import torch

    from prime_scale.checkpoint.catalog import resolve_checkpoint
    from prime_scale.export.consolidate import consolidate

    folder = resolve_checkpoint(Path(args.ckpt))
    start = time.perf_counter()
    report = consolidate(folder, Path(args.out), weights=args.weights, dtype=getattr(torch, DTYPES[args.dtype]))
    mib = 1 << 20
    print(f"converted {folder} ({report.weights} weights) -> {report.out}: {report.tensors} tensors, "
          f"{report.total_bytes / mib:.1f} MiB, largest {report.largest_name} {report.largest_bytes / mib:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s")
    return 0
