"""The training and validation loader: micro-batches for one data-parallel rank, resumable exactly.

    loader = build_loader(cfg, "train", dp_rank, dp_world, micro_batch, seed)
    for batch in loader:  # {"input_ids": Long[B, L], "index": Long[B], "position": Long[B], "valid": Bool[B]}
        ...
    ckpt["data"] = loader.state_dict()     # later: loader.load_state_dict(ckpt["data"])

`index` is the sample's global index (its id in the dataset, offset by the sizes of the earlier
datasets of a mixture): Prime noise is keyed on it. `position` is the row's place in the stream
(positions and the order are explained in order.py), counted before the padding of a held-out
split wraps around; like the order it does not depend on the layout, so what is keyed on it (the
trainer's time strata: position mod the global batch) does not either. Token ids are checked
against the manifest's vocabulary as they are read, every shard's presence and size when the
loader is built and its content hash when first opened (sources.py). The state is the next stream
position, counted in samples for all ranks together; it does not depend on the layout, so a run
may resume with another data-parallel world size or micro-batch. Ranks must advance in lockstep
(one micro-batch each per micro-step), as training does.

"train" repeats epochs forever (or `epoch_limit` epochs); any other split, and any split with
`single_pass=True` (evaluation), is read once per iteration in stored order. Its last micro-step is padded with repeats of earlier samples so every
rank yields the same number of batches; padded rows have valid=False and must not be counted.

DataLoader workers (cfg.data.num_workers) build the micro-batches; batch k always comes from the
same positions, whatever the worker count, and batches are delivered in order.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prime_scale.data.demo import demo_dataset
from prime_scale.data.format import check_manifest, manifest_path, split_info
from prime_scale.data.order import DEFAULT_BLOCK, MixtureOrder, SequentialOrder
from prime_scale.data.sources import open_source
from prime_scale.data.uri import open_dataset
from prime_scale.data.streaming_compat import import_streaming
from prime_scale.errors import UserError

STATE_VERSION = 1


def _dataset_identity(m: dict, split: str) -> str:
    """Content identity of a split: what the samples are, not where the directory lies."""
    info = split_info(m, split)
    ident = {"tokenizer": m["tokenizer"]["hash"], "seq_len": m["seq_len"], "format": m["format"],
             "sequences": info["sequences"], "tokens": info["tokens"], "documents": info["documents"],
             "created_at": m.get("created_at")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class _MicroBatches(Dataset):
    """Map-style dataset whose item k is this rank's k-th micro-batch from `start`."""

    def __init__(self, sources, order, offsets, start, stop, dp_rank, dp_world, micro_batch):
        # the sources open their shard files on first read, so each worker opens its own
        self.sources, self.order, self.offsets = sources, order, offsets
        self.start, self.stop = start, stop  # stop: end of the stream (None: endless)
        self.rank, self.world, self.B = dp_rank, dp_world, micro_batch

    def positions(self, k: int) -> np.ndarray:
        base = self.start + k * self.world * self.B + self.rank * self.B
        return np.arange(base, base + self.B, dtype=np.int64)

    def __getitem__(self, k: int) -> dict:
        sources = self.sources
        pos = self.positions(k)
        valid = np.ones(self.B, dtype=bool)
        if self.stop is not None:
            valid = pos < self.stop
            pos = np.where(valid, pos, pos % self.stop)  # padding: repeats, flagged invalid
        src, ids = self.order.lookup(pos)
        tokens = np.empty((self.B, sources[0].seq_len), dtype=np.int64)
        for i in np.unique(src):
            sel = np.nonzero(src == i)[0]
            tokens[sel] = sources[i].read(ids[sel])
        # numpy, not tensors: a worker hands arrays back through its pipe as plain bytes, where
        # tensors would each cost a shared-memory segment and a file-descriptor transfer
        return {"input_ids": tokens, "index": self.offsets[src] + ids, "position": self.positions(k), "valid": valid}


def _as_is(item):
    return item


