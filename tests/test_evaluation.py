"""The one estimator (prime_scale.evaluation) against exact, independently computed values: the NELBO
of the linear schedule by brute force (every mask pattern, exact integration over t), the bound
proved by enumeration THROUGH the production path (Σ_x exp(−NELBO(x)) ≤ 1, = 1 for the ideal model),
the sampler's mask distribution, padding rows, determinism and batch-split independence."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from prime_scale.errors import UserError
from prime_scale import noise
from prime_scale.evaluation import EvalResult, EvalTotals, estimate, evaluate_bound, objective_sums
from prime_scale.prime import EPS, base_for, subtokenize

torch.set_num_threads(1)


class TinyModel:
    """A fixed function of yt: each token's one-hot digits through a linear map, plus the mean of
    all tokens' one-hot digits through another (so every prediction depends on the context)."""

    def __init__(self, V, ell, seed=0):
        self.V, self.ell, self.b = V, ell, base_for(V, ell)
        g = torch.Generator().manual_seed(seed)
        width = ell * (self.b + 1)
        self.own = torch.randn(width, V, generator=g, dtype=torch.float64) * 1.5
        self.ctx = torch.randn(width, V, generator=g, dtype=torch.float64)

    def __call__(self, yt):
        B = yt.shape[0]
        onehot = torch.nn.functional.one_hot(yt, self.b + 1).double().view(B, -1, self.ell * (self.b + 1))
        return (onehot @ self.own + onehot.mean(1, keepdim=True) @ self.ctx).float()


def batches_of(x0, index, sizes, attention_mask=None, valid=None):
    out, start = [], 0
    for n in sizes:
        batch = {"input_ids": x0[start:start + n], "index": index[start:start + n]}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask[start:start + n]
        if valid is not None:
            batch["valid"] = valid[start:start + n]
        out.append(batch)
        start += n
    return out


def random_data(V, L, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V, (n, L), generator=g)
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    attention_mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return x0.masked_fill(attention_mask == 0, -100), torch.arange(100, 100 + n), attention_mask


# --------------------------------------------------------------------------- the schedule, independently


