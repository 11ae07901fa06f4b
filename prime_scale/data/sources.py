"""Random access to the sequences of one split of a prepared dataset, MDS or webdataset.

The loader decides which sample ids each rank reads (prime_scale/data/order.py); a source only
answers "give me sample i". Sample ids run over the split's shards in order. Every block read is
checked against the manifest's vocabulary (one max() per block: ids are unsigned), so shards that do
not belong to their manifest stop with an error naming the shard and sample, not an index error
deep in the model.

- MDS: mosaicml-streaming's own shard readers (streaming.base.format), which decode the MDSWriter
  layout; compressed shards are decompressed with its codecs on first use.
- webdataset: the tar shards written by ShardWriter. An uncompressed tar can be read at random:
  each shard's member offsets are indexed once (stdlib tarfile) and samples are read with pread.

Shards of a remote dataset are downloaded into the local cache when first needed. Shard files are
opened on first read, in the process that reads (each DataLoader worker opens its own).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from prime_scale.data.format import TOKENS_FIELD, split_info
from prime_scale.data.remote import fetch, is_remote
from prime_scale.errors import UserError


class Source:
    """Samples of one split: `len(src)`, `src.read(ids) -> uint array [n, seq_len]`."""

    def __init__(self, manifest: dict, split: str):
        self.manifest = manifest
        self.split = split
        self.dir = Path(manifest["dataset_dir"])
        self.uri = manifest.get("uri", str(self.dir))
        self.remote = is_remote(self.uri)
        self.seq_len, self.vocab_size = manifest["seq_len"], manifest["vocab_size"]
        self.dtype = np.dtype(manifest["dtype"])
        self.num_samples = split_info(manifest, split)["sequences"]
        self.shard_sizes = self._shard_sizes()
        if int(self.shard_sizes.sum()) != self.num_samples:
            raise UserError(f"{self.dir}/{split}: the shards hold {int(self.shard_sizes.sum())} samples but the "
                            f"manifest says {self.num_samples}: the dataset is damaged; prepare it again")
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])

    def __len__(self) -> int:
        return self.num_samples

    def _shard_sizes(self) -> np.ndarray:
        raise NotImplementedError

    def _read_in_shard(self, shard: int, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def shard_file(self, shard: int) -> str:
        """The file of a shard, relative to the dataset directory."""
        raise NotImplementedError

    def _local(self, rel: str) -> Path:
        """Local path of a dataset file, downloading it first for a remote dataset."""
        if self.remote:
            return fetch(self.uri, rel, self.dir)
        return self.dir / rel

    def read(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise IndexError(f"sample id out of range [0, {self.num_samples})")
        out = np.empty((ids.size, self.seq_len), dtype=self.dtype)
        shards = np.searchsorted(self.shard_starts, ids, side="right") - 1
        for s in np.unique(shards):
            where = np.nonzero(shards == s)[0]
            block = self._read_in_shard(int(s), ids[where] - self.shard_starts[s])
            if block.size and block.max() >= self.vocab_size:
                self._refuse_ids(int(s), ids[where], block)
            out[where] = block
        return out

    def _refuse_ids(self, shard: int, ids: np.ndarray, block: np.ndarray) -> None:
        V = self.vocab_size
        row = int(np.nonzero((block >= V).any(axis=1))[0][0])
        bad = int(block[row][block[row] >= V][0])
        raise UserError(f"{self.uri}, split {self.split}: sample {int(ids[row])} in shard "
                        f"{self.uri}/{self.shard_file(shard)} holds token id {bad}, but the manifest's vocab_size is "
                        f"{V}: the shards do not match the manifest's vocabulary; prepare the dataset again with "
                        "`prime-scale prep shard` (or restore the manifest written with these shards)")

    def __getstate__(self):  # open handles stay in the process that opened them
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


class MDSSource(Source):
    def _shard_sizes(self) -> np.ndarray:
        index = self._local(f"{self.split}/index.json")
        try:
            self._index = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{index}: cannot read the MDS index ({e})") from None
        self._open: dict = {}
        return np.array([s["samples"] for s in self._index["shards"]], dtype=np.int64)

    def shard_file(self, shard: int) -> str:
        info = self._index["shards"][shard]
        return f"{self.split}/{(info.get('zip_data') or info['raw_data'])['basename']}"  # the stored file

    def _reader(self, shard: int):
        reader = self._open.get(shard)
        if reader is None:
            from prime_scale.data.streaming_compat import import_streaming

            import_streaming()
            from streaming.base.format import reader_from_json

            info = self._index["shards"][shard]
            if info.get("format") != "mds":
                raise UserError(f"{self.dir}/{self.split}/index.json: shard {shard} is {info.get('format')!r}, not mds")
            reader = reader_from_json(str(self.dir), self.split, info)
            self._ensure_raw(info)
            self._open[shard] = reader
        return reader

    def _ensure_raw(self, info: dict) -> None:
        raw = self.dir / self.split / info["raw_data"]["basename"]
        if raw.exists():
            return
        if self.remote and not info.get("zip_data"):
            self._local(f"{self.split}/{info['raw_data']['basename']}")
            return
        if not info.get("zip_data"):
            raise UserError(f"{raw}: shard file missing: the dataset is damaged; prepare it again")
        from streaming.base.compression import decompress

        zipped = self._local(f"{self.split}/{info['zip_data']['basename']}")
        data = decompress(info["compression"], zipped.read_bytes())
        tmp = raw.with_name(f".{raw.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, raw)

    def _read_in_shard(self, shard: int, rows: np.ndarray) -> np.ndarray:
        reader = self._reader(shard)
        out = np.empty((rows.size, self.seq_len), dtype=self.dtype)
        for j, r in enumerate(rows):
            out[j] = reader.get_item(int(r))[TOKENS_FIELD]
        return out


class WDSSource(Source):
    def _shard_sizes(self) -> np.ndarray:
        self._shards = split_info(self.manifest, self.split)["shards"]
        self._open: dict = {}
        return np.array([s["samples"] for s in self._shards], dtype=np.int64)

    def shard_file(self, shard: int) -> str:
        return f"{self.split}/{self._shards[shard]['file']}"

    def _index_shard(self, shard: int):
        entry = self._open.get(shard)
        if entry is None:
            info = self._shards[shard]
            path = self._local(f"{self.split}/{info['file']}")
            suffix = f".{TOKENS_FIELD}.npy"
            try:
                with tarfile.open(path, mode="r:") as tf:  # uncompressed only: offsets must be seekable
                    members = [(m.offset_data, m.size) for m in tf if m.isfile() and m.name.endswith(suffix)]
            except (OSError, tarfile.TarError) as e:
                raise UserError(f"{path}: not a readable uncompressed tar shard ({e})") from None
            if len(members) != info["samples"]:
                raise UserError(f"{path}: holds {len(members)} samples, the manifest says {info['samples']}: "
                                "the dataset is damaged; prepare it again")
            entry = (os.open(path, os.O_RDONLY), np.array(members, dtype=np.int64).reshape(-1, 2))
            self._open[shard] = entry
        return entry

    def _read_in_shard(self, shard: int, rows: np.ndarray) -> np.ndarray:
        fd, members = self._index_shard(shard)
        out = np.empty((rows.size, self.seq_len), dtype=self.dtype)
        for j, r in enumerate(rows):
            offset, size = members[r]
            out[j] = np.load(io.BytesIO(os.pread(fd, int(size), int(offset))), allow_pickle=False)
        return out

    def __del__(self):
        for fd, _ in getattr(self, "_open", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def open_source(manifest: dict, split: str) -> Source:
    cls = MDSSource if manifest["format"] == "mds" else WDSSource
    return cls(manifest, split)

