"""What the trainer reads: prepared datasets (manifests), tokenizers, and the resumable loader.

Preparing data (reading corpora, training tokenizers, sharding) lives in data_prep/ and is run by
`prime-scale prep`; docs/data.md describes both sides.
"""

from prime_scale.data.demo import ensure_demo_corpus
from prime_scale.data.loader import Loader, build_loader, load_manifests
from prime_scale.data.manifest import check_manifest, read_manifest
from prime_scale.data.tokenizer import ExternalTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ensure_demo_corpus", "read_manifest", "check_manifest", "build_loader", "load_manifests", "Loader",
    "load_tokenizer", "Tokenizer", "SentencePieceTokenizer", "ExternalTokenizer",
]