def _digit(c, j, b, ell):
    return (c // b ** (ell - 1 - j)) % b


def loss_by_mask(model, x0, V, ell):
    """{mask pattern: Σ over its masked digits of −log p(digit | y_M)}, the digit's marginal under
    the carry-over-restricted joint, by brute force: plain Python sums over the classes."""
    b, L = base_for(V, ell), len(x0)
    target = [_digit(x, j, b, ell) for x in x0 for j in range(ell)]
    out = {}
    for pattern in itertools.product([False, True], repeat=L * ell):
        yt = [b if m else d for m, d in zip(pattern, target)]
        logits = model(torch.tensor([yt]))[0].double().tolist()
        loss = 0.0
        for i in range(L):
            mine = pattern[i * ell:(i + 1) * ell]
            allowed = [c for c in range(V)
                       if all(mine[j] or _digit(c, j, b, ell) == target[i * ell + j] for j in range(ell))]
            log_z = math.log(sum(math.exp(logits[i][c]) for c in allowed))
            for j in range(ell):
                if mine[j]:
                    hit = [c for c in allowed if _digit(c, j, b, ell) == target[i * ell + j]]
                    loss -= math.log(sum(math.exp(logits[i][c]) for c in hit)) - log_z
        out[pattern] = loss
    return out


def exact_nelbo(model, x0, V, ell):
    """The continuous-time NELBO of the linear schedule α_t = 1 − t, integrated over t ∈ [0, 1] by
    Gauss–Legendre (exact: (1/t)·t^k (1 − t)^(N−k) is a polynomial for k ≥ 1). No ε anywhere."""
    losses = loss_by_mask(model, x0, V, ell)
    N = len(x0) * ell
    nodes, weights = np.polynomial.legendre.leggauss(16)
    total = 0.0
    for pattern, loss in losses.items():
        k = sum(pattern)
        if k:
            total += loss * sum(w / 2 * ((n + 1) / 2) ** (k - 1) * (1 - (n + 1) / 2) ** (N - k)
                                for n, w in zip(nodes, weights))
    return total


def test_eval_mask_probability_is_the_linear_schedule_with_t_integrated_out():
    for N in range(1, 7):
        total = 0.0
        for k in range(1, N + 1):
            p = noise.eval_mask_probability(k, N)
            weight_times_p = p * N / k  # the estimator's weight N/k on this mask
            # ∫_0^1 (1/t) t^k (1 − t)^(N−k) dt = B(k, N − k + 1)
            beta = math.gamma(k) * math.gamma(N - k + 1) / math.gamma(N + 1)
            assert weight_times_p == pytest.approx(beta, rel=1e-12)
            total += p * math.comb(N, k)
        assert total == pytest.approx(1.0, abs=1e-12)
        assert noise.eval_mask_probability(0, N) == 0.0


def test_eval_noise_draws_every_mask_with_its_probability():
    L, ell, n = 2, 2, 30000  # N = 4 sub-tokens: 15 non-empty masks
    counted = torch.ones(n, L, dtype=torch.bool)
    t, mask = noise.eval_noise(5, torch.arange(n), 0, 1, counted, ell)
    assert torch.equal(t, mask.sum(-1).float() / (L * ell))
    counts = {}
    for row in mask.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == 15 and all(any(m) for m in counts)
    chi2 = sum((c - n * noise.eval_mask_probability(sum(m), 4)) ** 2 / (n * noise.eval_mask_probability(sum(m), 4))
               for m, c in counts.items())
    assert chi2 < 45, chi2  # 14 degrees of freedom: p ≈ 5e-5
    # K = N draws of one sequence are stratified: every mask size exactly once
    for index in range(20):
        sizes = [int(noise.eval_noise(5, torch.tensor([index]), k, 4, counted[:1], ell)[1].sum()) for k in range(4)]
        assert sorted(sizes) == [1, 2, 3, 4]
    # only counted positions are ever masked
    part = torch.tensor([[True, False]] * 50)
    _, m = noise.eval_noise(5, torch.arange(50), 0, 1, part, ell)
    assert not m[:, 2:].any() and m[:, :2].any(-1).all()


def production_nelbo(logits_fn, x0, V, ell, carry_over=True):
    """E[estimate] of sequence x0 through the production path: every mask with its probability
    (noise.eval_mask_probability), each batch built by noise.masked_eval_batch and scored by
    evaluation.objective_sums, exactly as `estimate` scores its draws."""
    L, N = len(x0), len(x0) * ell
    masks = torch.tensor([p for p in itertools.product([False, True], repeat=N) if any(p)])
    rows = torch.tensor([x0] * len(masks))
    counted = torch.ones(len(masks), L, dtype=torch.bool)
    batch = noise.masked_eval_batch(rows, masks, counted, V, ell)
    sums = objective_sums(logits_fn, V, ell, carry_over)([batch])[:, 0]
    prob = torch.tensor([noise.eval_mask_probability(int(m.sum()), N) for m in masks], dtype=torch.float64)
    return float((prob * sums).sum()), masks, sums


@pytest.mark.parametrize("x0", [[3, 1], [4, 0]])
def test_production_expectation_and_estimate_equal_the_exact_nelbo(x0):
    V, ell, L, copies, K = 5, 2, 2, 128, 32  # b = 3: codes 5..8 are invalid
    model = TinyModel(V, ell, seed=1)
    exact = exact_nelbo(model, x0, V, ell)
    assert production_nelbo(model, x0, V, ell)[0] == pytest.approx(exact, rel=1e-5)
    data = torch.tensor([x0] * copies)
    result = evaluate_bound(model, batches_of(data, torch.arange(copies), [50, 78]), vocab_size=V, ell=ell,
                            seed=3, mc_samples=K)
    assert result.tokens == copies * L and result.sequences == copies
    # identical sequences: the standard error is pure Monte Carlo error
    assert abs(result.nll_per_token - exact / L) < 4 * result.stderr, (result.nll_per_token, exact / L, result.stderr)
    assert result.stderr < 0.04 * exact / L  # small enough for the comparison to mean something


class IdealModel:
    """The true posterior of a data distribution p over V^L: logits = log p(x_i = c | visible digits)."""

    def __init__(self, V, ell, L, seed):
        self.V, self.ell, self.L, self.b = V, ell, L, base_for(V, ell)
        g = torch.Generator().manual_seed(seed)
        self.seqs = list(itertools.product(range(V), repeat=L))
        p = torch.rand(len(self.seqs), generator=g, dtype=torch.float64) ** 3 + 1e-3  # far from uniform
        self.p = p / p.sum()
        self.digits = subtokenize(torch.tensor(self.seqs), V, ell)  # [S, L·ℓ]
        self.tokens = torch.tensor(self.seqs)

    def __call__(self, yt):
        visible = yt != self.b  # [B, L·ℓ]
        agree = (self.digits[None] == yt[:, None]) | ~visible[:, None]  # [B, S, L·ℓ]
        post = self.p[None] * agree.all(-1)  # [B, S]
        onehot = torch.nn.functional.one_hot(self.tokens, self.V).double()  # [S, L, V]
        marg = torch.einsum("bs,slv->blv", post, onehot)
        return torch.where(marg > 0, marg.clamp_min(1e-300).log(), torch.full_like(marg, -30.0)).float()


@pytest.mark.parametrize("V,ell,L", [(6, 2, 2), (8, 3, 2), (9, 2, 1), (6, 3, 2), (7, 2, 1)])
def test_the_bound_is_proved_by_enumeration_through_the_production_path(V, ell, L):
    """Σ_x exp(−NELBO(x)) ≤ 1 for any model, = 1 for the ideal one (the bound is tight there)."""
    seqs = list(itertools.product(range(V), repeat=L))
    ideal = IdealModel(V, ell, L, seed=V + ell)
    mass = sum(math.exp(-production_nelbo(ideal, list(x), V, ell)[0]) for x in seqs)
    assert mass == pytest.approx(1.0, abs=1e-5), mass
    for seed in (0, 1):
        model = TinyModel(V, ell, seed=seed)
        mass = sum(math.exp(-production_nelbo(model, list(x), V, ell)[0]) for x in seqs)
        assert mass <= 1.0 + 1e-5, mass


def test_the_training_schedule_would_not_be_a_bound():
    """Why evaluation has its own noise: the training convention (t ~ U[ε, 1], mask rate (1 − ε)·t,
    weight 1/t) leaves out t < ε and the prior term, and the ideal model's 'bound' then sums past 1."""
    V, ell, L = 6, 2, 2
    N, ideal = L * ell, IdealModel(V, ell, L, seed=8)
    nodes, weights = np.polynomial.legendre.leggauss(24)
    mass = 0.0
    for x in itertools.product(range(V), repeat=L):
        _, masks, sums = production_nelbo(ideal, list(x), V, ell)
        raw = sums * masks.sum(-1) / N  # undo the weight N/k: the masked digits' loss itself
        total = 0.0
        for n, w in zip(nodes, weights):
            t = EPS + (1 - EPS) * (n + 1) / 2
            q = (1 - EPS) * t
            k = masks.sum(-1).double()
            total += w / 2 * float((raw * q**k * (1 - q) ** (N - k)).sum()) / t
        mass += math.exp(-total)
    assert mass > 1.0005, mass


# --------------------------------------------------------------------------- padding rows


def test_padding_rows_are_neither_counted_nor_able_to_change_the_result():
    V, ell, L = 10, 2, 4
    x0 = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]])
    valid = torch.tensor([True, True, False])
    index = torch.tensor([0, 1, 0])  # a loader pads with repeats of earlier samples
    model = TinyModel(V, ell)
    r = evaluate_bound(model, batches_of(x0, index, [3], valid=valid), vocab_size=V, ell=ell, seed=0)
    assert (r.sequences, r.tokens) == (2, 2 * L)
    alone = evaluate_bound(model, batches_of(x0[:2], index[:2], [2]), vocab_size=V, ell=ell, seed=0)
    garbage = x0.clone()
    garbage[2] = torch.tensor([99, -1, 9, 0])  # a padding row may hold anything
    other = evaluate_bound(model, batches_of(garbage, index, [3], valid=valid), vocab_size=V, ell=ell, seed=0)
    assert r.nll_per_token == pytest.approx(alone.nll_per_token, rel=1e-6)
    assert other.nll_per_token == pytest.approx(alone.nll_per_token, rel=1e-6)