def _unwrapped(e: UserError) -> UserError:
    """A UserError raised in a DataLoader worker is re-raised here as "Caught UserError in DataLoader
    worker process N. Original Traceback …"; the user's message is the traceback's last line."""
    text = str(e)
    if not text.startswith("Caught UserError"):
        return e
    _, marker, message = text.rstrip().rpartition("UserError: ")
    return UserError(message) if marker else e


class _Steps(Sampler):
    def __init__(self, count: Optional[int]):
        self.count = count

    def __iter__(self):
        k = 0
        while self.count is None or k < self.count:
            yield k
            k += 1

    def __len__(self):
        if self.count is None:
            raise TypeError("the training stream is endless")
        return self.count


class Loader:
    """Iterable over micro-batches of one data-parallel rank, with exact resume.

    Attributes for callers: vocab_size, seq_len, tokenizer (the manifest's tokenizer record: kind,
    hash, special ids, dir), dataset_dirs (local directories, tokenizer `dir` is relative to the
    first), num_samples, samples_per_epoch, position, epoch."""

    def __init__(self, manifests: list[dict], weights: list[float], split: str, dp_rank: int, dp_world: int,
                 micro_batch: int, seed: int, shuffle: bool = True, num_workers: int = 0,
                 epoch_limit: Optional[int] = None, block: int = DEFAULT_BLOCK, single_pass: bool = False):
        self.manifests, self.weights, self.split = manifests, weights, split
        self.dp_rank, self.dp_world, self.micro_batch = dp_rank, dp_world, micro_batch
        self.seed, self.shuffle, self.num_workers, self.block = seed, shuffle, num_workers, block
        self.repeat = split == "train" and not single_pass
        if any(m["format"] == "mds" for m in manifests):
            import_streaming()  # once here, before DataLoader workers fork, not once per worker
        sizes = [split_info(m, split)["sequences"] for m in manifests]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])[:-1].astype(np.int64)
        self.num_samples = int(sum(sizes))
        # built here, so a missing or truncated shard is named before the first step (sources.py)
        self.sources = [open_source(m, split) for m in manifests]
        if self.repeat:
            shard_sizes = [s.shard_sizes for s in self.sources]
            names = [manifest_path(m) for m in manifests]
            self.order = MixtureOrder(shard_sizes, weights, seed, shuffle, block, names)
            self.stop = None if epoch_limit is None else epoch_limit * self.order.samples_per_epoch
        else:
            self.order = SequentialOrder(sizes)
            self.stop = self.num_samples
        self.samples_per_epoch = self.order.samples_per_epoch
        self.position = 0
        m0 = manifests[0]
        self.vocab_size, self.seq_len = m0["vocab_size"], m0["seq_len"]
        self.tokenizer = m0["tokenizer"]
        self.dataset_dirs = [m["dataset_dir"] for m in manifests]

    # ------------------------------------------------------------------ iteration

    def _remaining_steps(self) -> Optional[int]:
        if self.stop is None:
            return None
        per_step = self.dp_world * self.micro_batch
        left = max(0, self.stop - self.position)
        if self.repeat:
            return left // per_step  # a finite training stream ends at a whole micro-step
        return -(-left // per_step)

    def __len__(self) -> int:
        n = self._remaining_steps()
        if n is None:
            raise TypeError("the training stream is endless (give epoch_limit for a finite one)")
        return n

    def __iter__(self) -> Iterator[dict]:
        steps = self._remaining_steps()
        data = _MicroBatches(self.sources, self.order, self.offsets, self.position, self.stop,
                             self.dp_rank, self.dp_world, self.micro_batch)
        dl = DataLoader(data, batch_size=None, sampler=_Steps(steps), num_workers=self.num_workers,
                        collate_fn=_as_is, persistent_workers=False,
                        prefetch_factor=4 if self.num_workers else None)
        per_step = self.dp_world * self.micro_batch
        try:
            for batch in dl:
                self.position += per_step  # counted on delivery, never on prefetch
                yield {key: torch.from_numpy(value) for key, value in batch.items()}
        except UserError as e:  # a damaged shard found by a worker: its message, not a worker traceback
            raise _unwrapped(e) from None
        if not self.repeat:
            self.position = 0  # the next pass over a held-out split starts from its beginning

    @property
    def epoch(self) -> int:
        return self.position // self.samples_per_epoch

    # ------------------------------------------------------------------ resume

    def _identity(self) -> dict:
        return {"split": self.split, "seed": self.seed, "shuffle": self.shuffle, "block": self.block,
                "weights": [float(w) for w in self.weights],
                "datasets": [_dataset_identity(m, self.split) for m in self.manifests]}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "position": int(self.position), "epoch": self.epoch,
                "dp_world": self.dp_world, "micro_batch": self.micro_batch, **self._identity()}

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise UserError(f"data loader state: unsupported format (version {sd.get('version') if isinstance(sd, dict) else sd!r})")
        mine = self._identity()
        changed = [k for k in mine if sd.get(k) != mine[k]]
        if changed:
            detail = "; ".join(f"{k}: saved {sd.get(k)!r}, now {mine[k]!r}" for k in changed)
            raise UserError("the checkpoint's data loader state was saved for a different data order "
                            f"({detail}); resuming would silently skip or repeat samples. Restore the data "
                            "settings of the run, or start a new run")
        position = int(sd["position"])
        if position < 0 or (self.stop is not None and position > self.stop):
            raise UserError(f"data loader state: position {position} is outside the stream [0, {self.stop}]")
        # the position counts samples of all ranks together: any dp_world / micro_batch reshards exactly
        self.position = position


