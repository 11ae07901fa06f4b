"""The Prime objective against independent computations: brute force, enumeration, closed forms."""

import itertools
import math

import pytest
import torch

from prime_scale import noise, prime

CASES = [(2, 1), (5, 2), (16, 2), (27, 3), (100, 2), (81, 4), (256, 8), (1000, 3), (50257, 1),
         (50257, 2), (50257, 3), (50257, 4), (50257, 6), (50257, 8), (7, 5)]


# --------------------------------------------------------------------------- sub-tokens


@pytest.mark.parametrize("V,ell", CASES)
def test_base_is_smallest_integer_with_enough_codes(V, ell):
    b = prime.base_for(V, ell)
    brute = next(c for c in range(2, V + 2) if c**ell >= V)
    assert b == brute


def test_base_for_gpt2_matches_method_table():
    assert [prime.base_for(50257, ell) for ell in (2, 3, 4, 6, 8)] == [225, 37, 15, 7, 4]
    # exact powers: the float formula would give one too many
    assert prime.base_for(16, 2) == 4 and prime.base_for(27, 3) == 3 and prime.base_for(4096, 4) == 8


@pytest.mark.parametrize("V,ell", CASES)
def test_subtokenize_round_trip(V, ell):
    g = torch.Generator().manual_seed(V * 31 + ell)
    ids = torch.randint(0, V, (3, 17), generator=g)
    ids[0, 0], ids[0, 1] = 0, V - 1
    y = prime.subtokenize(ids, V, ell)
    b = prime.base_for(V, ell)
    assert y.shape == (3, 17 * ell) and y.dtype == torch.long
    assert int(y.min()) >= 0 and int(y.max()) < b
    assert torch.equal(prime.desubtokenize(y, V, ell), ids)


def test_digits_are_most_significant_first_and_token_major():
    y = prime.subtokenize(torch.tensor([[47, 5]]), 100, 2)  # b = 10
    assert y.tolist() == [[4, 7, 0, 5]]
    dig = prime.digit_table(100, 2)
    assert dig[47].tolist() == [4, 7] and dig.shape == (100, 2)


def test_desubtokenize_refuses_mask_symbol():
    with pytest.raises(ValueError, match="mask"):
        prime.desubtokenize(torch.tensor([[3, 10]]), 100, 2)


# --------------------------------------------------------------------------- carry-over


def _random_case(V, ell, B=2, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V, (B, L), generator=g)
    logits = torch.randn(B, L, V, generator=g) * 3
    mask = torch.rand(B, L * ell, generator=g) < 0.5
    return x0, logits, mask


@pytest.mark.parametrize("V,ell", [(5, 2), (100, 2), (1000, 3), (81, 4)])
def test_carry_over_fully_unmasked_and_fully_masked(V, ell):
    x0, logits, _ = _random_case(V, ell)
    none = torch.zeros(x0.shape[0], x0.shape[1] * ell, dtype=torch.bool)
    lp = prime.carry_over_log_probs(logits, prime.apply_mask(x0, none, V, ell), V, ell)
    assert torch.equal(lp.gather(-1, x0.unsqueeze(-1)).squeeze(-1), torch.zeros_like(x0, dtype=torch.float))
    assert torch.isinf(lp).sum() == x0.numel() * (V - 1)
    lp_all = prime.carry_over_log_probs(logits, prime.apply_mask(x0, ~none, V, ell), V, ell)
    torch.testing.assert_close(lp_all, torch.log_softmax(logits, -1))


@pytest.mark.parametrize("V,ell", [(5, 2), (100, 2), (1000, 3), (81, 4)])
def test_carry_over_mass_only_on_consistent_classes(V, ell):
    x0, logits, mask = _random_case(V, ell, seed=3)
    yt = prime.apply_mask(x0, mask, V, ell)
    lp = prime.carry_over_log_probs(logits, yt, V, ell)
    b = prime.base_for(V, ell)
    dig = prime.digit_table(V, ell)
    for bi, li in itertools.product(range(x0.shape[0]), range(x0.shape[1])):
        visible = yt[bi, li * ell:(li + 1) * ell]
        ok = torch.tensor([all(v == b or int(dig[c, j]) == v for j, v in enumerate(visible.tolist()))
                           for c in range(V)])
        p = lp[bi, li].exp()
        assert float(p[~ok].sum()) == 0.0
        ref = torch.softmax(logits[bi, li][ok], -1)
        torch.testing.assert_close(p[ok], ref)


