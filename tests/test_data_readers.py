"""Reading corpora: formats, compression, document rules, and every kind of bad input."""

import gzip
import json

import pytest
import zstandard

from data_prep.readers import ReadOptions, ReadStats, expand_inputs, iter_documents
from prime_scale.errors import UserError


def docs(inputs, **kw):
    stats = ReadStats()
    out = [d.text for d in iter_documents([str(i) for i in inputs], ReadOptions(**kw), stats)]
    return out, stats


def test_plain_text_one_document_per_file_kept_exactly(tmp_path):
    a = "  leading spaces\n\n\ttabs\r\nand CRLF  \n"
    (tmp_path / "a.txt").write_text(a, newline="")
    (tmp_path / "b.md").write_bytes("\ufeffbyte-order mark ¶ é 中 😀".encode())
    out, stats = docs([tmp_path / "a.txt", tmp_path / "b.md"])
    assert out == [a, "byte-order mark ¶ é 中 😀"]
    assert stats.files == 2 and stats.documents == 2


def test_compressed_text_and_jsonl(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("gzipped text\n")
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b'{"text": "zstd one"}\n\n{"text": "zstd two", "x": 1}\n'))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"meta": {"body": "nested field"}}) + "\n")
    assert docs([tmp_path / "a.txt.gz", tmp_path / "b.jsonl.zst"])[0] == ["gzipped text\n", "zstd one", "zstd two"]
    assert docs([tmp_path / "c.jsonl.gz"], text_field="meta.body")[0] == ["nested field"]


def test_directories_and_globs_sorted_and_deduplicated(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.txt", "d/a.txt", "d/sub/c.txt", "d/.hidden.txt", "d/skip.bin"]:
        (tmp_path / name).write_text(name)
    files = expand_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "*.txt")])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["d/a.txt", "d/b.txt", "d/sub/c.txt"]
    files = expand_inputs([str(tmp_path / "d" / "s*")])  # a matched directory brings its files
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["d/skip.bin", "d/sub/c.txt"]


def test_blank_line_and_separator_rules(tmp_path):
    text = "\n\nfirst doc\nline two\n\nsecond\n\n\n\nthird\n  \n"
    (tmp_path / "t.txt").write_text(text)
    assert docs([tmp_path / "t.txt"], doc_boundary="blank-lines")[0] == ["first doc\nline two", "second", "third"]
    # N=2: a single blank line is a paragraph break inside a document
    assert docs([tmp_path / "t.txt"], doc_boundary="blank-lines=3")[0] == ["first doc\nline two\n\nsecond", "third"]
    (tmp_path / "s.txt").write_text("a\n\nb\n<|endoftext|>\nc\n<|endoftext|>\n")
    assert docs([tmp_path / "s.txt"], doc_boundary="separator=<|endoftext|>")[0] == ["a\n\nb", "c"]


def test_empty_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"text": "   "}\n{"text": ""}\n')
    out, stats = docs([tmp_path / "a.jsonl"])
    assert out == ["x"] and stats.empty_documents == 2


@pytest.mark.parametrize("content, expected", [
    (b'{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:2: invalid JSON"),
    (b'{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:2: no field 'text' \(this object has: body\)"),
    (b'{"text": 3}\n', r"bad\.jsonl:1: field 'text' must be a string"),
    (b'["a list"]\n', r"bad\.jsonl:1: expected a JSON object"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe bad"}\n', r"bad\.jsonl:2: invalid UTF-8 .*--errors replace"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, expected):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(UserError, match=expected):
        docs([tmp_path / "bad.jsonl"])


def test_invalid_utf8_replace_policy_counts(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good \xff\xfe and \xc3 end\nmore \xe2\x82 text\n")
    with pytest.raises(UserError, match=r"a\.txt:1: invalid UTF-8"):
        docs([tmp_path / "a.txt"])
    out, stats = docs([tmp_path / "a.txt"], errors="replace")
    assert out == ["good \ufffd\ufffd and \ufffd end\nmore \ufffd text\n"]
    assert stats.replaced == 4


def test_lone_surrogate_escapes_in_jsonl(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "half a pair \\ud83d here"}\n')
    with pytest.raises(UserError, match=r"s\.jsonl:2: .*lone surrogate"):
        docs([tmp_path / "s.jsonl"])
    out, stats = docs([tmp_path / "s.jsonl"], errors="replace")
    assert out == ["ok", "half a pair \ufffd here"] and stats.replaced == 1


def test_missing_unreadable_and_corrupt_inputs(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        docs([tmp_path / "nope.txt"])
    with pytest.raises(UserError, match="matches no file"):
        docs([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="holds no text or JSONL file"):
        docs([tmp_path / "empty_dir"])
    with pytest.raises(UserError, match=r"/proc/self/mem: cannot read"):  # open() works, read() fails (EIO)
        docs(["/proc/self/mem"])
    good = gzip.compress(b"some text that will be cut short " * 100)
    (tmp_path / "cut.txt.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"cut\.txt\.gz: truncated or corrupt compressed stream \(gzip"):
        docs([tmp_path / "cut.txt.gz"])
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(UserError, match=r"bad\.jsonl\.zst: .*zstd"):
        docs([tmp_path / "bad.jsonl.zst"])


def test_bad_options(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    for kw, msg in [({"doc_boundary": "paragraphs"}, "--doc-boundary"), ({"doc_boundary": "blank-lines=0"}, "positive"),
                    ({"errors": "ignore"}, "--errors"), ({"format": "csv"}, "--format")]:
        with pytest.raises(UserError, match=msg):
            docs([tmp_path / "a.txt"], **kw)
