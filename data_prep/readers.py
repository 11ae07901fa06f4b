"""Documents out of the files users actually have.

Inputs are files, directories (searched recursively, sorted, hidden files skipped) and glob
patterns. A file is plain text or JSONL by its extension (after an optional .gz / .bz2 / .xz / .zst), or as
`--format` forces. Plain text is one document per file, or several documents split by a rule:
  blank-lines[=N]    a run of N or more blank lines ends a document (N defaults to 1)
  separator=TEXT     a line that is exactly TEXT ends a document (the line itself is dropped)
JSONL has one object per line and the document in a field (a dotted path such as `meta.text`).

Text is kept exactly as in the file (no whitespace or newline normalisation), except that a UTF-8
byte-order mark at the start of a file is dropped and, when documents are split by a rule, the
line break ending a document's last line belongs to the separator. Whitespace-only documents are
skipped and counted.

Bad input raises UserError naming the file (and the line for JSONL and for invalid UTF-8); a
compressed file that is truncated or corrupt is named as such (data_prep/compressed.py), never
read as a shorter corpus.
Invalid UTF-8 is an error by default; errors="replace" substitutes U+FFFD and counts the
replacements instead.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from data_prep.compressed import COMPRESSED, STREAM_ERRORS, open_binary, read_error
from prime_scale.errors import UserError

TEXT_EXTENSIONS = {".txt", ".text", ".md", ".rst"}
JSONL_EXTENSIONS = {".jsonl", ".ndjson", ".json"}


@dataclass
class ReadOptions:
    format: str = "auto"  # auto | text | jsonl
    text_field: str = "text"  # JSONL: dotted path of the text
    ids_field: Optional[str] = None  # JSONL: dotted path of pre-tokenized ids (instead of text)
    doc_boundary: str = "file"  # text files: file | blank-lines[=N] | separator=TEXT
    errors: str = "strict"  # invalid UTF-8: strict | replace


@dataclass
class ReadStats:
    files: int = 0
    bytes: int = 0
    documents: int = 0
    empty_documents: int = 0
    replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD (errors="replace")
    per_file: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "documents": self.documents,
                "empty_documents": self.empty_documents, "replaced_utf8_sequences": self.replaced}


@dataclass
class Document:
    text: Optional[str]
    source: str
    line: int
    ids: Optional[list] = None  # pre-tokenized input


# --------------------------------------------------------------------------- input expansion


def _kind(path: Path) -> tuple[str, Optional[str]]:
    """(format by extension: text | jsonl | None, compression or None)."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = COMPRESSED.get(suffixes[-1]) if suffixes else None
    if comp:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in JSONL_EXTENSIONS:
        return "jsonl", comp
    if ext in TEXT_EXTENSIONS:
        return "text", comp
    return None, comp


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named by paths, directories and glob patterns, in a deterministic order."""
    if not inputs:
        raise UserError("no input given (pass --input FILE|DIR|GLOB, several allowed)")
    out: list[Path] = []
    seen = set()

    def add(p: Path):
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)

    def add_dir(item: str, required: bool = True) -> int:
        found = []
        for dirpath, dirnames, filenames in os.walk(item):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if not name.startswith(".") and _kind(p)[0] is not None:
                    found.append(p)
        if not found and required:
            raise UserError(f"input directory '{item}' holds no text or JSONL file (looked for "
                            f"{', '.join(sorted(TEXT_EXTENSIONS | JSONL_EXTENSIONS))}, optionally .gz/.bz2/.xz/.zst)")
        for f in found:
            add(f)
        return len(found)

    for item in inputs:
        if any(ch in item for ch in "*?["):
            files = 0
            for m in sorted(glob.glob(item, recursive=True)):
                if os.path.isdir(m):  # a matched directory contributes its text and JSONL files
                    files += add_dir(m, required=False)
                else:
                    add(Path(m))
                    files += 1
            if not files:
                raise UserError(f"input pattern '{item}' matches no file")
        elif os.path.isdir(item):
            add_dir(item)
        elif os.path.exists(item):
            add(Path(item))
        else:
            raise UserError(f"input '{item}': no such file or directory")
    return out


# --------------------------------------------------------------------------- decoding


class _ReplaceCounter:
    """A codecs error handler that substitutes U+FFFD and counts each bad sequence."""

    name = "prime_scale_count_replace"

    def __init__(self):
        self.count = 0
        codecs.register_error(self.name, self)

    def __call__(self, exc: UnicodeDecodeError):
        self.count += 1
        return "\ufffd", exc.end


_COUNTER: Optional[_ReplaceCounter] = None


def _counter() -> _ReplaceCounter:
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = _ReplaceCounter()
    return _COUNTER


def _lines(path: Path, compression: Optional[str], errors: str, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its terminator) for every line of a file."""
    handler = _counter().name if errors == "replace" else "strict"
    counter = _counter()
    before = counter.count
    f = open_binary(path, compression)
    lineno = 0
    try:
        with f:
            for lineno, raw in enumerate(f, 1):
                stats.bytes += len(raw)
                try:
                    line = raw.decode("utf-8", handler)
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line ({e.reason}); fix the "
                        "file, or pass --errors replace to substitute U+FFFD and continue") from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                yield lineno, line
    except UserError:
        raise
    except STREAM_ERRORS as e:  # truncated: EOFError; corrupt: each decompressor's own error
        raise read_error(path, compression, lineno, e) from None
    finally:
        stats.replaced += counter.count - before