def test_carry_over_refuses_digits_matching_no_token():
    V, ell = 5, 2  # b = 3: code 2*3 + 2 = 8 >= 5 is invalid
    yt = torch.tensor([[2, 2]])
    with pytest.raises(ValueError, match="no valid token"):
        prime.carry_over_log_probs(torch.zeros(1, 1, V), yt, V, ell)


def test_ell_one_is_mdlm_subs():
    V = 11
    x0, logits, _ = _random_case(V, 1, B=4, L=9, seed=5)
    t = torch.tensor([0.2, 0.5, 0.7, 1.0])
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(1)) < t[:, None]
    yt = prime.apply_mask(x0, mask, V, 1)
    assert int(yt.max()) <= V and prime.base_for(V, 1) == V  # mask symbol = V, never a class
    lp = prime.carry_over_log_probs(logits, yt, V, 1)
    assert lp.shape[-1] == V
    joint, jm = prime.joint_loss(lp, x0, t, None)
    elbo, em = prime.subtoken_elbo(lp, x0, yt, t, None, V, 1)
    torch.testing.assert_close(joint, elbo)
    # MDLM's SUBS loss written independently: masked positions only, -log softmax(x0) / t
    ref = torch.where(mask, -torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0] / t[:, None], 0.0)
    torch.testing.assert_close(elbo, ref)
    torch.testing.assert_close(em, ref.mean())
    torch.testing.assert_close(jm, ref.sum() / ref.numel())  # no attention mask: every position counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_finite_under_extreme_logits(dtype):
    V, ell = 1000, 3
    x0, logits, mask = _random_case(V, ell, B=3, L=7, seed=9)
    logits = (logits * 1e4).to(dtype)
    logits[0, 0] = float("-inf")
    logits[0, 0, x0[0, 0]] = 0.0
    yt = prime.apply_mask(x0, mask, V, ell)
    t = torch.tensor([1e-3, 0.5, 1.0])
    attn = torch.ones(3, 7, dtype=torch.bool)
    attn[2, 5:] = False
    for objective in ("prime_joint", "prime_elbo"):
        nll, mean = prime.prime_loss(logits, x0, yt, t, attn, V, ell, objective)
        assert torch.isfinite(nll).all() and torch.isfinite(mean)
        assert (nll[2, 5:] == 0).all()


def test_elbo_gradient_is_finite_in_bf16():
    V, ell = 50257, 4
    x0, _, mask = _random_case(V, ell, B=1, L=3, seed=2)
    logits = torch.randn(1, 3, V, dtype=torch.bfloat16, requires_grad=True)
    yt = prime.apply_mask(x0, mask, V, ell)
    _, mean = prime.prime_loss(logits, x0, yt, torch.tensor([0.3]), None, V, ell, "prime_elbo")
    mean.backward()
    assert torch.isfinite(logits.grad.float()).all()


# --------------------------------------------------------------------------- the bound, by enumeration


def _exact_nelbo(logits_fn, V, L, ell, objective):
    """Exact NELBO of every sequence x in [0, V)^L with the ε = 0 schedule α_t = 1 - t: enumerate
    every sub-token mask pattern m (k of n = L·ell masked) and integrate the 1/t weight over t in
    closed form, ∫_0^1 t^(k-1) (1-t)^(n-k) dt = B(k, n-k+1)."""
    n = L * ell
    xs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    patterns = torch.tensor(list(itertools.product([False, True], repeat=n)))
    weights = torch.tensor([math.gamma(k) * math.gamma(n - k + 1) / math.gamma(n + 1) if k else 0.0
                            for k in patterns.sum(1).tolist()], dtype=torch.float64)
    X = xs.repeat_interleave(len(patterns), 0)
    M = patterns.repeat(len(xs), 1)
    yt = prime.apply_mask(X, M, V, ell)
    lp = prime.carry_over_log_probs(logits_fn(yt), yt, V, ell)
    one = torch.ones(len(X))
    if objective == "joint":
        nll, _ = prime.joint_loss(lp, X, one, None)
    else:
        nll, _ = prime.subtoken_elbo(lp, X, yt, one, None, V, ell)
    per_pattern = nll.sum(-1).double().view(len(xs), len(patterns))
    return xs, (per_pattern * weights).sum(-1)


