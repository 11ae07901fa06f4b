"""Tokenizers as one interface: a sentencepiece model, or an external vocabulary.

Downstream code (sharding, the trainer, the sampler) sees `encode`, `decode`, `vocab_size`,
`bos_id`, `eos_id`, `pad_id` and `hash` (the identity recorded in manifests and checkpoints).
`ExternalTokenizer` stands for data tokenized elsewhere (e.g. GPT-2 ids, V = 50257): its ids and
special tokens are known, its text mapping is not, so encode/decode raise a clear error.

A tokenizer directory holds `tokenizer.json` (kind, special ids, hash) and, for sentencepiece,
`tokenizer.model`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from prime_scale.data.format import MANIFEST_NAME, SP_MODEL, TOKENIZER_META
from prime_scale.data.remote import is_remote
from prime_scale.data.uri import open_dataset
from prime_scale.errors import UserError



class Tokenizer:
    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: Optional[int]
    hash: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def meta(self) -> dict:
        """The manifest's `tokenizer` section (without `dir`)."""
        return {"kind": self.kind, "hash": self.hash, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}


def content_hash(chunks: Iterable[bytes]) -> str:
    """sha256 hex digest over byte strings: the one way a tokenizer's identity is computed."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """The identity datasets record for the model they were tokenized with (Tokenizer.hash)."""
    return "sha256:" + content_hash([data])


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes, source: str = "<bytes>"):
        import sentencepiece as spm

        self._bytes = model_bytes
        self.source = source
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a corrupt proto
            raise UserError(f"{source}: not a valid sentencepiece model ({e})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else None
        self.hash = sha256_bytes(model_bytes)

    @property
    def model_bytes(self) -> bytes:
        return self._bytes

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[list[int]]:
        # one thread by default: callers parallelise with processes and must not oversubscribe
        return self._sp.encode(list(texts), num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __getstate__(self):  # picklable for worker processes: the proto travels, not the C++ object
        return {"model_bytes": self._bytes, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["model_bytes"], state["source"])


class ExternalTokenizer(Tokenizer):
    """Ids from a tokenizer that is not part of the dataset (e.g. GPT-2): sizes and ids only."""

    kind = "external"

    def __init__(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: Optional[int] = None,
                 name: str = "external"):
        for what, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if v is not None and not 0 <= v < vocab_size:
                raise UserError(f"external tokenizer '{name}': {what}={v} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.name = vocab_size, bos_id, eos_id, pad_id, name
        ident = json.dumps({"kind": self.kind, "name": name, "vocab_size": vocab_size,
                            "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}, sort_keys=True)
        self.hash = sha256_bytes(ident.encode())

    def meta(self) -> dict:
        return {**super().meta(), "name": self.name}

    def _no_text(self, what: str):
        raise UserError(f"the dataset was tokenized elsewhere (external tokenizer '{self.name}', "
                        f"vocab_size={self.vocab_size}); prime-scale has only its ids and cannot {what} "
                        "text: use that tokenizer's own library for text")

    def encode(self, text: str) -> list[int]:
        self._no_text("encode")

    def decode(self, ids: Iterable[int]) -> str:
        self._no_text("decode")


# --------------------------------------------------------------------------- files


def write_tokenizer_dir(tok: Tokenizer, out: Path, extra: Optional[dict] = None) -> None:
    """Write tokenizer.json (+ tokenizer.model) into an existing directory."""
    out = Path(out)
    meta = {**tok.meta(), **(extra or {})}
    if isinstance(tok, SentencePieceTokenizer):
        (out / SP_MODEL).write_bytes(tok.model_bytes)
        meta["model_file"] = SP_MODEL
    (out / TOKENIZER_META).write_text(json.dumps(meta, indent=2) + "\n")


def _from_meta(meta: dict, base: Path, where: str) -> Tokenizer:
    kind = meta.get("kind")
    if kind == "external":
        try:
            return ExternalTokenizer(int(meta["vocab_size"]), int(meta["bos_id"]), int(meta["eos_id"]),
                                     None if meta.get("pad_id") is None else int(meta["pad_id"]),
                                     name=str(meta.get("name", "external")))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: external tokenizer needs integer vocab_size, bos_id, eos_id ({e})") from None
    if kind == "sentencepiece":
        model = base / meta.get("model_file", SP_MODEL)
        try:
            data = model.read_bytes()
        except OSError as e:
            raise UserError(f"{model}: cannot read the sentencepiece model: {e.strerror}") from None
        tok = SentencePieceTokenizer(data, source=str(model))
        if meta.get("hash") not in (None, tok.hash):
            raise UserError(f"{model}: the model file does not match the hash recorded in {where} "
                            f"({meta['hash']} vs {tok.hash}): the tokenizer was replaced after the data was prepared")
        return tok
    raise UserError(f"{where}: unknown tokenizer kind {kind!r} (expected sentencepiece or external)")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from a prepared dataset directory (its manifest), a tokenizer directory, or a .model file."""
    if is_remote(str(path)) or (Path(path) / MANIFEST_NAME).is_file():
        m = open_dataset(path)
        spec = m["tokenizer"]
        base = Path(m["dataset_dir"]) / spec["dir"] if spec.get("dir") else Path(m["dataset_dir"])
        if spec["kind"] == "sentencepiece" and (base / TOKENIZER_META).is_file():
            meta = json.loads((base / TOKENIZER_META).read_text())
            meta["hash"] = spec["hash"]  # the manifest's record is what the shards were made with
            return _from_meta(meta, base, str(Path(m["dataset_dir"]) / MANIFEST_NAME))
        return _from_meta(spec, base, str(Path(m["dataset_dir"]) / MANIFEST_NAME))
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p.read_bytes(), source=str(p))
    meta_file = p / TOKENIZER_META
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{meta_file}: not valid JSON (line {e.lineno}): {e.msg}") from None
        return _from_meta(meta, p, str(meta_file))
    if (p / SP_MODEL).is_file():
        return SentencePieceTokenizer((p / SP_MODEL).read_bytes(), source=str(p / SP_MODEL))
    raise UserError(f"{path}: no tokenizer here (expected a prepared dataset with {MANIFEST_NAME}, a directory "
                    f"with {TOKENIZER_META} or {SP_MODEL}, or a .model file); train one with "
                    "`prime-scale prep tokenizer`")


# --------------------------------------------------------------------------- files of a tokenizer directory


def _tokenizer_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    raise UserError(f"tokenizer {path}: no such file or directory (recorded in the checkpoint as the run's "
                    "tokenizer)")


def tokenizer_identity(path: Union[str, Path]) -> dict:
    """The identity a checkpoint records for the tokenizer it copies: sha256 over the files of a
    tokenizer directory (or one file), names and contents: equal identities decode alike."""
    path = Path(path)
    files = _tokenizer_files(path)
    base = path if path.is_dir() else path.parent
    names = [str(f.relative_to(base)) for f in files]
    digest = content_hash(part for name, f in zip(names, files) for part in (name.encode() + b"\0", f.read_bytes()))
    return {"source": str(path.resolve()), "files": names, "sha256": digest}


def copy_tokenizer_files(src: Path, files: list[str], dst: Path) -> None:
    """Copy a tokenizer's files (relative names, as tokenizer_identity lists them) into a new directory."""
    base = src if src.is_dir() else src.parent
    dst.mkdir()
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(base / rel, dst / rel)