# --------------------------------------------------------------------------- construction


def _datasets(cfg) -> list[tuple[str, float]]:
    if cfg.data.mixture:
        return [(e.path, float(e.weight)) for e in cfg.data.mixture]
    if cfg.data.path:
        return [(cfg.data.path, 1.0)]
    return [(str(demo_dataset(cfg.model.seq_len)), 1.0)]


def load_manifests(cfg, split: str = "train") -> list[dict]:
    """Manifests of the recipe's datasets, checked against the recipe and against each other."""
    manifests = []
    for path, _ in _datasets(cfg):
        m = open_dataset(path)
        where = manifest_path(m)
        if cfg.data.format != "auto" and cfg.data.format != m["format"]:
            raise UserError(f"{where}: the dataset is {m['format']}, but the recipe sets data.format="
                            f"{cfg.data.format}; set data.format=auto or {m['format']}")
        check_manifest(cfg, m, where)
        split_info(m, split)
        if manifests:
            first = manifests[0]
            for key, a, b in [("tokenizer", first["tokenizer"]["hash"], m["tokenizer"]["hash"]),
                              ("vocab_size", first["vocab_size"], m["vocab_size"]),
                              ("seq_len", first["seq_len"], m["seq_len"])]:
                if a != b:
                    raise UserError(f"data.mixture: {where} and {manifest_path(first)} differ in {key} "
                                    f"({b} vs {a}); a mixture needs data prepared with one tokenizer and sequence length")
        manifests.append(m)
    return manifests


def build_loader(cfg, split: str, dp_rank: int, dp_world: int, micro_batch: int, seed: int,
                 epoch_limit: Optional[int] = None, single_pass: bool = False) -> Loader:
    """The loader of a recipe's data (data.path, data.mixture, or the built demo corpus) for one DP rank.
    `single_pass`: read the split once in stored order, the last batch padded (evaluation of any split)."""
    if not 0 <= dp_rank < dp_world:
        raise UserError(f"data-parallel rank {dp_rank} is outside the world of {dp_world}")
    if micro_batch < 1:
        raise UserError(f"micro_batch must be at least 1, got {micro_batch}")
    manifests = load_manifests(cfg, split)
    weights = [float(e.weight) for e in cfg.data.mixture] if cfg.data.mixture else [1.0]
    workers = int(cfg.data.num_workers)
    if workers < 0:
        raise UserError(f"data.num_workers must be 0 or more, got {workers}")
    block = int(cfg.data.shuffle_block)  # samples per shuffle block
    return Loader(manifests, weights, split, dp_rank, dp_world, micro_batch, seed, cfg.data.shuffle, workers,
                  epoch_limit, block, single_pass)

