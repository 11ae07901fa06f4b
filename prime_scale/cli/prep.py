"""`prime-scale prep ACTION`: prepare data for training.

  tokenizer   train a sentencepiece tokenizer on a corpus
  shard       tokenize a corpus and write MDS or webdataset shards with a manifest
  demo        build the embedded demo corpus (CPython's own documentation)
  inspect     summarise a prepared dataset and decode a few sequences; --verify checks every file
  clean-shm   remove /dev/shm segments and lock files left by crashed mosaicml-streaming users
"""

from __future__ import annotations

import argparse
import re
import sys

from prime_scale.errors import USER_ERROR, UserError


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 64MB, 1GB, 500000)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def _input_args(p: argparse.ArgumentParser, ids: bool = False) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--input", "-i", nargs="+", action="extend", required=True, metavar="PATH",
                   help="files (.txt/.md/.jsonl, optionally .gz/.bz2/.xz/.zst), directories or glob patterns")
    g.add_argument("--input-format", default="auto", choices=["auto", "text", "jsonl"],
                   help="how to read the files (auto: by extension)")
    g.add_argument("--text-field", default="text", help="JSONL: dotted path of the text (default: text)")
    if ids:
        g.add_argument("--ids-field", default=None,
                       help="JSONL: dotted path of pre-tokenized ids (use with --vocab-size instead of --tokenizer)")
    g.add_argument("--doc-boundary", default="file", metavar="RULE",
                   help="plain text: file (one document per file), blank-lines[=N] (a run of N blank lines "
                        "ends a document), separator=TEXT (a line equal to TEXT ends a document)")
    g.add_argument("--errors", default="strict", choices=["strict", "replace"],
                   help="invalid UTF-8: stop with an error (default) or replace by U+FFFD and count")


