"""The shard writers of `prime-scale prep shard`: MDS (mosaicml-streaming) and webdataset tars.

Both take packed sequences [n, seq_len] of the dataset's dtype and, on finish(), return what the
split's manifest entry needs from them (wds: the tar shards and their sample counts). Sizes and
content hashes of the files they wrote are recorded afterwards for the whole dataset (the manifest's
`files`, data/integrity.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prime_scale.data.format import TOKENS_FIELD

WDS_PATTERN = "shard-%06d.tar"


def _fast_mds_writer(**kwargs):
    """An MDSWriter for our one fixed-shape ndarray column, without the per-sample cost.

    MDS stores a column of static dtype and shape as the raw array bytes, and a sample holding only
    such columns as their concatenation, so `row.tobytes()` is the library's encoding; parsing the
    encoding string for every sample (the generic path) cost as much as tokenizing at L = 128. The
    first sample is encoded both ways and compared, so a library change cannot go unnoticed."""
    from prime_scale.data.streaming_compat import import_streaming

    import_streaming()
    from streaming.base.format.mds import MDSWriter

    class FixedRowMDSWriter(MDSWriter):
        checked = False

        def encode_sample(self, sample):
            row = sample[TOKENS_FIELD]
            if not self.checked:
                if super().encode_sample(sample) != row.tobytes():
                    raise RuntimeError("mosaicml-streaming's MDS encoding of a fixed ndarray changed")
                self.checked = True
            return row.tobytes()

    return FixedRowMDSWriter(**kwargs)


class MDSOut:
    def __init__(self, root: Path, seq_len: int, dtype: str, opts):  # opts: data_prep.shard.ShardOptions
        self.writer = _fast_mds_writer(columns={TOKENS_FIELD: f"ndarray:{dtype}:{seq_len}"}, out=str(root),
                                       compression=opts.compression, size_limit=opts.shard_bytes)
        self.shape, self.dtype = (seq_len,), np.dtype(dtype)
        self.count = 0

    def write(self, seqs: np.ndarray) -> None:
        assert seqs.dtype == self.dtype and seqs.shape[1:] == self.shape  # what the fast path relies on
        for row in seqs:
            self.writer.write({TOKENS_FIELD: row})
        self.count += len(seqs)

    def finish(self) -> dict:
        self.writer.finish()
        return {}


class WDSOut:
    def __init__(self, root: Path, seq_len: int, dtype: str, opts):  # opts: data_prep.shard.ShardOptions
        import webdataset as wds

        per_sample = seq_len * np.dtype(dtype).itemsize + 1024  # + tar header and npy header
        self.per_shard = max(1, opts.shard_bytes // per_sample)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.writer = wds.ShardWriter(str(root / WDS_PATTERN), maxcount=self.per_shard, maxsize=float("inf"),
                                      verbose=0)
        self.count = 0

    def write(self, seqs: np.ndarray) -> None:
        for row in seqs:
            self.writer.write({"__key__": f"{self.count:010d}", f"{TOKENS_FIELD}.npy": row})
            self.count += 1

    def finish(self) -> dict:
        self.writer.close()
        shards, left = [], self.count
        for i in range(-(-self.count // self.per_shard)):
            shards.append({"file": WDS_PATTERN % i, "samples": min(self.per_shard, left)})
            left -= self.per_shard
        for extra in sorted(self.root.glob("shard-*.tar"))[len(shards):]:
            extra.unlink()  # ShardWriter opens the next (empty) shard eagerly
        return {"shards": shards}
