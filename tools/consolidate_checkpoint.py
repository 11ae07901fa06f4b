#!/usr/bin/env python
"""Consolidate a prime-scale checkpoint without the `prime-scale` console script installed:
`python tools/consolidate_checkpoint.py CKPT --out DIR [--weights auto|ema|raw] [--dtype fp32|bf16]`,
the same as `prime-scale convert` (and the same exit codes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prime_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
