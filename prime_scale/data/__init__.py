"""The read side of data: prepared datasets (format, opening by URI), tokenizers, sources, the
sample order, the resumable loader and the splits' statistics (bytes, unigram baseline). The
write side (reading corpora, training tokenizers, sharding, the demo corpus) is data_prep/, run by
`prime-scale prep`; docs/data.md describes both.
"""

from prime_scale.data.format import check_manifest
from prime_scale.data.loader import Loader, build_loader, load_manifests
from prime_scale.data.stats import SplitStats
from prime_scale.data.tokenizer import ExternalTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from prime_scale.data.uri import open_dataset

__all__ = [
    "open_dataset", "check_manifest", "build_loader", "load_manifests", "Loader", "SplitStats",
    "load_tokenizer", "Tokenizer", "SentencePieceTokenizer", "ExternalTokenizer",
]