# --------------------------------------------------------------------------- document rules


def parse_doc_boundary(rule: str) -> tuple[str, object]:
    """'file' | 'blank-lines[=N]' | 'separator=TEXT' -> (kind, argument)."""
    if rule == "file":
        return "file", None
    if rule == "blank-lines" or rule.startswith("blank-lines="):
        n = rule.partition("=")[2] or "1"
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--doc-boundary {rule}: N must be a positive integer")
        return "blank", int(n)
    if rule.startswith("separator="):
        text = rule.partition("=")[2]
        if not text:
            raise UserError("--doc-boundary separator=TEXT needs a non-empty TEXT")
        return "separator", text
    raise UserError(f"--doc-boundary '{rule}': expected file, blank-lines[=N] or separator=TEXT")


def _strip_terminator(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _text_documents(path, comp, rule, errors, stats) -> Iterator[Document]:
    kind, arg = rule
    if kind == "file":
        yield Document("".join(line for _, line in _lines(path, comp, errors, stats)), str(path), 1)
        return
    buf: list[str] = []
    start = 1
    blank_run: list[str] = []  # blank lines seen since the last text line (may be inside a document)
    for lineno, line in _lines(path, comp, errors, stats):
        if kind == "separator":
            if line.rstrip("\r\n") == arg:
                yield Document(_strip_terminator("".join(buf)), str(path), start)
                buf, start = [], lineno + 1
            else:
                buf.append(line)
            continue
        if line.strip() == "":
            blank_run.append(line)
            continue
        if len(blank_run) >= arg and buf:  # a long enough run of blank lines ended the document
            yield Document(_strip_terminator("".join(buf)), str(path), start)
            buf, start = [], lineno
        elif buf:
            buf.extend(blank_run)
        elif not buf:
            start = lineno
        blank_run = []
        buf.append(line)
    if buf:
        yield Document(_strip_terminator("".join(buf)), str(path), start)


def _lookup(obj: dict, dotted: str):
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return KeyError
        cur = cur[part]
    return cur


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str, path, lineno: int, errors: str, stats: ReadStats) -> str:
    """JSON escapes can spell lone surrogates (\\ud800), which are not text and cannot be encoded."""
    try:
        text.encode("utf-8")  # fails exactly on surrogates; ten times faster than a regex search
        return text
    except UnicodeEncodeError:
        pass
    if errors != "replace":
        raise UserError(f"{path}:{lineno}: the text holds a lone surrogate escape (invalid Unicode); fix the "
                        "file, or pass --errors replace to substitute U+FFFD and continue")
    text, n = _SURROGATE.subn("\ufffd", text)
    stats.replaced += n
    return text


def _jsonl_documents(path, comp, opts: ReadOptions, stats) -> Iterator[Document]:
    field_name = opts.ids_field or opts.text_field
    for lineno, line in _lines(path, comp, opts.errors, stats):
        if not line or line.isspace():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        value = _lookup(obj, field_name)
        if value is KeyError:
            keys = ", ".join(list(obj)[:10])
            flag = "--ids-field" if opts.ids_field else "--text-field"
            raise UserError(f"{path}:{lineno}: no field '{field_name}' (this object has: {keys}); "
                            f"name the right one with {flag}")
        if opts.ids_field:
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise UserError(f"{path}:{lineno}: field '{field_name}' must be a list of integer token ids")
            yield Document(None, str(path), lineno, ids=value)
        else:
            if not isinstance(value, str):
                raise UserError(f"{path}:{lineno}: field '{field_name}' must be a string, got {type(value).__name__}")
            yield Document(_valid_unicode(value, path, lineno, opts.errors, stats), str(path), lineno)


def iter_documents(inputs: Sequence[str], opts: ReadOptions, stats: Optional[ReadStats] = None) -> Iterator[Document]:
    """Every non-empty document of the inputs, in a deterministic order."""
    stats = stats if stats is not None else ReadStats()
    if opts.errors not in ("strict", "replace"):
        raise UserError(f"--errors {opts.errors}: expected strict or replace")
    if opts.format not in ("auto", "text", "jsonl"):
        raise UserError(f"--format {opts.format}: expected auto, text or jsonl")
    rule = parse_doc_boundary(opts.doc_boundary)
    for path in expand_inputs(inputs):
        kind, comp = _kind(path)
        fmt = opts.format if opts.format != "auto" else (kind or "text")
        if opts.ids_field and fmt != "jsonl":
            raise UserError(f"{path}: pre-tokenized input (--ids-field) must be JSONL")
        stats.files += 1
        docs = _jsonl_documents(path, comp, opts, stats) if fmt == "jsonl" else \
            _text_documents(path, comp, rule, opts.errors, stats)
        for doc in docs:
            if doc.ids is not None:
                empty = len(doc.ids) == 0
            else:
                empty = doc.text.strip() == ""
            if empty:
                stats.empty_documents += 1
                continue
            stats.documents += 1
            yield doc


def empty_corpus_error(inputs: Sequence[str], stats: ReadStats) -> UserError:
    what = ", ".join(inputs)
    return UserError(f"empty corpus: {what} gave no document ({stats.files} file(s), {stats.bytes} bytes read, "
                     f"{stats.empty_documents} empty document(s) skipped)")