def test_ell_one_bound_equals_joint_and_differs_for_ell_two():
    for ell, same in ((1, True), (2, False)):
        x0, index, am = random_data(12, 6, 10)
        r = evaluate_bound(TinyModel(12, ell), batches_of(x0, index, [10], am), vocab_size=12, ell=ell,
                           seed=0, mc_samples=3)
        if same:
            assert r.train_objective_joint == pytest.approx(r.nll_per_token, rel=1e-6)
        else:
            assert abs(r.train_objective_joint - r.nll_per_token) > 1e-3


def test_standard_error_shrinks_with_mc_samples():
    V, ell, n = 10, 2, 64
    data = torch.tensor([[3, 7, 1, 9, 0, 4]] * n)  # no spread across data: all error is Monte Carlo
    se = {K: evaluate_bound(TinyModel(V, ell), batches_of(data, torch.arange(n), [n]), vocab_size=V,
                            ell=ell, seed=0, mc_samples=K).stderr for K in (1, 16)}
    assert se[16] < se[1] / 2.5, se  # 1/sqrt(16) = 1/4 for independent draws, less with strata


# --------------------------------------------------------------------------- determinism


def test_deterministic_and_independent_of_batch_split():
    V, ell = 10, 3
    x0, index, am = random_data(V, 5, 12, seed=4)
    model = TinyModel(V, ell, seed=2)
    kwargs = dict(vocab_size=V, ell=ell, seed=11, mc_samples=3)
    reference = evaluate_bound(model, batches_of(x0, index, [12], am), **kwargs)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    for split in ([12], [5, 7], [1] * 12, [3, 3, 6]):
        for perm in (torch.arange(12), order):
            r = evaluate_bound(model, batches_of(x0[perm], index[perm], split, am[perm]), **kwargs)
            for field in ("nll_per_token", "stderr", "train_objective_joint"):
                assert getattr(r, field) == pytest.approx(getattr(reference, field), abs=1e-6)
            assert (r.tokens, r.sequences) == (int(am.sum()), 12)
    other = evaluate_bound(model, batches_of(x0, index, [12], am), **{**kwargs, "seed": 12})
    assert abs(other.nll_per_token - reference.nll_per_token) > 1e-6


