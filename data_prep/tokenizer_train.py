"""Train a sentencepiece tokenizer that round-trips text exactly.

sentencepiece's defaults are lossy (NFKC normalisation, collapsed whitespace, an added leading
space), so we train with the identity normaliser, keep all whitespace, add no dummy prefix and
fall back to bytes for unseen characters: decode(encode(text)) == text for every string.
Special ids: unk 0, bos 1, eos 2, pad 3.

Training "sentences" are pieces of documents of at most `piece_chars` characters cut after a
newline, so newlines stay inside the training text (and get merged into pieces, which matters for
code and structured text). For a large corpus, sentencepiece samples `max_sentences` of them.
"""

from __future__ import annotations

import io
import itertools
import os
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from data_prep.readers import ReadOptions, ReadStats, empty_corpus_error, iter_documents
from prime_scale.data.tokenizer import SentencePieceTokenizer, write_tokenizer_dir
from prime_scale import fsio
from prime_scale.errors import UserError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def _pieces(text: str, piece_chars: int) -> Iterator[str]:
    while len(text) > piece_chars:
        cut = text.rfind("\n", 0, piece_chars)
        cut = piece_chars if cut <= 0 else cut + 1
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def train_sentencepiece(texts: Iterator[str], vocab_size: int, model_type: str = "bpe",
                        threads: Optional[int] = None, max_sentences: int = 2_000_000,
                        piece_chars: int = 4096, character_coverage: float = 0.9995,
                        seed: int = 0) -> SentencePieceTokenizer:
    """Train on an iterator of documents; returns the tokenizer (nothing written)."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise UserError(f"--model-type {model_type}: expected bpe or unigram")
    if vocab_size < 260:  # 256 byte-fallback pieces + 4 specials must fit
        raise UserError(f"--vocab-size {vocab_size}: needs at least 260 (256 byte pieces + unk/bos/eos/pad)")
    sentences = (p for t in texts for p in _pieces(t, piece_chars))
    spm.set_random_generator_seed(seed)  # sentence sampling is then reproducible
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            byte_fallback=True, allow_whitespace_only_pieces=True, split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            character_coverage=character_coverage, max_sentence_length=piece_chars * 4 + 16,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=threads or os.cpu_count() or 1, minloglevel=2,
            hard_vocab_limit=True, train_extremely_large_corpus=False)
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise UserError(f"sentencepiece cannot build {vocab_size} pieces from this corpus ({msg.strip()}); "
                            "lower --vocab-size or give more text") from None
        raise UserError(f"sentencepiece training failed: {msg.strip()}") from None
    return SentencePieceTokenizer(model.getvalue(), source="trained")


def train_tokenizer(inputs: Sequence[str], out: str | Path, vocab_size: int, model_type: str = "bpe",
                    read: Optional[ReadOptions] = None, threads: Optional[int] = None,
                    max_sentences: int = 2_000_000, overwrite: bool = False, log=print) -> SentencePieceTokenizer:
    """Read the corpus, train, and publish DIR (tokenizer.model + tokenizer.json) atomically."""
    read = read or ReadOptions()
    if read.ids_field:
        raise UserError("a tokenizer is trained on text; --ids-field (pre-tokenized input) does not apply")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    stats = ReadStats()
    t0 = time.time()
    chars = 0

    def texts():
        nonlocal chars
        for doc in iter_documents(inputs, read, stats):
            chars += len(doc.text)
            yield doc.text

    stream = texts()
    first = next(stream, None)  # an empty corpus is our error, not a sentencepiece crash
    if first is None:
        raise empty_corpus_error(inputs, stats)
    tok = train_sentencepiece(itertools.chain([first], stream), vocab_size, model_type, threads, max_sentences)
    extra = {"model_type": model_type, "normalization": "identity (exact round trip)",
             "trained_on": {"inputs": list(inputs), **stats.as_dict(), "characters": chars}}
    fsio.publish_dir(out, lambda tmp: write_tokenizer_dir(tok, tmp, extra), overwrite)
    log(f"tokenizer: {model_type} vocab {tok.vocab_size} from {stats.documents} documents "
        f"({chars / 1e6:.1f} M chars) in {time.time() - t0:.1f}s -> {out} [{tok.hash[:19]}]")
    return tok