def _random_model(V, L, ell, seed):
    b = prime.base_for(V, ell)
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(L * ell * (b + 1), 32, generator=g)
    w2 = torch.randn(32, L * V, generator=g) * 2

    def logits_fn(yt):
        h = torch.tanh(torch.nn.functional.one_hot(yt, b + 1).flatten(1).float() @ w1)
        return (h @ w2).view(-1, L, V)

    return logits_fn


def _ideal_model(q, V, L, ell):
    """The exact posterior marginal of every token given the visible digits, for data law q."""
    xs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    digits = prime.subtokenize(xs, V, ell)
    b = prime.base_for(V, ell)

    def logits_fn(yt):
        consistent = ((yt[:, None, :] == b) | (yt[:, None, :] == digits[None])).all(-1)  # [N, |X|]
        post = consistent.double() * q[None]
        post = post / post.sum(-1, keepdim=True)
        marg = torch.zeros(len(yt), L, V, dtype=torch.float64)
        for i in range(L):
            marg[:, i].index_add_(1, xs[:, i], post)
        return marg.clamp_min(1e-300).log().float()

    return logits_fn


@pytest.mark.parametrize("V,L,ell", [(5, 2, 2), (4, 1, 2), (8, 1, 3), (3, 2, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subtoken_elbo_is_a_bound_for_random_models(V, L, ell, seed):
    _, nelbo = _exact_nelbo(_random_model(V, L, ell, seed), V, L, ell, "elbo")
    total = float(torch.exp(-nelbo).sum())
    assert total <= 1.0 + 1e-5, total


@pytest.mark.parametrize("V,L,ell", [(5, 2, 2), (4, 1, 2), (8, 1, 3)])
def test_bound_is_tight_for_the_ideal_model_and_joint_is_not_a_bound(V, L, ell):
    g = torch.Generator().manual_seed(V + L + ell)
    q = torch.softmax(torch.randn(V**L, generator=g, dtype=torch.float64) * 1.5, 0)
    xs, nelbo = _exact_nelbo(_ideal_model(q, V, L, ell), V, L, ell, "elbo")
    # the ideal model makes the ELBO exact: NELBO(x) = -log q(x), so the total mass is 1
    torch.testing.assert_close(nelbo, -q.log(), rtol=1e-4, atol=1e-4)
    _, joint = _exact_nelbo(_ideal_model(q, V, L, ell), V, L, ell, "joint")
    entropy = float(-(q * q.log()).sum())
    assert float((q * joint).sum()) < entropy  # below the data entropy: not a bound
    assert float(torch.exp(-joint).sum()) > 1.0


# --------------------------------------------------------------------------- noise


def test_antithetic_t_one_sample_per_stratum():
    n = 16
    t = noise.stratified_time(torch.rand(n, generator=torch.Generator().manual_seed(0)), torch.arange(n), n)
    u = (t - prime.EPS) / (1 - prime.EPS)
    assert sorted((u * n).floor().long().tolist()) == list(range(n))
    assert float(t.min()) >= prime.EPS and float(t.max()) <= 1.0


def test_noise_is_independent_of_batch_split():
    index = torch.arange(100, 116)
    t_all, m_all = noise.prime_noise(7, 3, index, index, 16, 12, 3)
    parts = [noise.prime_noise(7, 3, chunk, chunk, 16, 12, 3) for chunk in (index[:5], index[5:6], index[6:])]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), t_all, rtol=0, atol=0)
    assert torch.equal(torch.cat([p[1] for p in parts]), m_all)
    # a permuted batch gives each sample its own noise
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    t_p, m_p = noise.prime_noise(7, 3, index[perm], index[perm], 16, 12, 3)
    assert torch.equal(t_p, t_all[perm]) and torch.equal(m_p, m_all[perm])


def test_noise_differs_across_step_seed_and_sample():
    index = torch.arange(8)
    base_t, base_m = noise.prime_noise(0, 0, index, index, 8, 64, 2)
    for other in (noise.prime_noise(1, 0, index, index, 8, 64, 2), noise.prime_noise(0, 1, index, index, 8, 64, 2),
                  noise.prime_noise(0, 0, index + 8, index, 8, 64, 2)):
        assert not torch.equal(other[0], base_t) and not torch.equal(other[1], base_m)


def test_noise_stratified_over_global_batch_and_mask_rate_follows_t():
    n, L, ell = 64, 128, 2
    t, m = noise.prime_noise(3, 11, torch.arange(n * 5, n * 6), torch.arange(n * 5, n * 6), n, L, ell)
    u = (t.double() - prime.EPS) / (1 - prime.EPS)
    assert sorted((u * n).floor().long().tolist()) == list(range(n))
    rate = m.double().mean(1)
    expected = (1 - prime.EPS) * t.double()
    # each row: L·ell Bernoulli draws; 5 standard deviations
    sd = (expected * (1 - expected) / (L * ell)).sqrt()
    assert ((rate - expected).abs() <= 5 * sd + 1e-9).all()


def test_training_noise_is_the_documented_draw():
    """Replays the documented key and formulas: t = stratified_time(u, position mod G, G) and each
    sub-token masked when its uniform is below (1 − ε)·t (the mask rate of α_t = 1 − (1 − ε) t)."""
    index, position, G, L, ell = torch.tensor([901, 17, 4]), torch.tensor([40, 41, 47]), 8, 300, 2
    t, mask = noise.prime_noise(6, 9, index, position, G, L, ell)
    for row, (i, pos) in enumerate(zip(index.tolist(), position.tolist())):
        g = torch.Generator().manual_seed(noise.generator_seed(6, 9, i))
        u = torch.rand((), generator=g, dtype=torch.float64)
        t_ref = noise.stratified_time(u, pos % G, G)
        assert float(t[row]) == pytest.approx(float(t_ref), abs=1e-7)
        uniforms = torch.rand(L * ell, generator=g, dtype=torch.float64)
        assert torch.equal(mask[row], uniforms < (1 - prime.EPS) * t_ref)


def test_training_strata_follow_the_position_in_the_global_batch_not_the_sample_id():
    """A shuffled loader hands a step random sample ids; the G positions of the step still fill
    the G strata exactly once (keyed on ids mod G, they would collide)."""
    G = 16
    for step in range(5):
        ids = torch.randperm(10_000, generator=torch.Generator().manual_seed(step))[:G]
        position = torch.arange(step * G, (step + 1) * G)
        t, _ = noise.prime_noise(0, step, ids, position, G, 4, 2)
        strata = ((t.double() - prime.EPS) / (1 - prime.EPS) * G).floor().long()
        assert sorted(strata.tolist()) == list(range(G))


def test_out_of_range_ids_are_refused_not_encoded_as_other_tokens():
    for bad in (9, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary \\[0, 6\\)"):
            prime.subtokenize(torch.tensor([[1, bad]]), 6, 2)
    with pytest.raises(ValueError, match="sample 7, position 1: token id 6"):
        noise.make_batch(torch.tensor([[1, 6]]), torch.tensor([7]), torch.tensor([0]), seed=0, step=0,
                         global_batch=1, vocab_size=6, ell=2)


def test_inconsistent_positions_removed_by_the_attention_mask_cannot_poison_gradients():
    """yt whose visible digit disagrees with x0 (at a padding position): the ELBO stays finite and its
    gradient has no NaN (a digit group with no allowed class used to back-propagate NaN)."""
    V, ell = 9, 2  # b = 3
    x0 = torch.tensor([[4, 5]])  # digits (1, 1), (1, 2)
    yt = torch.tensor([[1, 3, 0, 3]])  # position 1 shows first digit 0, but x0 has 1
    attention = torch.tensor([[True, False]])
    logits = torch.randn(1, 2, V, requires_grad=True)
    for objective in ("prime_elbo", "prime_joint"):
        _, mean = prime.prime_loss(logits, x0, yt, torch.tensor([0.5]), attention, V, ell, objective)
        (grad,) = torch.autograd.grad(mean, logits)
        assert torch.isfinite(mean) and torch.isfinite(grad).all(), objective
        assert float(grad[0, 1].abs().sum()) == 0.0
