"""Data pipeline speed: sharding vs raw sentencepiece, and the loader vs what the tiny recipe eats.

    python bench/bench_data.py [--copies 4] [--parts sharding,loader,checks,opens] [--json out.json]

1. Sharding throughput per core vs raw sentencepiece encoding on the same text (target ≥ 80%).
   Raw: SentencePieceProcessor.encode(list of documents, num_threads=T), T = 1 and 2 cores.
   Sharding: `shard_corpus` end to end (read JSONL, split hash, encode, pack, write MDS, publish)
   with --workers 1 (everything on one core; compared with raw T=1) and --workers 2 (2 worker
   processes + the writer; compared with raw T=2, per core).
   Per core is given two ways: wall-clock tokens/s divided by the cores, and tokens per CPU
   second of all processes (immune to other jobs stealing cores on a shared machine).
   The text is the demo corpus (CPython's documentation) repeated --copies times.
2. Loader throughput (sequences/s, micro-batch 16, L = 128, demo corpus) for MDS and webdataset
   and 0/1/2 DataLoader workers, vs the rate at which the tiny CPU recipe consumes sequences
   (target ≥ 20×). The consumption rate is the real trainer's: `prime-scale train tiny-cpu` for
   --train-steps steps on the same demo corpus, the FASTEST logged tokens_per_s (the most demanding
   consumer, so the ratio is conservative). With --no-trainer, a plain-PyTorch stand-in of the tiny
   recipe's network (same shape, fwd+bwd+AdamW) is timed instead.
3. What the data checks cost the loader (target ≤ 2%): every loader configuration of 2. runs with
   the checks (token ids on every read, each shard's sha256 when a process first opens it) and
   without (`prime_scale.data.sources.CHECKS = False`, a switch for this bench only), in the same
   rounds; the ratio is unchecked time / checked time (medians over the rounds). Loader runs with
   workers vary by several % on a shared machine, so part `checks` also times the checks on their
   own: the id check per micro-batch vs reading one, and sha256 of the train shards (what each
   process hashes once) vs reading all their samples once, at L = 128 and 1024.

4. File opens per 1,000 samples read, and samples/s, of a source reading a whole split at random
   (part `opens`; on Lustre/NFS each open is a metadata-server round trip). Opens are counted by
   wrapping builtins.open and os.open for the reads.

Also: the time to build the demo corpus from nothing (target < 2 min), unless --demo-root is given.

The machine is shared: each figure is the best of --repeats runs; ratios are from the same run.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the sharding workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def best_wall_and_cpu(fn, repeats):
    """(best wall seconds, best CPU seconds) over repeats: CPU time is what a run costs the cores,
    and unlike wall time it is not inflated by other jobs on a shared machine."""
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return min(walls), min(cpus)


def bench_sharding(demo_root: Path, work: Path, copies: int, repeats: int, seq_lens) -> dict:
    from data_prep.readers import ReadOptions
    from data_prep.shard import ShardOptions, shard_corpus
    from prime_scale.data import load_tokenizer
    from prime_scale.data.streaming_compat import import_streaming

    import_streaming()  # a one-time import cost, not throughput
    tok = load_tokenizer(demo_root / "tokenizer")
    docs = [json.loads(line)["text"] for line in (demo_root / "corpus.jsonl").read_text().splitlines()]
    corpus = work / "corpus.jsonl"
    with open(corpus, "w") as f:
        for c in range(copies):
            for d in docs:
                f.write(json.dumps({"text": d if c == 0 else f"[copy {c}] {d}"}) + "\n")
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    n_tokens = sum(len(x) for x in tok._sp.encode(texts, num_threads=1))
    out = {"corpus_mb": round(corpus.stat().st_size / 1e6, 2), "tokens": n_tokens}
    k = 0

    def shard(L, workers):
        nonlocal k
        k += 1
        shard_corpus([str(corpus)], tok, work / f"ds-{k}",
                     ShardOptions(seq_len=L, val_fraction=0.01, workers=workers, progress=False),
                     ReadOptions(format="jsonl"), log=lambda s: None)

    # every configuration once per round, raw encoding included, so slow phases of the shared
    # machine hit all of them alike; each keeps its best round
    configs = {f"raw_{t}thread": (lambda t=t: tok._sp.encode(texts, num_threads=t)) for t in (1, 2)}
    configs.update({f"shard_L{L}_workers{w}": (lambda L=L, w=w: shard(L, w)) for L in seq_lens for w in (1, 2)})
    wall = {name: float("inf") for name in configs}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, fn in configs.items():
            w, c = best_wall_and_cpu(fn, 1)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
            for done in work.glob("ds-*"):
                shutil.rmtree(done)
    for t in (1, 2):  # sentencepiece's own batch encoder on 1 and on 2 cores
        out[f"raw_{t}thread"] = {"tokens_per_s_per_core": round(n_tokens / wall[f"raw_{t}thread"] / t),
                                 "tokens_per_cpu_s": round(n_tokens / cpu[f"raw_{t}thread"])}
    for L in seq_lens:
        for w in (1, 2):
            name, raw = f"shard_L{L}_workers{w}", out[f"raw_{w}thread"]
            per_core = n_tokens / wall[name] / w
            out[name] = {"tokens_per_s": round(n_tokens / wall[name]), "tokens_per_s_per_core": round(per_core),
                         "ratio_per_core_wall": round(per_core / raw["tokens_per_s_per_core"], 3),
                         "tokens_per_cpu_s": round(n_tokens / cpu[name]),
                         "ratio_per_cpu_s": round(n_tokens / cpu[name] / raw["tokens_per_cpu_s"], 3)}
    return out


def wds_copy(demo_ds: Path, out: Path, L: int = 128) -> Path:
    """The demo corpus as webdataset shards (prepared once into `out`)."""
    from data_prep.readers import ReadOptions
    from data_prep.shard import ShardOptions, shard_corpus
    from prime_scale.data import load_tokenizer

    if not out.exists():
        shard_corpus([str(demo_ds.parent / "corpus.jsonl")], load_tokenizer(demo_ds), out,
                     ShardOptions(seq_len=L, format="wds", val_fraction=0.05, progress=False),
                     ReadOptions(format="jsonl"), log=lambda s: None)
    return out


def _loader_run(cfg, batches: int, checks: bool) -> tuple[float, float, float]:
    """One loader run: (wall seconds after the first batch, wall seconds with it, CPU seconds of this
    process and its workers for the whole run, start-up included)."""
    import gc

    from prime_scale.data import build_loader, integrity, sources

    sources.CHECKS = checks  # read by each source when it is built, and carried into the workers
    integrity._VERIFIED.clear()  # so that every run hashes its shards again, as a new process does
    c0 = cpu_seconds()
    it = iter(build_loader(cfg, "train", 0, 1, cfg.train.micro_batch, seed=0))
    t0 = time.perf_counter()
    next(it)  # worker start-up and the shards' first open (the hash)
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    t2 = time.perf_counter()
    it.close()  # shuts the workers down and reaps them, so their CPU time is counted
    del it
    gc.collect()
    sources.CHECKS = True
    return t2 - t1, t2 - t0, cpu_seconds() - c0


def bench_loader(demo_ds: Path, work: Path, batches: int, repeats: int) -> dict:
    """Loader sequences/s per format and worker count, with the data checks (token ids on every
    read, each shard's sha256 when a process first opens it) and without them, in the same rounds.
    `seq_per_s` is after the first batch (worker start-up excluded), the best run. The checks' cost
    is the ratio of median runs, by wall time after the first batch and by CPU time of the whole
    run (start-up and the first batch, where the shards are hashed, included; other jobs on a
    shared machine do not inflate CPU time)."""
    from prime_scale.config import load_recipe

    wds_ds = wds_copy(demo_ds, work / "demo-wds")
    keys = [(fmt, path, workers) for fmt, path in (("mds", demo_ds), ("wds", wds_ds)) for workers in (0, 1, 2)]
    runs = {(fmt, w, c): [] for fmt, _, w in keys for c in (True, False)}
    for r in range(repeats):  # every configuration once per round: slow phases of the machine hit all alike
        for fmt, path, workers in keys:
            cfg = load_recipe(None, [f"data.path={path}", f"data.num_workers={workers}"])
            for checks in ((True, False) if r % 2 == 0 else (False, True)):  # alternating which goes first
                runs[fmt, workers, checks].append(_loader_run(cfg, batches, checks))
    B = load_recipe(None).train.micro_batch
    out = {}
    for fmt, _, workers in keys:
        name = f"{fmt}_workers{workers}"
        on, off = np.array(runs[fmt, workers, True]), np.array(runs[fmt, workers, False])
        out[f"{name}_seq_per_s"] = round(batches * B / on[:, 0].min())  # the best run, as for the other figures
        out[f"{name}_unchecked_seq_per_s"] = round(batches * B / off[:, 0].min())
        # ratios of medians: a ratio of two best runs is two outliers' ratio
        out[f"{name}_checked_over_unchecked_wall"] = round(float(np.median(off[:, 0]) / np.median(on[:, 0])), 4)
        out[f"{name}_checked_over_unchecked_cpu"] = round(float(np.median(off[:, 2]) / np.median(on[:, 2])), 4)
    return out


def _check_costs(m: dict, repeats: int) -> dict:
    """The checks' own costs against reading: sha256 of the train split's shard files (once per
    process) vs reading all of its samples once through a source, and the id check vs a micro-batch's read."""
    from prime_scale.data import sources
    from prime_scale.data.integrity import file_digest
    from prime_scale.data.sources import open_source

    root = Path(m["dataset_dir"])
    shards = [e for e in m["files"] if e["path"].startswith("train/") and not e["path"].endswith(".json")]
    size = sum(e["bytes"] for e in shards)
    hash_s = best(lambda: [file_digest(root / e["path"]) for e in shards], repeats)
    n = m["splits"]["train"]["sequences"]
    open_source(m, "train").read(np.arange(1))  # the one-time import of the format's reader

    def epoch():
        src = open_source(m, "train")
        for start in range(0, n, 16):
            src.read(np.arange(start, min(n, start + 16)))
    sources.CHECKS = False  # the reading alone
    read_s = best(epoch, repeats)
    sources.CHECKS = True
    # the id check on its own: what Source.read adds per block, on a real micro-batch of 16
    block, V, calls = open_source(m, "train").read(np.arange(16)), m["vocab_size"], 20000
    check_s = best(lambda: [block.size and block.max() >= V for _ in range(calls)], repeats) / calls
    batch_s = read_s / -(-n // 16)
    sixteen = _first_opens(root, shards, processes=16, repeats=repeats)
    return {**sixteen, "sixteen_processes_hashing_over_epoch_read": round(sixteen["first_opens_16_unstamped_s"] / read_s, 3),
            "sixteen_processes_stamped_over_epoch_read": round(sixteen["first_opens_16_stamped_s"] / read_s, 3),
            "train_shard_mb": round(size / 1e6, 2), "sha256_mb_per_s": round(size / hash_s / 1e6),
            "epoch_read_mb_per_s": round(size / read_s / 1e6, 1), "hash_over_epoch_read": round(hash_s / read_s, 4),
            "id_check_us_per_batch": round(check_s * 1e6, 2), "read_us_per_batch": round(batch_s * 1e6, 1),
            "id_check_over_read": round(check_s / batch_s, 4)}


def _first_opens(root: Path, shards: list, processes: int, repeats: int) -> dict:
    """What the first opens of every shard by `processes` processes of one machine cost (each a new
    process: its in-memory record cleared): with the machine's verification stamps, and without (a
    cache that cannot be written, so each process hashes every shard, as before stamps)."""
    import time as _time

    from prime_scale.data import integrity

    _time.sleep(1.1)  # shards changed within the last second get no stamp (integrity._settled)

    def opens():
        for _ in range(processes):
            integrity._VERIFIED.clear()
            for e in shards:
                assert integrity.hash_problem(root / e["path"], e) is None

    saved = os.environ.get("PRIME_SCALE_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["PRIME_SCALE_CACHE"] = cache
        stamped = best(lambda: (shutil.rmtree(Path(cache) / "verified", ignore_errors=True), opens()), repeats)
        os.environ["PRIME_SCALE_CACHE"] = "/proc/no-cache-here"
        unstamped = best(opens, repeats)
    if saved is None:
        os.environ.pop("PRIME_SCALE_CACHE")
    else:
        os.environ["PRIME_SCALE_CACHE"] = saved
    return {"first_opens_16_stamped_s": round(stamped, 4), "first_opens_16_unstamped_s": round(unstamped, 4)}


def bench_checks(demo_root: Path, work: Path, repeats: int) -> dict:
    """What the data checks cost on their own, at L = 128 and 1024 (the hash grows with the bytes a
    sample holds, the reading mostly with the samples): precise where the loader comparison is
    noisy, and the answer for a process that reads less than a whole epoch of what it hashes."""
    from data_prep.demo import ensure_demo_corpus
    from prime_scale.data import open_dataset

    out = {}
    for L in (128, 1024):
        mds = ensure_demo_corpus(demo_root, seq_len=L, log=lambda s: None)
        wds = wds_copy(mds, work / f"checks-wds-L{L}", L)
        for fmt, path in (("mds", mds), ("wds", wds)):
            m = open_dataset(path)
            out[f"{fmt}_L{L}"] = _check_costs(m, repeats)
    return out


def bench_opens(demo_ds: Path, work: Path, repeats: int) -> dict:
    """Opens per 1,000 samples and samples/s of MDS and webdataset sources reading every train sample
    once, in a random order, 16 at a time (each figure: a fresh source, its shards already hashed)."""
    from prime_scale.data import open_dataset
    from prime_scale.data.sources import open_source

    out = {}
    for fmt, path in (("mds", demo_ds), ("wds", wds_copy(demo_ds, work / "demo-wds"))):
        m = open_dataset(path)
        order = np.random.default_rng(0).permutation(m["splits"]["train"]["sequences"])
        open_source(m, "train").read(order[:1])  # the format's import and the shards' hash: not the reads

        def epoch():
            src = open_source(m, "train")
            for start in range(0, order.size, 16):
                src.read(np.sort(order[start:start + 16]))
        opens, real_open, real_os_open = [0], builtins.open, os.open
        builtins.open = lambda *a, **k: opens.__setitem__(0, opens[0] + 1) or real_open(*a, **k)
        os.open = lambda *a, **k: opens.__setitem__(0, opens[0] + 1) or real_os_open(*a, **k)
        try:
            epoch()
        finally:
            builtins.open, os.open = real_open, real_os_open
        out[fmt] = {"samples": int(order.size), "opens_per_1000_samples": round(1000 * opens[0] / order.size, 1),
                    "samples_per_s": round(order.size / best(epoch, repeats))}
    return out


def bench_tiny_consumption(repeats: int, steps: int = 10) -> dict:
    """Sequences/s that the tiny recipe's network trains on (plain PyTorch, one process)."""
    import torch
    from torch import nn

    from prime_scale.config import load_recipe

    cfg = load_recipe(None)
    m = cfg.model
    V, L, B = 4096, m.seq_len, cfg.train.micro_batch
    torch.manual_seed(0)
    emb = nn.Embedding(V, m.hidden)
    layer = nn.TransformerEncoderLayer(m.hidden, m.heads, m.hidden * m.mlp_ratio, dropout=0.0, batch_first=True,
                                       norm_first=True, activation="gelu")
    net = nn.ModuleDict({"emb": emb, "body": nn.TransformerEncoder(layer, m.layers, enable_nested_tensor=False),
                         "head": nn.Linear(m.hidden, V)})
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randint(0, V, (B, L))

    def step():
        h = net["body"](net["emb"](x))
        loss = nn.functional.cross_entropy(net["head"](h).view(-1, V), x.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    s = best(lambda: [step() for _ in range(steps)], repeats) / steps
    return {"tiny_stand_in_step_s": round(s, 4), "tiny_stand_in_seq_per_s": round(B / s, 1),
            "threads": torch.get_num_threads()}


def bench_trainer_consumption(demo_root: Path, work: Path, steps: int) -> dict:
    """Sequences/s that `prime-scale train tiny-cpu` consumes (the trainer's own metrics)."""
    import subprocess

    run = work / "tiny-run"
    cmd = [sys.executable, "-m", "prime_scale.cli", "train", "tiny-cpu", f"train.steps={steps}", "train.log_every=1",
           "eval.every=0", "eval.batches=1", "checkpoint.every=0", f"run.dir={run}", "logging.wandb=disabled"]
    env = {**os.environ, "PRIME_SCALE_DEMO_DIR": str(demo_root)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the trainer failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if r.get("step", 0) > 1 and "tokens_per_s" in r]
    L = 128
    return {"trainer_steps": steps, "trainer_tokens_per_s_max": round(max(tps)),
            "trainer_tokens_per_s_median": round(float(np.median(tps))),
            "trainer_seq_per_s_max": round(max(tps) / L, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-root", default=None, help="demo corpus directory (default: a temp dir, built here)")
    ap.add_argument("--copies", type=int, default=4, help="demo corpus copies in the sharding text")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--train-steps", type=int, default=30, help="steps of the real tiny-cpu trainer")
    ap.add_argument("--no-trainer", action="store_true", help="time a plain-PyTorch stand-in instead")
    ap.add_argument("--parts", default="sharding,loader,checks", help="comma-separated: sharding, loader, checks, opens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from data_prep.demo import ensure_demo_corpus

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        demo_ds = ensure_demo_corpus(args.demo_root or work / "demo", log=lambda s: None)
        res = {"cpus": os.cpu_count(), "demo_build_s": None if args.demo_root else round(time.perf_counter() - t0, 1)}
        parts = args.parts.split(",")
        if "sharding" in parts:
            res["sharding"] = bench_sharding(demo_ds.parent, work, args.copies, args.repeats, (128, 1024))
        if "checks" in parts:
            res["checks"] = bench_checks(demo_ds.parent, work, args.repeats)
        if "opens" in parts:
            res["opens"] = bench_opens(demo_ds, work, args.repeats)
        if "loader" in parts:
            res["loader"] = bench_loader(demo_ds, work, args.batches, args.repeats)
            if args.no_trainer:
                res["tiny"] = bench_tiny_consumption(args.repeats)
                consume = res["tiny"]["tiny_stand_in_seq_per_s"]
            else:
                res["tiny"] = bench_trainer_consumption(demo_ds.parent, work, args.train_steps)
                consume = res["tiny"]["trainer_seq_per_s_max"]
            res["tiny"]["consumed_seq_per_s_used"] = consume
            res["loader_over_consumption"] = {k: round(v / consume, 1) for k, v in res["loader"].items()
                                              if k.endswith("_seq_per_s") and "unchecked" not in k}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
