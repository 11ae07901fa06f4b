"""The evaluator core against an exact, independently computed bound (enumeration of every mask
pattern, exact integration over t), and its determinism / batch-split independence."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from prime_scale.errors import UserError
from prime_scale.evaluation import EvalResult, EvalTotals, bound_totals, evaluate_bound
from prime_scale.prime import EPS, base_for

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


def batches_of(x0, index, sizes, attention_mask=None):
    out, start = [], 0
    for n in sizes:
        batch = {"input_ids": x0[start:start + n], "index": index[start:start + n]}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask[start:start + n]
        out.append(batch)
        start += n
    return out


def random_data(V, L, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V, (n, L), generator=g)
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    attention_mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return x0.masked_fill(attention_mask == 0, -100), torch.arange(100, 100 + n), attention_mask


# --------------------------------------------------------------------------- exact bound


def exact_expected_bound(model, x0, V, ell):
    """E_{t ~ U[EPS, 1]} E_{mask ~ Bernoulli((1-EPS) t)} [(1/t) Σ_{masked digits} -log p(digit)],
    the digit's marginal under the carry-over-restricted joint, by brute force: every mask pattern,
    plain Python sums over classes, and Gauss-Legendre in t (exact: the integrand is a polynomial)."""
    b, L, N = base_for(V, ell), len(x0), len(x0) * ell
    digit = lambda c, j: (c // b ** (ell - 1 - j)) % b  # noqa: E731
    target = [digit(x, j) for x in x0 for j in range(ell)]
    loss_by_masked = [0.0] * (N + 1)
    for pattern in itertools.product([False, True], repeat=N):
        yt = [b if m else d for m, d in zip(pattern, target)]
        logits = model(torch.tensor([yt]))[0].double().tolist()
        loss = 0.0
        for i in range(L):
            mine = pattern[i * ell:(i + 1) * ell]
            allowed = [c for c in range(V) if all(mine[j] or digit(c, j) == target[i * ell + j] for j in range(ell))]
            log_z = math.log(sum(math.exp(logits[i][c]) for c in allowed))
            for j in range(ell):
                if mine[j]:
                    hit = [c for c in allowed if digit(c, j) == target[i * ell + j]]
                    loss -= math.log(sum(math.exp(logits[i][c]) for c in hit)) - log_z
        loss_by_masked[sum(pattern)] += loss
    nodes, weights = np.polynomial.legendre.leggauss(12)
    total = 0.0
    for node, w in zip(nodes, weights):
        t = EPS + (1 - EPS) * (node + 1) / 2
        q = (1 - EPS) * t
        total += w / 2 * sum(loss_by_masked[k] * q**k * (1 - q) ** (N - k) / t for k in range(1, N + 1))
    return total


@pytest.mark.parametrize("x0", [[3, 1], [4, 0]])
@pytest.mark.parametrize("global_batch", [None, 8])
def test_bound_matches_exact_enumeration(x0, global_batch):
    V, ell, L, copies, K = 5, 2, 2, 128, 64  # b = 3: codes 5..8 are invalid
    model = TinyModel(V, ell, seed=1)
    exact = exact_expected_bound(model, x0, V, ell) / L
    data = torch.tensor([x0] * copies)
    result = evaluate_bound(model, batches_of(data, torch.arange(copies), [50, 78]), vocab_size=V, ell=ell,
                            seed=3, mc_samples=K, global_batch=global_batch)
    assert result.tokens == copies * L and result.sequences == copies
    # identical sequences: the standard error is pure Monte Carlo error
    assert abs(result.nll_per_token - exact) < 4 * result.stderr, (result.nll_per_token, exact, result.stderr)
    assert result.stderr < 0.04 * exact  # and small enough for the comparison to mean something


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


@pytest.mark.parametrize("global_batch", [None, 4])
def test_deterministic_and_independent_of_batch_split(global_batch):
    V, ell = 10, 3
    x0, index, am = random_data(V, 5, 12, seed=4)
    model = TinyModel(V, ell, seed=2)
    kwargs = dict(vocab_size=V, ell=ell, seed=11, mc_samples=3, global_batch=global_batch)
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
    whole = bound_totals(model, batches_of(x0, index, [9], am), **kwargs)
    rank0 = bound_totals(model, batches_of(x0[::2], index[::2], [5], am[::2]), **kwargs)
    rank1 = bound_totals(model, batches_of(x0[1::2], index[1::2], [4], am[1::2]), **kwargs)
    summed = EvalTotals.from_tensor(rank0.to_tensor() + rank1.to_tensor())
    meta = dict(mc_samples=2, seed=1, step_key=-1, global_batch=None, vocab_size=V, ell=ell, carry_over=True)
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
