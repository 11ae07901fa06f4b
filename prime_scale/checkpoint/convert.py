"""`prime-scale convert CKPT --out DIR`: one safetensors file + config.json + tokenizer from a sharded
checkpoint of any layout (TP × PP × ZeRO 0-3, fp32 or bf16)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="a checkpoint folder (step_<N>), a checkpoint directory or a run directory "
                                "(its newest complete checkpoint is used)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--weights", choices=["ema", "raw"], default="raw",
                   help="EMA weights (what evaluation and sampling should use when the run kept an EMA) "
                        "or the raw training weights (default: raw)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of floating tensors in the output (default fp32: the master weights)")


def main(args: argparse.Namespace) -> int:
    import torch

    from prime_scale.checkpoint.consolidate import consolidate
    from prime_scale.checkpoint.manifest import resolve_checkpoint

    folder = resolve_checkpoint(Path(args.ckpt))
    start = time.perf_counter()
    report = consolidate(folder, Path(args.out), weights=args.weights, dtype=getattr(torch, DTYPES[args.dtype]))
    mib = 1 << 20
    print(f"converted {folder} ({args.weights} weights) -> {report.out}: {report.tensors} tensors, "
          f"{report.total_bytes / mib:.1f} MiB, largest {report.largest_name} {report.largest_bytes / mib:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s")
    return 0
