"""The loader: exactly-once coverage across ranks and workers, seeded order, exact resume,
resharding on resume, validation passes, mixtures, manifest checks, remote URIs, shm hygiene."""

import itertools
import json
import multiprocessing as mp
import os
import shutil

import numpy as np
import pytest
import torch

from data_prep.demo import demo_documents
from data_prep.shard import ShardOptions, shard_corpus
from data_prep.tokenizer_train import train_tokenizer
from prime_scale.config import load_recipe
from prime_scale.data import build_loader, check_manifest, open_dataset
from prime_scale.data.order import CHUNK, MixtureOrder
from prime_scale.data.shm import SHM_NAME as STREAMING_SHM
from prime_scale.data.sources import open_source
from prime_scale.data.streaming_compat import import_streaming
from prime_scale.errors import UserError

SEQ = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    texts = [t for _, t in itertools.islice(demo_documents(), 24)]
    for name, part in [("a", texts[:16]), ("b", texts[16:])]:
        with open(root / f"{name}.jsonl", "w") as f:
            for t in part:
                f.write(json.dumps({"text": t}) + "\n")
    tok = train_tokenizer([str(root / "a.jsonl")], root / "tok", 500, log=lambda m: None)
    quiet = dict(log=lambda s: None)
    small = dict(seq_len=SEQ, val_fraction=0.2, shard_bytes=4096, progress=False, workers=1)
    shard_corpus([str(root / "a.jsonl")], tok, root / "mds", ShardOptions(format="mds", **small), **quiet)
    shard_corpus([str(root / "a.jsonl")], tok, root / "wds", ShardOptions(format="wds", **small), **quiet)
    shard_corpus([str(root / "a.jsonl")], tok, root / "zst", ShardOptions(format="mds", compression="zstd", **small),
                 **quiet)
    shard_corpus([str(root / "b.jsonl")], tok, root / "b", ShardOptions(format="mds", **small), **quiet)
    return root


def cfg_for(path, *overrides, workers=2):
    return load_recipe(None, [f"data.path={path}", f"model.seq_len={SEQ}", f"data.num_workers={workers}",
                              *overrides])


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def stacked(batches, key="index"):
    return torch.cat([b[key] for b in batches]).numpy()


def reference_rows(path, split, ids):
    """Sample rows read with mosaicml-streaming's own LocalDataset (independent of our sources)."""
    ds = import_streaming().LocalDataset(local=str(path), split=split)
    return np.stack([ds[int(i)]["tokens"] for i in ids]).astype(np.int64)