def test_totals_reduce_across_ranks():
    """Two ranks' shares, summed as an all-reduce would, give the whole data's result."""
    V, ell = 10, 2
    x0, index, am = random_data(V, 6, 9, seed=5)
    model = TinyModel(V, ell)
    kwargs = dict(vocab_size=V, ell=ell, seed=1, mc_samples=2)
    sums = objective_sums(model, V, ell)

    def totals(x, i, a, reduce=None):
        return estimate(sums, [[b] for b in batches_of(x, i, [len(x)], a)], reduce=reduce, **kwargs)

    whole = totals(x0, index, am)
    rank1 = totals(x0[1::2], index[1::2], am[1::2])
    summed = totals(x0[::2], index[::2], am[::2], reduce=lambda t: t + rank1.to_tensor())
    meta = dict(mc_samples=2, seed=1, vocab_size=V, ell=ell, carry_over=True)
    a, b = EvalResult.from_totals(whole, **meta), EvalResult.from_totals(summed, **meta)
    assert a.nll_per_token == pytest.approx(b.nll_per_token, abs=1e-9)
    assert a.stderr == pytest.approx(b.stderr, abs=1e-9)


def test_stderr_is_the_ratio_estimator_computed_directly():
    V, ell = 10, 2
    x0, index, am = random_data(V, 6, 7, seed=6)
    model = TinyModel(V, ell)
    r = evaluate_bound(model, batches_of(x0, index, [7], am), vocab_size=V, ell=ell, seed=0, mc_samples=2)
    # per-sequence values, one sequence at a time (each alone in its own evaluation)
    n, m = [], []
    for i in range(7):
        one = evaluate_bound(model, batches_of(x0[i:i + 1], index[i:i + 1], [1], am[i:i + 1]),
                             vocab_size=V, ell=ell, seed=0, mc_samples=2)
        n.append(one.nll_per_token * one.tokens)
        m.append(one.tokens)
    R = sum(n) / sum(m)
    se = math.sqrt(sum((ni - R * mi) ** 2 for ni, mi in zip(n, m)) / (7 * 6)) / (sum(m) / 7)
    assert r.nll_per_token == pytest.approx(R, rel=1e-6)
    assert r.stderr == pytest.approx(se, rel=1e-5)


# --------------------------------------------------------------------------- output and errors


