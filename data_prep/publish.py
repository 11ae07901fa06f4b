"""Publishing outputs atomically: build in a temp directory beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from prime_scale.errors import UserError


def publish_dir(out: Path, build, overwrite: bool) -> None:
    """Build into a temp directory beside `out`, then rename it into place.

    A crash leaves only a hidden temp directory; `out` is either absent, the old one, or complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        build(tmp)
        if out.exists():
            if not overwrite:
                raise UserError(f"{out}: already exists; pass --overwrite to replace it")
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
