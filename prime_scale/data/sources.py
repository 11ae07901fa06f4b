"""Random access to the sequences of one split of a prepared dataset, MDS or webdataset.

The loader decides which sample ids each rank reads (prime_scale/data/order.py); a source only
answers "give me sample i". Sample ids run over the split's shards in order. Every block read is
checked against the manifest's vocabulary (one max() per block: ids are unsigned), so shards that do
not belong to their manifest stop with an error naming the shard and sample, not an index error
deep in the model.

- MDS: mosaicml-streaming's own shard readers (streaming.base.format) decode each sample; its bytes
  are read here, with pread through a kept descriptor (the library's reader opens and closes the
  shard file for every sample: a metadata-server round trip each on Lustre or NFS). Compressed shards
  are decompressed with its codecs on first use, once for all nodes (prime_scale/data/decompressed.py).
- webdataset: the tar shards written by ShardWriter. An uncompressed tar can be read at random:
  each shard's member offsets are indexed once (stdlib tarfile) and samples are read with pread.

Shards of a remote dataset are downloaded into the local cache when first needed. Shard files are
opened on first read, in the process that reads (each DataLoader worker opens its own), and at most a
few dozen stay open per source (prime_scale/data/descriptors.py): a dataset of more shards than the
open-file limit reads fine, and running out of descriptors anyway is named as the limit, not as damage.

Damage is named before it can train (prime_scale/data/integrity.py): `open_source` checks that every
shard of the split exists with its recorded size (stats only), a shard's content hash is checked
when a process first opens it, and a read that fails anyway (a shard damaged meanwhile, or one of
a manifest without hashes) names the shard and sample instead of failing inside a format library.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from prime_scale.data.descriptors import Descriptors, fd_limit_error, is_fd_limit
from prime_scale.data.format import TOKENS_FIELD, manifest_path, split_info
from prime_scale.data.integrity import RESTORE, damaged, hash_problem, recorded_files, size_problem
from prime_scale.data.remote import RemoteNotFound, fetch, is_remote, remote_join
from prime_scale.errors import UserError

# bench/bench_data.py turns the token-id and hash checks off to measure what they cost; nothing else may
CHECKS = True


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
        self.checks, self.files, self.manifest_file = CHECKS, recorded_files(manifest), manifest_path(manifest)
        self._fds = Descriptors()  # the open shard files, bounded
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

    def stored(self, shard: int) -> tuple[str, Optional[int], str]:
        """(the shard's file relative to the dataset directory, its recorded size or None, where it is recorded)."""
        raise NotImplementedError

    def shard_file(self, shard: int) -> str:
        """The file of a shard, relative to the dataset directory."""
        return self.stored(shard)[0]

    def _local(self, rel: str) -> Path:
        """Local path of a dataset file, downloading it first for a remote dataset."""
        if self.remote:
            return fetch(self.uri, rel, self.dir)
        return self.dir / rel

    def presence_problems(self) -> list[tuple[Path, str]]:
        """(path, what is wrong) for each shard that is missing or not of its recorded size: one stat
        each. Of a remote dataset only the local cache is looked at (nothing is downloaded); a cached
        copy of the wrong size is removed, to be downloaded again when it is read."""
        out = []
        for shard in range(len(self.shard_sizes)):
            rel, size, where = self.stored(shard)
            path = self.dir / rel
            if self.files is not None and rel not in self.files:
                out.append((path, f"{self.manifest_file} records no size and hash for it: the manifest does not "
                                  "describe these shards"))
            elif self.remote:
                if size is not None and path.exists() and size_problem(path, size, where):
                    path.unlink(missing_ok=True)
            elif problem := size_problem(path, size, where):
                out.append((path, problem))
        return out

    def check_present(self) -> None:
        problems = self.presence_problems()
        if problems:
            path, problem = problems[0]
            more = (f" (and {len(problems) - 1} more damaged shard file(s): `prime-scale prep inspect --verify "
                    f"{self.uri}` lists them)") if len(problems) > 1 else ""
            raise UserError(f"{path}: {problem}; {RESTORE}{more}")

    def _verified(self, rel: str, noun: str = "shard") -> Path:
        """Local path of a dataset file (downloaded first when remote), its content checked against the
        manifest's hash the first time this process opens it."""
        try:
            path = self._local(rel)
        except RemoteNotFound as e:
            raise UserError(f"{e}: the manifest lists this file; restore it there, or prepare the dataset again and "
                            "upload it") from None
        entry = self.files.get(rel) if self.checks and self.files else None
        problem = entry and hash_problem(path, entry, noun)
        if problem and self.remote:  # a damaged copy in the cache: download it once more
            path.unlink(missing_ok=True)
            path = self._local(rel)
            if problem := hash_problem(path, entry, noun):
                raise UserError(f"{remote_join(self.uri, rel)}: {problem} (downloaded twice): restore the remote "
                                "copy, or prepare the dataset again and upload it")
        if problem:
            raise damaged(path, problem)
        return path

    def _unreadable(self, shard: int, row: int, e: Exception) -> UserError:
        sample = int(self.shard_starts[shard]) + row
        return damaged(self.dir / self.shard_file(shard),
                       f"cannot read sample {sample} ({type(e).__name__}: {e}): the shard is damaged")

    def read(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise IndexError(f"sample id out of range [0, {self.num_samples})")
        out = np.empty((ids.size, self.seq_len), dtype=self.dtype)
        shards = np.searchsorted(self.shard_starts, ids, side="right") - 1
        for s in np.unique(shards):
            where = np.nonzero(shards == s)[0]
            block = self._read_in_shard(int(s), ids[where] - self.shard_starts[s])
            if self.checks and block.size and block.max() >= self.vocab_size:
                self._refuse_ids(int(s), ids[where], block)
            out[where] = block
        return out

    def _refuse_ids(self, shard: int, ids: np.ndarray, block: np.ndarray) -> None:
        V = self.vocab_size
        row = int(np.nonzero((block >= V).any(axis=1))[0][0])
        bad = int(block[row][block[row] >= V][0])
        raise UserError(f"{self.uri}, split {self.split}: sample {int(ids[row])} in shard "
                        f"{self.uri}/{self.shard_file(shard)} holds token id {bad}, but the manifest's vocab_size is "
                        f"{V}: the shard is damaged, or the shards do not match the manifest's vocabulary; restore "
                        "the shard, or prepare the dataset again with `prime-scale prep shard` (or restore the "
                        "manifest written with these shards); `prime-scale prep inspect --verify` checks every shard")

    def __getstate__(self):  # readers and open files stay in the process that opened them
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


class MDSSource(Source):
    def _shard_sizes(self) -> np.ndarray:
        index = self._verified(f"{self.split}/index.json", "index")
        try:
            self._index = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as e:
            if is_fd_limit(e):
                raise fd_limit_error(index, e) from None
            raise UserError(f"{index}: cannot read the MDS index ({e}); {RESTORE}") from None
        self._open: dict = {}
        return np.array([s["samples"] for s in self._index["shards"]], dtype=np.int64)

    def stored(self, shard: int) -> tuple[str, Optional[int], str]:
        info = self._index["shards"][shard]
        data = info.get("zip_data") or info["raw_data"]  # the file as prepared: compressed, if it is
        return f"{self.split}/{data['basename']}", data.get("bytes"), str(self.dir / self.split / "index.json")

    def _reader(self, shard: int):
        reader = self._open.get(shard)
        if reader is None:
            from prime_scale.data.streaming_compat import import_streaming

            import_streaming()
            from streaming.base.format import reader_from_json

            info = self._index["shards"][shard]
            if info.get("format") != "mds":
                raise UserError(f"{self.dir}/{self.split}/index.json: shard {shard} is {info.get('format')!r}, not mds")
            rel = self.shard_file(shard)
            path = self._verified(rel)
            if info.get("zip_data"):
                from prime_scale.data.decompressed import ensure_raw

                ensure_raw(info, path, (self.files or {}).get(rel) if self.checks else None)
            reader = reader_from_json(str(self.dir), self.split, info)
            self._open[shard] = reader
        return reader

    def _offsets(self, shard: int, fd: int) -> np.ndarray:
        """The shard's sample offsets, read once per open: the MDS layout starts with a uint32 sample
        count and uint32 offsets[count + 1] (streaming's get_sample_data reads two of them per sample)."""
        n = int(self._index["shards"][shard]["samples"])
        head = os.pread(fd, 4 * (n + 2), 0)
        table = np.frombuffer(head, np.uint32).astype(np.int64) if len(head) == 4 * (n + 2) else None
        if table is None or table[0] != n or (np.diff(table[1:]) < 0).any():
            raise ValueError(f"its header does not describe the index's {n} samples")
        return table[1:]

    def _read_in_shard(self, shard: int, rows: np.ndarray) -> np.ndarray:
        reader = self._reader(shard)
        raw = self.dir / self.split / self._index["shards"][shard]["raw_data"]["basename"]
        try:
            fd, offsets = self._fds.get(raw, lambda fd: self._offsets(shard, fd))
        except (OSError, ValueError) as e:
            raise self._unreadable(shard, int(rows[0]), e) from None
        out = np.empty((rows.size, self.seq_len), dtype=self.dtype)
        for j, r in enumerate(rows):
            begin, end = int(offsets[r]), int(offsets[r + 1])
            try:  # free unless raised: a shard damaged after it was verified, or never verified
                data = os.pread(fd, end - begin, begin)
                if len(data) != end - begin:
                    raise ValueError(f"{len(data)} of the sample's {end - begin} bytes in the file")
                out[j] = reader.decode_sample(data)[TOKENS_FIELD]
            except (OSError, ValueError, IndexError) as e:
                raise self._unreadable(shard, int(r), e) from None
        return out


class WDSSource(Source):
    def _shard_sizes(self) -> np.ndarray:
        self._shards = split_info(self.manifest, self.split)["shards"]
        self._open: dict = {}
        return np.array([s["samples"] for s in self._shards], dtype=np.int64)

    def stored(self, shard: int) -> tuple[str, Optional[int], str]:
        rel = f"{self.split}/{self._shards[shard]['file']}"
        entry = (self.files or {}).get(rel)  # sizes of tar shards are recorded only in `files`
        return rel, None if entry is None else entry["bytes"], self.manifest_file

    def _index_shard(self, shard: int) -> tuple[Path, np.ndarray]:
        """(the shard's local path, its samples' (offset, size) in the tar), indexed once per process."""
        entry = self._open.get(shard)
        if entry is None:
            info = self._shards[shard]
            path = self._verified(self.shard_file(shard))
            suffix = f".{TOKENS_FIELD}.npy"
            try:
                with tarfile.open(path, mode="r:") as tf:  # uncompressed only: offsets must be seekable
                    members = [(m.offset_data, m.size) for m in tf if m.isfile() and m.name.endswith(suffix)]
            except (OSError, tarfile.TarError) as e:
                if is_fd_limit(e):
                    raise fd_limit_error(path, e) from None
                raise damaged(path, f"not a readable uncompressed tar shard ({e})") from None
            if len(members) != info["samples"]:
                raise damaged(path, f"holds {len(members)} samples, the manifest says {info['samples']}")
            entry = (path, np.array(members, dtype=np.int64).reshape(-1, 2))
            self._open[shard] = entry
        return entry

    def _read_in_shard(self, shard: int, rows: np.ndarray) -> np.ndarray:
        path, members = self._index_shard(shard)
        try:
            fd, _ = self._fds.get(path)
        except OSError as e:
            raise self._unreadable(shard, int(rows[0]), e) from None
        out = np.empty((rows.size, self.seq_len), dtype=self.dtype)
        for j, r in enumerate(rows):
            offset, size = members[r]
            try:  # free unless raised: a shard damaged after it was verified, or never verified
                out[j] = np.load(io.BytesIO(os.pread(fd, int(size), int(offset))), allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise self._unreadable(shard, int(r), e) from None
        return out


def open_source(manifest: dict, split: str, check: bool = True) -> Source:
    """The source of a split; with `check`, a missing or short shard is an error here, before any read."""
    cls = MDSSource if manifest["format"] == "mds" else WDSSource
    source = cls(manifest, split)
    if check:
        source.check_present()
    return source