def _read_options(args):
    from data_prep.readers import ReadOptions

    return ReadOptions(format=args.input_format, text_field=args.text_field,
                       ids_field=getattr(args, "ids_field", None), doc_boundary=args.doc_boundary, errors=args.errors)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer (exact round trip)")
    _input_args(p)
    p.add_argument("--vocab-size", type=int, required=True, help="pieces in the vocabulary (specials included)")
    p.add_argument("--out", required=True, help="tokenizer directory to create")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="sentencepiece model type")
    p.add_argument("--threads", type=int, default=0, help="training threads (default: all cores)")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="train on a random sample of at most this many text pieces (≤4 KB each)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")

    p = sub.add_parser("shard", help="tokenize, pack into sequences and write MDS or webdataset shards")
    _input_args(p, ids=True)
    tok = p.add_argument_group("tokenizer (one of)")
    tok.add_argument("--tokenizer", help="a tokenizer directory (prep tokenizer) or a prepared dataset")
    tok.add_argument("--vocab-size", type=int, help="pre-tokenized input: the external vocabulary size (GPT-2: 50257)")
    tok.add_argument("--eos-id", type=int, help="pre-tokenized input: end-of-text id (GPT-2: 50256)")
    tok.add_argument("--bos-id", type=int, help="pre-tokenized input: begin id (default: the EOS id)")
    tok.add_argument("--pad-id", type=int, default=None, help="pre-tokenized input: padding id (default: none)")
    tok.add_argument("--tokenizer-name", default="external", help="pre-tokenized input: a name for the record (e.g. gpt2)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence, BOS and EOS included")
    p.add_argument("--format", default="mds", choices=["mds", "wds"],
                   help="shard format: mds (mosaicml-streaming) or wds (webdataset tars)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents for the val split")
    p.add_argument("--split-seed", type=int, default=0, help="key of the document hash that picks the split")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-size", type=_size, default=64 << 20, help="target shard size (default 64MB)")
    p.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd (default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress line (default: one on stderr)")

    p = sub.add_parser("demo", help="build the embedded demo corpus (no download)")
    p.add_argument("--root", default=None, help="demo directory (default: $PRIME_SCALE_DEMO_DIR or data/demo)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length of the dataset to build")

    p = sub.add_parser("inspect", help="summarise a prepared dataset and decode a few sequences")
    p.add_argument("dataset", help="dataset directory or URI")
    p.add_argument("--split", default="train", help="which split to decode sequences from (default: train)")
    p.add_argument("--decode", type=int, default=2, metavar="N", help="decode the first N sequences")
    p.add_argument("--verify", action="store_true",
                   help="read every file: sizes and sha256 against the manifest, token ids against the vocabulary; "
                        "report each damaged file (exit 2 if any)")

    p = sub.add_parser("clean-shm", help="remove stale mosaicml-streaming /dev/shm segments and lock files")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")


def _tokenizer(args):
    from prime_scale.data.tokenizer import ExternalTokenizer, load_tokenizer

    if args.tokenizer and args.vocab_size:
        raise UserError("give either --tokenizer (text input) or --vocab-size (pre-tokenized input), not both")
    if args.tokenizer:
        if args.ids_field:
            raise UserError("--ids-field (pre-tokenized input) goes with --vocab-size/--eos-id, not --tokenizer")
        return load_tokenizer(args.tokenizer)
    if args.vocab_size:
        if args.eos_id is None or not args.ids_field:
            raise UserError("pre-tokenized input needs --ids-field, --vocab-size and --eos-id "
                            "(GPT-2: --vocab-size 50257 --eos-id 50256)")
        bos = args.eos_id if args.bos_id is None else args.bos_id
        return ExternalTokenizer(args.vocab_size, bos, args.eos_id, args.pad_id, args.tokenizer_name)
    raise UserError("shard needs --tokenizer DIR (train one with `prime-scale prep tokenizer`), or "
                    "--ids-field/--vocab-size/--eos-id for pre-tokenized input")


def _inspect(args) -> int:
    from prime_scale.data.format import split_info
    from prime_scale.data.uri import open_dataset
    from prime_scale.data.sources import open_source
    from prime_scale.data.tokenizer import load_tokenizer

    m = open_dataset(args.dataset)
    tok = m["tokenizer"]
    print(f"{args.dataset}: {m['format']}, seq_len {m['seq_len']}, vocab {m['vocab_size']} "
          f"({tok['kind']} {tok['hash'][:19]}, bos {tok['bos_id']} eos {tok['eos_id']} pad {tok.get('pad_id')})")
    for name, s in m["splits"].items():
        print(f"  {name:6s} {s['documents']:>10,} documents {s['tokens']:>14,} tokens {s['sequences']:>12,} sequences")
    if args.verify:
        from prime_scale.data.verify import verify_dataset

        report = verify_dataset(m)
        for line in report.damaged:
            print(f"DAMAGED {line}")
        print(report.summary(m))
        if report.damaged:
            return USER_ERROR
    info = split_info(m, args.split)
    n = min(args.decode, info["sequences"])
    if n:
        rows = open_source(m, args.split).read(list(range(n)))
        t = load_tokenizer(args.dataset)
        for i, row in enumerate(rows):
            text = t.decode(row.tolist()) if t.kind != "external" else " ".join(map(str, row[:32])) + " …"
            print(f"--- {args.split}[{i}]\n{text}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.action == "tokenizer":
        from data_prep.tokenizer_train import train_tokenizer

        train_tokenizer(args.input, args.out, args.vocab_size, args.model_type, _read_options(args),
                        threads=args.threads or None, max_sentences=args.max_sentences, overwrite=args.overwrite)
        return 0
    if args.action == "shard":
        from data_prep.shard import ShardOptions, shard_corpus

        opts = ShardOptions(seq_len=args.seq_len, format=args.format, val_fraction=args.val_fraction,
                            split_seed=args.split_seed, workers=args.workers, shard_bytes=args.shard_size,
                            compression=args.compression, overwrite=args.overwrite, progress=not args.no_progress)
        shard_corpus(args.input, _tokenizer(args), args.out, opts, _read_options(args))
        return 0
    if args.action == "demo":
        from data_prep.demo import ensure_demo_corpus

        print(ensure_demo_corpus(args.root, seq_len=args.seq_len, log=print))
        return 0
    if args.action == "inspect":
        return _inspect(args)
    if args.action == "clean-shm":
        from prime_scale.data.shm import clean_stale

        removed = clean_stale(dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for path in removed:
            print(f"{verb} {path}")
        print(f"clean-shm: {verb} {len(removed)} stale file(s)", file=sys.stderr)
        return 0
    raise UserError(f"unknown action {args.action}")