def test_json_and_table_label_the_joint_objective_as_a_training_objective():
    V, ell = 10, 2
    x0, index, am = random_data(V, 6, 1)
    r = evaluate_bound(TinyModel(V, ell), batches_of(x0, index, [1], am), vocab_size=V, ell=ell, seed=0)
    d = json.loads(r.to_json())  # strict JSON: the undefined stderr of one sequence becomes null
    assert d["stderr"] is None and d["bound"] == "subtoken_elbo"
    assert d["ppl"] == pytest.approx(math.exp(d["nll_per_token"]))
    assert "never a perplexity" in d["train_objective_joint_note"]
    table = r.format_table()
    joint_line = next(line for line in table.splitlines() if "joint" in line)
    assert "not a likelihood" in joint_line and "perplexity" not in joint_line


def test_bad_batches_are_user_errors():
    model = TinyModel(10, 2)
    x0 = torch.tensor([[1, 2, 3]])
    kwargs = dict(vocab_size=10, ell=2, seed=0)
    for batches, match in (([{"input_ids": x0}], "index"),
                           ([{"input_ids": torch.tensor([[1, 12, 3]]), "index": torch.tensor([0])}], "12"),
                           ([{"input_ids": x0, "index": torch.tensor([4])}] * 2, "twice"),
                           ([{"input_ids": x0, "index": torch.tensor([0]),
                              "attention_mask": torch.tensor([[0, 0, 0]])}], "no tokens")):
        with pytest.raises(UserError, match=match):
            evaluate_bound(model, batches, **kwargs)
    with pytest.raises(UserError, match="at least 1"):
        evaluate_bound(model, [], mc_samples=0, **kwargs)


# --------------------------------------------------------------------------- whole splits through the loader


def _dataset_with_val_sequences(root, n_val, seq_len=16, V=50):
    """A real prepared dataset (pre-tokenized ids, MDS) whose val split holds exactly n_val sequences:
    every document packs into one sequence, and documents are kept until the split's hash rule
    (data_prep.shard, val_fraction 0.5) has sent n_val of them to val."""
    from data_prep import shard
    from data_prep.readers import ReadOptions
    from prime_scale.data.tokenizer import ExternalTokenizer

    tok = ExternalTokenizer(V, 0, 1, None, "tiny")
    opts = shard.ShardOptions(seq_len=seq_len, val_fraction=0.5, progress=False, workers=1)
    shard._init_worker(tok, opts.split_seed, opts.val_fraction)
    rng = np.random.default_rng(n_val)
    docs, val = [], 0
    while val < n_val:
        ids = rng.integers(2, V, size=seq_len - 3).astype("<u4")
        is_val = shard._is_val(ids.tobytes())
        val += is_val
        docs.append(ids.tolist())
    path = root / f"docs{n_val}.jsonl"
    path.write_text("".join(json.dumps({"ids": d}) + "\n" for d in docs))
    out = root / f"ds{n_val}"
    m = shard.shard_corpus([str(path)], tok, out, opts, ReadOptions(ids_field="ids"), log=lambda s: None)
    assert m["splits"]["val"]["sequences"] == n_val
    return out


@pytest.mark.parametrize("n_val", [431, 877])
def test_a_whole_split_counts_each_sequence_once_whatever_the_batch_size(tmp_path, n_val):
    """Batches of 8 do not divide 431 or 877: the loader pads the last batch with repeats marked
    valid=False, and the evaluator counts exactly the split's sequences and their tokens."""
    from prime_scale.config import load_recipe
    from prime_scale.data import build_loader

    data = _dataset_with_val_sequences(tmp_path, n_val)
    cfg = load_recipe("tiny-cpu", [f"data.path={data}", "model.seq_len=16", "data.num_workers=0"])
    loader = build_loader(cfg, "val", 0, 1, 8, 0)
    V = 50
    r = evaluate_bound(TinyModel(V, 2), iter(loader), vocab_size=V, ell=2, seed=0)
    assert (r.sequences, r.tokens) == (n_val, n_val * 16)
    # the train split too (`prime-scale eval --split train`): one ordered pass, not the training stream
    n_train = json.loads((data / "manifest.json").read_text())["splits"]["train"]["sequences"]
    loader = build_loader(cfg, "train", 0, 1, 8, 0, single_pass=True)
    r = evaluate_bound(TinyModel(V, 2), iter(loader), vocab_size=V, ell=2, seed=0)
    assert n_train % 8 and (r.sequences, r.tokens) == (n_train, n_train * 16)
