"""Which sample sits at each position of the endless training stream: pure functions of the seed.

The loader reads a stream of positions 0, 1, 2, … . Data-parallel rank r of D, with micro-batch B,
takes positions base + r·B … base + r·B + B − 1 of every micro-step (base advances by D·B). The
order itself never depends on D or B, so:
- every sample of an epoch is read exactly once across ranks (positions are disjoint);
- the same global batches come out under any data-parallel layout;
- a checkpoint needs one number (the next position), and resuming with another world size
  reshards exactly.

One source: epoch e is a seeded shuffle of its N samples — shards in a shuffled order, then samples
shuffled within blocks of consecutive shards (a block holds ≥ `block` samples), which keeps reads
local for large datasets and costs O(block) memory, not O(N).

Several sources with weights: every chunk of CHUNK positions holds a fixed quota of each source
(largest-remainder apportionment of the weights), in a seeded shuffled order. Each source is read
as its own endless run of shuffled epochs, so a source is never repeated before all its samples
were used, however the weights up- or down-sample it. Quotas make any position computable directly.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from prime_scale.errors import UserError

DEFAULT_BLOCK = 1 << 18  # samples per shuffle block
CHUNK = 8192  # positions per mixture chunk: weights are honoured to 1/CHUNK
_MIX_STREAM = 1 << 30  # seed-sequence slot of the mixture interleave (sources use 0, 1, …)


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([w % (1 << 63) for w in words])))


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class EpochOrder:
    """Sample ids of one source at positions of its endless sequence of epochs."""

    def __init__(self, shard_sizes: Sequence[int], seed: int, shuffle: bool = True,
                 block: int = DEFAULT_BLOCK, stream: int = 0):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = int(self.starts[-1])
        if self.n <= 0:
            raise UserError("a dataset split with no samples cannot be read")
        self.seed, self.shuffle, self.block, self.stream = seed, shuffle, max(1, block), stream
        self._layouts = _LRU(2)
        self._blocks = _LRU(4)

    def _layout(self, epoch: int):
        """Shard order of an epoch, cut into blocks: (block start offsets, shard lists)."""
        def make():
            order = _rng(self.seed, self.stream, epoch, 0).permutation(len(self.sizes))
            bounds, groups, cur, size, offset = [0], [], [], 0, 0
            for s in order:
                cur.append(int(s))
                size += int(self.sizes[s])
                if size >= self.block:
                    offset += size
                    groups.append(cur)
                    bounds.append(offset)
                    cur, size = [], 0
            if cur:
                groups.append(cur)
                bounds.append(offset + size)
            return np.asarray(bounds, dtype=np.int64), groups
        return self._layouts.get_or(epoch, make)

    def _block_ids(self, epoch: int, b: int, group: list) -> np.ndarray:
        def make():
            ids = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in group])
            return _rng(self.seed, self.stream, epoch, 1 + b).permutation(ids)
        return self._blocks.get_or((epoch, b), make)

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if not self.shuffle:
            return positions % self.n
        epochs, offsets = np.divmod(positions, self.n)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            in_e = np.nonzero(epochs == e)[0]
            bounds, groups = self._layout(int(e))
            blocks = np.searchsorted(bounds, offsets[in_e], side="right") - 1
            for b in np.unique(blocks):
                sel = in_e[blocks == b]
                out[sel] = self._block_ids(int(e), int(b), groups[b])[offsets[sel] - bounds[b]]
        return out


def apportion(total: int, weights: Sequence[float]) -> np.ndarray:
    """Integer quotas summing to `total`, proportional to weights (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    q = np.floor(exact).astype(np.int64)
    rest = total - int(q.sum())
    for i in np.argsort(-(exact - q), kind="stable")[:rest]:
        q[i] += 1
    return q


class MixtureOrder:
    """(source, sample id) at positions of the endless training stream of one or more sources."""

    def __init__(self, shard_sizes: Sequence[Sequence[int]], weights: Sequence[float], seed: int,
                 shuffle: bool = True, block: int = DEFAULT_BLOCK, names: Sequence[str] = ()):
        self.sources = [EpochOrder(s, seed, shuffle, block, stream=i) for i, s in enumerate(shard_sizes)]
        self.samples_per_epoch = sum(s.n for s in self.sources)  # one "epoch" of the mixture
        self.seed, self.shuffle = seed, shuffle
        self.quota = apportion(CHUNK, weights)
        if len(self.sources) > 1 and (self.quota == 0).any():
            i = int(np.nonzero(self.quota == 0)[0][0])
            name = names[i] if i < len(names) else f"#{i}"
            raise UserError(f"data.mixture[{i}] ({name}): weight {weights[i]} is below 1/{CHUNK} of the total; "
                            "raise it or drop the dataset")
        labels = np.repeat(np.arange(len(self.sources)), self.quota)
        keys = np.concatenate([(np.arange(q) + 0.5) / q for q in self.quota if q])
        self._base = labels[np.argsort(keys, kind="stable")]  # evenly interleaved
        self._chunks = _LRU(4)

    def _chunk(self, c: int):
        def make():
            labels = _rng(self.seed, _MIX_STREAM, c).permutation(self._base) if self.shuffle else self._base
            by_label = np.argsort(labels, kind="stable")
            first = np.concatenate([[0], np.cumsum(self.quota)])[:-1]
            ordinal = np.empty(CHUNK, dtype=np.int64)
            ordinal[by_label] = np.arange(CHUNK) - first[labels[by_label]]
            return labels, ordinal
        return self._chunks.get_or(c, make)

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions, dtype=np.int64)
        if len(self.sources) == 1:
            return np.zeros_like(positions), self.sources[0].ids_at(positions)
        chunks, r = np.divmod(positions, CHUNK)
        src = np.empty_like(positions)
        local = np.empty_like(positions)
        for c in np.unique(chunks):
            sel = np.nonzero(chunks == c)[0]
            labels, ordinal = self._chunk(int(c))
            src[sel] = labels[r[sel]]
            local[sel] = c * self.quota[src[sel]] + ordinal[r[sel]]
        ids = np.empty_like(positions)
        for i in np.unique(src):
            sel = src == i
            ids[sel] = self.sources[i].ids_at(local[sel])
        return src, ids


class SequentialOrder:
    """The sources' samples once, in order (validation)."""

    def __init__(self, sizes: Sequence[int]):
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
        self.samples_per_epoch = int(self.starts[-1])

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions, dtype=np.int64)
        src = np.searchsorted(self.starts, positions, side="right") - 1
        return src, positions - self.starts[src]