def _rank_worker(path, dp_rank, dp_world, micro, steps, queue):
    torch.set_num_threads(1)
    loader = build_loader(cfg_for(path), "train", dp_rank, dp_world, micro, seed=7)
    batches = take(loader, steps)
    queue.put((dp_rank, stacked(batches), stacked(batches, "input_ids")))


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_every_sample_once_across_two_ranks_with_two_workers(data, fmt):
    path = data / fmt
    n = open_dataset(path)["splits"]["train"]["sequences"]
    micro, world = 8, 2
    steps = -(-n // (micro * world))
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    # ranks 0 and 1, plus a tensor-parallel peer of rank 0 (same dp_rank): three processes
    procs = [ctx.Process(target=_rank_worker, args=(str(path), r, world, micro, steps, queue)) for r in (0, 1, 0)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    by_rank = {}
    for rank, idx, ids in results:
        if rank in by_rank:  # the TP peer read exactly what its dp_rank reads
            np.testing.assert_array_equal(by_rank[rank][0], idx)
            np.testing.assert_array_equal(by_rank[rank][1], ids)
        by_rank[rank] = (idx, ids)
    # interleave into the global stream: step s = rank 0's micro-batch, then rank 1's
    stream = np.stack([by_rank[r][0].reshape(steps, micro) for r in (0, 1)], axis=1).reshape(-1)
    assert sorted(stream[:n].tolist()) == list(range(n))  # one epoch: every sample exactly once
    assert stream[:n].tolist() != list(range(n))  # and shuffled
    if fmt == "mds":
        rows = by_rank[1][1][:40]
        np.testing.assert_array_equal(rows, reference_rows(path, "train", by_rank[1][0][:40]))


def test_seeded_order_each_epoch_a_permutation(data):
    path = data / "mds"
    n = open_dataset(path)["splits"]["train"]["sequences"]
    cfg = cfg_for(path, workers=0)
    cfg.data.shuffle_block = 50  # several shuffle blocks per epoch
    a = stacked(take(build_loader(cfg, "train", 0, 1, 10, seed=1), -(-3 * n // 10)))
    b = stacked(take(build_loader(cfg, "train", 0, 1, 10, seed=1), -(-3 * n // 10)))
    c = stacked(take(build_loader(cfg, "train", 0, 1, 10, seed=2), 10))
    np.testing.assert_array_equal(a, b)
    assert (a[:100] != c[:100]).any()
    epochs = [a[e * n:(e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert (epochs[0] != epochs[1]).any()
    cfg.data.shuffle = False
    seq = stacked(take(build_loader(cfg, "train", 0, 1, 10, seed=1), -(-n // 10) + 1))
    np.testing.assert_array_equal(seq, np.arange(len(seq)) % n)
    # a finite training stream: two epochs, ending at the last whole micro-step
    finite = build_loader(cfg, "train", 0, 2, 10, seed=1, epoch_limit=2)
    assert len(finite) == 2 * n // 20 == len(list(finite))


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_exact_resume_mid_epoch_and_across_epochs(data, fmt):
    path = data / fmt
    cfg = cfg_for(path)
    n = open_dataset(path)["splits"]["train"]["sequences"]
    micro = 16
    total = -(-n // micro) + 6  # beyond the first epoch
    full = take(build_loader(cfg, "train", 0, 1, micro, seed=3), total)
    for cut in (5, -(-n // micro) - 1):  # mid-epoch, and just before the epoch boundary
        first = build_loader(cfg, "train", 0, 1, micro, seed=3)
        take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON/pickle checkpoint
        resumed = build_loader(cfg, "train", 0, 1, micro, seed=3)
        resumed.load_state_dict(state)
        rest = take(resumed, total - cut)
        for x, y in zip(full[cut:], rest):
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["index"], y["index"])
    assert state["epoch"] == 0 and state["position"] == cut * micro


def test_resume_with_another_dp_world_reshards_exactly(data):
    path = data / "mds"
    cfg = cfg_for(path, workers=1)

    def global_batches(world, micro, steps, state=None):
        loaders = [build_loader(cfg, "train", r, world, micro, seed=5) for r in range(world)]
        if state:
            for ld in loaders:
                ld.load_state_dict(state)
        per_rank = [take(ld, steps) for ld in loaders]
        return [torch.cat([per_rank[r][s]["index"] for r in range(world)]) for s in range(steps)], loaders[0]

    reference, _ = global_batches(2, 8, 12)  # global batch 16
    done, loader = global_batches(2, 8, 4)
    state = loader.state_dict()
    for world, micro in [(1, 16), (4, 4)]:
        after, _ = global_batches(world, micro, 8, state)
        for x, y in zip(reference[4:], after):
            assert torch.equal(x, y)
    # the same global batches come out of one rank with a 16-sample micro-batch from the start
    single, _ = global_batches(1, 16, 12)
    assert all(torch.equal(x, y) for x, y in zip(reference, single))


def test_validation_is_one_padded_pass(data):
    path = data / "mds"
    cfg = cfg_for(path)
    n = open_dataset(path)["splits"]["val"]["sequences"]
    loaders = [build_loader(cfg, "val", r, 2, 16, seed=0) for r in range(2)]
    passes = [[list(ld) for ld in loaders] for _ in range(2)]
    for batches in passes:
        assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == -(-n // 32)
        idx = np.concatenate([b["index"][b["valid"]].numpy() for rank in batches for b in rank])
        assert sorted(idx.tolist()) == list(range(n))  # every val sample once; padding flagged
        assert sum(int((~b["valid"]).sum()) for rank in batches for b in rank) == len(batches[0]) * 32 - n
    for x, y in zip(passes[0][0], passes[1][0]):  # a second pass repeats the first
        assert torch.equal(x["input_ids"], y["input_ids"])
    first = passes[0][0][0]
    np.testing.assert_array_equal(first["input_ids"].numpy(), reference_rows(path, "val", first["index"]))


def test_mixture_weights_offsets_and_content(data):
    a, b = data / "mds", data / "b"
    na = open_dataset(a)["splits"]["train"]["sequences"]
    nb = open_dataset(b)["splits"]["train"]["sequences"]
    cfg = load_recipe(None, [f"model.seq_len={SEQ}", "data.num_workers=0",
                             f"data.mixture=[{{path: '{a}', weight: 1}}, {{path: '{b}', weight: 3}}]"])
    loader = build_loader(cfg, "train", 0, 1, 64, seed=0)
    assert loader.samples_per_epoch == na + nb
    batches = take(loader, 4)
    idx = stacked(batches)
    rows = stacked(batches, "input_ids")
    from_b = idx >= na
    np.testing.assert_array_equal(rows[from_b], reference_rows(b, "train", idx[from_b] - na))
    np.testing.assert_array_equal(rows[~from_b], reference_rows(a, "train", idx[~from_b]))
    # quotas: exactly 1/4 : 3/4 of every chunk; each source exhausts an epoch before repeating
    order = MixtureOrder([[na], [nb]], [1, 3], seed=0)
    src, ids = order.lookup(np.arange(2 * CHUNK))
    assert (src[:CHUNK] == 1).sum() == 3 * CHUNK // 4 and (src[CHUNK:] == 1).sum() == 3 * CHUNK // 4
    b_ids = ids[src == 1]
    for e in range(len(b_ids) // nb):
        assert sorted(b_ids[e * nb:(e + 1) * nb].tolist()) == list(range(nb))
    np.testing.assert_array_equal(loader.order.lookup(np.arange(256))[1], stacked(batches) - np.where(from_b, na, 0))


def test_resume_refuses_a_different_data_order(data):
    cfg = cfg_for(data / "mds", workers=0)
    ld = build_loader(cfg, "train", 0, 1, 4, seed=1)
    take(ld, 3)
    state = ld.state_dict()
    with pytest.raises(UserError, match=r"different data order \(seed: saved 1, now 2\)"):
        build_loader(cfg, "train", 0, 1, 4, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="different data order.*datasets"):
        build_loader(cfg_for(data / "b", workers=0), "train", 0, 1, 4, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="unsupported format"):
        ld.load_state_dict({"position": 3})


def test_manifest_and_recipe_mismatches(data, tmp_path):
    m = open_dataset(data / "mds")
    where = str(data / "mds" / "manifest.json")
    with pytest.raises(UserError, match=rf"{where}: .*vocab_size is 500.*model.vocab_size=1000"):
        check_manifest(load_recipe(None, ["model.vocab_size=1000", f"model.seq_len={SEQ}"]), m, where)
    with pytest.raises(UserError, match=rf"{where}: .*{SEQ} tokens long.*model.seq_len=64"):
        build_loader(load_recipe(None, [f"data.path={data / 'mds'}", "model.seq_len=64"]), "train", 0, 1, 4, 0)
    with pytest.raises(UserError, match="the dataset is mds.*data.format=wds"):
        build_loader(cfg_for(data / "mds", "data.format=wds"), "train", 0, 1, 4, 0)
    with pytest.raises(UserError, match="manifest.json: not found: this is not a prepared dataset"):
        open_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(UserError, match="manifest.json: not valid JSON"):
        open_dataset(tmp_path)
    with pytest.raises(UserError, match="rank 2 is outside the world of 2"):
        build_loader(cfg_for(data / "mds"), "train", 2, 2, 4, 0)
    # a mixture of datasets made with different tokenizers is refused
    other = tmp_path / "other"
    train_tokenizer([str(data / "b.jsonl")], other / "tok", 400, log=lambda s: None)
    from prime_scale.data import load_tokenizer
    shard_corpus([str(data / "b.jsonl")], load_tokenizer(other / "tok"), other / "ds",
                 ShardOptions(seq_len=SEQ, progress=False, workers=1), log=lambda s: None)
    cfg = load_recipe(None, [f"model.seq_len={SEQ}",
                             f"data.mixture=[{{path: '{data / 'mds'}'}}, {{path: '{other / 'ds'}'}}]"])
    with pytest.raises(UserError, match="data.mixture: .* differ in tokenizer"):
        build_loader(cfg, "train", 0, 1, 4, 0)
    with pytest.raises(UserError, match="no 'val' split"):
        build_loader(cfg_for(other / "ds"), "val", 0, 1, 4, 0)


def test_remote_uri_and_compressed_shards_read_the_same(data, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIME_SCALE_CACHE", str(tmp_path / "cache"))
    local = stacked(take(build_loader(cfg_for(data / "mds", workers=0), "train", 0, 1, 16, 0), 20), "input_ids")
    remote = build_loader(cfg_for(f"file://{data / 'mds'}"), "train", 0, 1, 16, 0)
    np.testing.assert_array_equal(stacked(take(remote, 20), "input_ids"), local)
    cached = list((tmp_path / "cache" / "datasets").iterdir())
    assert len(cached) == 1 and list(cached[0].glob("train/shard.*.mds"))
    with pytest.raises(UserError, match=r"file://.*/nowhere/manifest.json: not found"):
        open_dataset(f"file://{tmp_path / 'nowhere'}")
    zst = stacked(take(build_loader(cfg_for(data / "zst"), "train", 0, 1, 16, 0), 20), "input_ids")
    np.testing.assert_array_equal(zst, local)


def ours(names):
    """Segment names this process tree could create: torch's, multiprocessing's, streaming's
    (other jobs on a shared machine create their own, which are none of our business)."""
    return {n for n in names if n.startswith(("torch_", "psm_")) or STREAMING_SHM.match(n)}


def test_loader_leaves_no_shared_memory_or_lock_files(data, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    shm_before = set(os.listdir("/dev/shm"))
    loader = build_loader(cfg_for(data / "mds"), "train", 0, 1, 8, seed=0)
    assert len(take(loader, 30)) == 30
    assert len(list(build_loader(cfg_for(data / "mds"), "val", 0, 1, 8, seed=0))) > 0
    del loader
    assert ours(set(os.listdir("/dev/shm")) - shm_before) == set()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_token_counts_are_a_bincount_of_every_sample_the_loader_reads(data, fmt):
    path = data / fmt
    m = open_dataset(path)
    for split in ("train", "val"):
        n = m["splits"][split]["sequences"]
        batches = take(build_loader(cfg_for(path, workers=0), split, 0, 1, 16, seed=4), -(-n // 16))
        # the first n stream positions are one epoch (train) or the one pass (val): each sample once
        rows = torch.cat([b["input_ids"][(b["position"] < n) & b["valid"]] for b in batches]).numpy()
        assert rows.shape == (n, SEQ)
        np.testing.assert_array_equal(np.bincount(rows.reshape(-1), minlength=m["vocab_size"]),
                                      m["splits"][split]["token_counts"])


def test_position_is_the_stream_position_for_two_ranks_and_after_resume(data):
    path = data / "mds"
    cfg = cfg_for(path, workers=1)
    loaders = [build_loader(cfg, "train", r, 2, 4, seed=5) for r in range(2)]
    for r, ld in enumerate(loaders):
        for step, b in enumerate(take(ld, 3)):
            assert b["position"].dtype == torch.int64
            np.testing.assert_array_equal(b["position"].numpy(), step * 8 + r * 4 + np.arange(4))
            np.testing.assert_array_equal(ld.order.lookup(b["position"].numpy())[1], b["index"].numpy())
    state = loaders[0].state_dict()
    resumed = build_loader(cfg, "train", 1, 3, 2, seed=5)  # another layout: world 3, micro-batch 2
    resumed.load_state_dict(state)
    for step, b in enumerate(take(resumed, 2)):
        np.testing.assert_array_equal(b["position"].numpy(), 24 + step * 6 + 2 + np.arange(2))
    # a held-out split's padding: positions run on past the end, the index wraps, valid is False
    n = open_dataset(path)["splits"]["val"]["sequences"]
    last = list(build_loader(cfg, "val", 1, 2, 16, seed=0))[-1]
    pos = last["position"].numpy()
    np.testing.assert_array_equal(pos, (-(-n // 32) - 1) * 32 + 16 + np.arange(16))
    np.testing.assert_array_equal(last["valid"].numpy(), pos < n)
    np.testing.assert_array_equal(last["index"].numpy(), np.where(pos < n, pos, pos % n))


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_a_shard_holding_an_id_beyond_the_vocabulary_is_named(data, tmp_path, fmt):
    good = open_dataset(data / fmt)
    rows = open_source(good, "train").read(np.arange(good["splits"]["train"]["sequences"]))
    V = int(np.median(rows.max(axis=1))) + 1  # a manifest claiming a smaller vocabulary than the shards'
    bad = np.nonzero(rows.max(axis=1) >= V)[0]
    ok = int(np.nonzero(rows.max(axis=1) < V)[0][0])
    sid = int(bad[-1])
    # the shard that holds sample sid, from the format's own records
    if fmt == "mds":
        shards = [(s["samples"], s["raw_data"]["basename"])
                  for s in json.loads((data / fmt / "train" / "index.json").read_text())["shards"]]
    else:
        shards = [(s["samples"], s["file"]) for s in good["splits"]["train"]["shards"]]
    ends = np.cumsum([c for c, _ in shards])
    shard = shards[int(np.searchsorted(ends, sid, side="right"))][1]
    assert shard != shards[0][1]  # not trivially the first shard
    ds = tmp_path / fmt
    shutil.copytree(data / fmt, ds)
    m = json.loads((ds / "manifest.json").read_text())
    m["vocab_size"] = V
    for split in m["splits"].values():
        del split["token_counts"]  # as a manifest written before counts were recorded
    (ds / "manifest.json").write_text(json.dumps(m))
    first_bad = int(rows[sid][rows[sid] >= V][0])
    with pytest.raises(UserError, match=rf"{ds}, split train: sample {sid} in shard {ds}/train/{shard} holds token "
                                        rf"id {first_bad}, but the manifest's vocab_size is {V}: the shard is damaged, "
                                        r"or the shards do not match the manifest's vocabulary; restore the shard, "
                                        r"or prepare the dataset again"):
        open_source(open_dataset(ds), "train").read(np.array([ok, sid]))
    assert open_source(open_dataset(ds), "train").read(np.array([ok])).max() < V
    cfg = load_recipe(None, [f"data.path={ds}", f"model.seq_len={SEQ}", "data.num_workers=0"])
    with pytest.raises(UserError, match=r"split train: sample \d+ in shard .* holds token id \d+"):
        take(build_loader(cfg, "train", 0, 1, 64, seed=0), 10)
