"""Corpus tools: read raw corpora, train tokenizers, shard into streaming formats, build the demo corpus."""
