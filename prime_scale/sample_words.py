"""Do the samples speak the training text's words? A coarse, model-free check that a newcomer can read.

    words = training_words(manifests, tokenizer)      # set of str, or None (ids only)
    share = word_share(texts, words)                  # WordShare(known, total)

The share is the fraction of a decoded sample's whitespace-separated words that occur anywhere in
the training text (the same tokenizer's decoding of the training split, so both sides are spelled
alike). Word-fragment soup, the sign of a model still at the unigram level, scores low (on the demo
corpus about 50%: frequent pieces are often whole words), real prose near 100%. It measures
vocabulary, not grammar or sense; the bound (prime_scale.evaluation) is the figure that counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

# the training text read for the word list: the whole split up to this many tokens (the demo's is
# 0.54 M; a web-scale split is sampled from its start, which the note says)
MAX_TOKENS = 8_000_000


@dataclass(frozen=True)
class WordShare:
    known: int
    total: int
    tokens_read: int  # training tokens whose words form the list
    whole_split: bool

    @property
    def share(self) -> float:
        return self.known / self.total if self.total else float("nan")

    def describe(self) -> str:
        where = "the training text" if self.whole_split else f"the first {self.tokens_read:,} training tokens"
        return f"{self.share:.1%} of the samples' {self.total:,} words occur in {where}"


@dataclass(frozen=True)
class TrainingWords:
    words: frozenset
    tokens_read: int
    whole_split: bool


def training_words(manifests: Iterable[dict], tokenizer, max_tokens: int = MAX_TOKENS) -> Optional[TrainingWords]:
    """The words of the training split(s), decoded in stored order; None when the tokenizer cannot
    decode (pre-tokenized data). A packed row is BOS + (seq_len − 2) ids of the document stream +
    EOS, so the rows' inner ids joined in order give back the stream, documents separated by EOS."""
    from prime_scale.data.sources import open_source

    try:
        tokenizer.decode([])
    except Exception:
        return None
    words: set[str] = set()
    read, whole = 0, True
    for manifest in manifests:
        source = open_source(manifest, "train")
        rows = len(source)
        inner = max(int(manifest["seq_len"]) - 2, 1)
        take = min(rows, max(0, (max_tokens - read) // inner))
        whole &= take == rows
        pending = np.empty(0, dtype=np.int64)  # a document still running at the end of a block
        for start in range(0, take, 1024):
            block = source.read(np.arange(start, min(take, start + 1024)))
            stream = np.concatenate([pending, np.asarray(block[:, 1:-1], dtype=np.int64).reshape(-1)])
            read += stream.size - pending.size
            cuts = np.flatnonzero(stream == tokenizer.eos_id)
            begin = 0
            for cut in cuts.tolist():
                _add_words(words, tokenizer, stream[begin:cut])
                begin = cut + 1
            pending = stream[begin:]
        # the stream's end (the split's dropped tail, or the token budget) may cut a word: not kept
        _add_words(words, tokenizer, pending, drop_last=True)
    return TrainingWords(frozenset(words), read, whole)


def _add_words(words: set, tokenizer, ids: np.ndarray, drop_last: bool = False) -> None:
    if ids.size:
        found = tokenizer.decode(ids.tolist()).split()
        words.update(found[:-1] if drop_last else found)


def word_share(texts: Iterable[str], vocabulary: TrainingWords) -> WordShare:
    known = total = 0
    for text in texts:
        for word in text.split():
            total += 1
            known += word in vocabulary.words
    return WordShare(known, total, vocabulary.tokens_read, vocabulary.whole_split)
