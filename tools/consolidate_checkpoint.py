#!/usr/bin/env python
"""Consolidate a prime-scale checkpoint without the `prime-scale` console script installed.

`python tools/consolidate_checkpoint.py CKPT --out DIR [--weights ema|raw] [--dtype fp32|bf16]`."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prime_scale.checkpoint import convert  # noqa: E402
from prime_scale.errors import UserError  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    convert.add_arguments(parser)
    try:
        sys.exit(convert.main(parser.parse_args()))
    except UserError as e:
        print(f"consolidate_checkpoint: error: {e}", file=sys.stderr)
        sys.exit(2)
