"""Where the embedded demo corpus lives (the data a recipe reads when data.path and data.mixture
are unset). The library only reads it; data_prep/demo.py builds it (`prime-scale prep demo`, or
`prime-scale train` on first use).

Layout under the demo root ($PRIME_SCALE_DEMO_DIR, else data/demo relative to the working directory):
    corpus.jsonl     the extracted documents, kept for inspection and reuse
    tokenizer/       the sentencepiece model trained on them
    L128/            the prepared dataset for sequence length 128 (others: L256, …)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from prime_scale.data.format import MANIFEST_NAME, read_manifest_file
from prime_scale.errors import UserError

DEFAULT_ROOT = "data/demo"
ROOT_ENV = "PRIME_SCALE_DEMO_DIR"
# recorded in the demo manifest's source.demo_version; raised whenever the prepared demo gains
# something older caches lack, so they are rebuilt (2: per-split bytes and token_counts; 3: the
# files' sizes and sha256; 4: a 16384-piece tokenizer and source.reference_unigram)
DEMO_VERSION = 4


def demo_root(root: Optional[str | Path] = None) -> Path:
    return Path(root if root is not None else os.environ.get(ROOT_ENV, DEFAULT_ROOT))


def dataset_dir(root: Path, seq_len: int) -> Path:
    return Path(root) / f"L{seq_len}"


def is_complete(dataset: Path) -> bool:
    """A prepared demo dataset is complete once its manifest exists and validates (it is written
    last), and current once it was built by this demo version."""
    if not (dataset / MANIFEST_NAME).is_file():
        return False
    try:
        m = read_manifest_file(dataset / MANIFEST_NAME)
    except UserError:
        return False
    source = m.get("source")
    return isinstance(source, dict) and source.get("demo_version") == DEMO_VERSION


def demo_dataset(seq_len: int, root: Optional[str | Path] = None) -> Path:
    """The prepared demo dataset for seq_len; a UserError saying how to build it when it is absent."""
    target = dataset_dir(demo_root(root), seq_len)
    if not is_complete(target):
        raise UserError(f"{target}: the demo corpus for model.seq_len={seq_len} is not built (or was built by "
                        "an older prime-scale); run "
                        f"`prime-scale prep demo --seq-len {seq_len}` (or set data.path to a prepared dataset)")
    return target
