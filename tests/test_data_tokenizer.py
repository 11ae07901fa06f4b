"""Tokenizer training and the tokenizer interface (sentencepiece and external vocabularies)."""

import itertools
import json

import pytest
import sentencepiece as spm

from data_prep.demo import demo_documents
from data_prep.readers import ReadOptions
from data_prep.tokenizer_train import train_tokenizer
from prime_scale.cli import main as cli
from prime_scale.data.tokenizer import ExternalTokenizer, load_tokenizer
from prime_scale.errors import UserError

TRICKY = [
    "  two leading spaces, trailing  ",
    "tabs\tand\r\nCRLF\n\n\nmany newlines\n",
    "unicode: é ß 中文 😀 \u200b zero-width, ﬁ ligature (NFKC would change it)",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "",
    "\n",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokcorpus")
    with open(root / "docs.jsonl", "w") as f:
        for _, text in itertools.islice(demo_documents(), 40):
            f.write(json.dumps({"text": text}) + "\n")
    return root / "docs.jsonl"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trained_tokenizer_round_trips_exactly(tmp_path, corpus, model_type):
    tok = train_tokenizer([str(corpus)], tmp_path / "tok", 1000, model_type, log=lambda m: None)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()] + TRICKY
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    # the published directory loads to the same model, and sentencepiece itself agrees
    again = load_tokenizer(tmp_path / "tok")
    assert again.hash == tok.hash and again.vocab_size == 1000
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    assert sp.encode(texts[0]) == again.encode(texts[0])
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (1, 2, 3)
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id()) == (1, 2, 3)
    assert meta["hash"] == tok.hash and meta["trained_on"]["documents"] == 40


def test_special_ids_are_not_text(tmp_path, corpus):
    tok = train_tokenizer([str(corpus)], tmp_path / "tok", 600, log=lambda m: None)
    ids = tok.encode("hello")
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == "hello"
    assert all(i not in (tok.bos_id, tok.eos_id, tok.pad_id) for i in tok.encode("a <s> </s> text"))


def test_tokenizer_errors(tmp_path, corpus):
    with pytest.raises(UserError, match="lower --vocab-size"):
        train_tokenizer([str(corpus)], tmp_path / "big", 200_000, log=lambda m: None)
    (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n')
    with pytest.raises(UserError, match="empty corpus"):
        train_tokenizer([str(tmp_path / "empty.jsonl")], tmp_path / "e", 500, log=lambda m: None)
    assert not (tmp_path / "e").exists()
    train_tokenizer([str(corpus)], tmp_path / "tok", 600, log=lambda m: None)
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        train_tokenizer([str(corpus)], tmp_path / "tok", 600, log=lambda m: None)
    with pytest.raises(UserError, match="no tokenizer here"):
        load_tokenizer(tmp_path)
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a valid sentencepiece model"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(UserError, match="pre-tokenized"):
        train_tokenizer([str(corpus)], tmp_path / "x", 600, read=ReadOptions(ids_field="ids"), log=lambda m: None)


def test_external_tokenizer_gpt2_sizes():
    tok = ExternalTokenizer(50257, 50256, 50256, None, "gpt2")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (50257, 50256, 50256)
    assert tok.hash != ExternalTokenizer(50257, 50256, 50256, None, "other").hash
    with pytest.raises(UserError, match="tokenized elsewhere.*gpt2.*cannot decode"):
        tok.decode([1, 2])
    with pytest.raises(UserError, match="outside the vocabulary"):
        ExternalTokenizer(100, 100, 5)


def test_cli_tokenizer(tmp_path, corpus, capsys):
    assert cli(["prep", "tokenizer", "--input", str(corpus), "--vocab-size", "700", "--out", str(tmp_path / "t")]) == 0
    assert load_tokenizer(tmp_path / "t").vocab_size == 700
    assert cli(["prep", "tokenizer", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "700",
                "--out", str(tmp_path / "u")]) == 2
    assert "missing.txt': no such file" in capsys.readouterr().err
