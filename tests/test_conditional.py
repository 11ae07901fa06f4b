"""The conditional bound behind the lm-eval backend (prime_scale.conditional) against independent
computations: the bound proved by enumeration (for every context, Σ over continuations of
exp(−NELBO(continuation | context)) ≤ 1, and = 1 for the ideal model, so the context really is given
and only the continuation is charged), its Monte Carlo estimate against the exact expectation, the
evaluator's own totals on the same draws, batch-size and order independence, the chain of windows,
and the greedy fill."""

import itertools
import math

import pytest
import torch

from prime_scale import noise
from prime_scale.conditional import ConditionalBound, conditional_bounds, request_key, windows
from prime_scale.evaluation import estimate, objective_sums
from prime_scale.sampling import greedy_decode
from test_evaluation import IdealModel, TinyModel

torch.set_num_threads(1)


def exact_conditional_nelbo(logits_fn, context, continuation, V, ell):
    """E[estimate] by enumeration: every mask of the continuation's sub-tokens with the probability
    the evaluation noise gives it, the context unmasked and not counted."""
    P, L = len(context), len(context) + len(continuation)
    N = len(continuation) * ell
    masks = torch.tensor([[False] * (P * ell) + list(p) for p in itertools.product([False, True], repeat=N)
                          if any(p)])
    rows = torch.tensor([list(context) + list(continuation)] * len(masks))
    counted = torch.zeros(len(masks), L, dtype=torch.bool)
    counted[:, P:] = True
    batch = noise.masked_eval_batch(rows, masks, counted, V, ell)
    sums = objective_sums(logits_fn, V, ell)([batch])[:, 0]
    prob = torch.tensor([noise.eval_mask_probability(int(m.sum()), N) for m in masks], dtype=torch.float64)
    return float((prob * sums).sum())


@pytest.mark.parametrize("V,ell", [(5, 2), (4, 3)])
def test_the_conditional_bound_is_proved_by_enumeration(V, ell):
    L = 3  # one context token, two continuation tokens
    ideal = IdealModel(V, ell, L, seed=V * ell)
    models = [TinyModel(V, ell, seed=s) for s in (0, 1)]
    for context in range(V):
        conts = list(itertools.product(range(V), repeat=L - 1))
        mass = sum(math.exp(-exact_conditional_nelbo(ideal, [context], c, V, ell)) for c in conts)
        assert mass == pytest.approx(1.0, abs=1e-5), (context, mass)  # tight: it is −log p(cont | ctx)
        for model in models:
            mass = sum(math.exp(-exact_conditional_nelbo(model, [context], c, V, ell)) for c in conts)
            assert mass <= 1.0 + 1e-5, (context, mass)


def test_the_estimate_converges_to_the_exact_conditional_nelbo():
    V, ell = 5, 2
    model = TinyModel(V, ell, seed=2)
    pair = ([1, 4], [3, 0])
    exact = exact_conditional_nelbo(model, *pair, V, ell)
    (bound,) = conditional_bounds(model, [pair], vocab_size=V, ell=ell, seed=0, mc_samples=256)
    assert bound.tokens == 2 and bound.draws == 256 and bound.stderr > 0
    assert abs(bound.nll - exact) < 4 * bound.stderr, (bound.nll, exact, bound.stderr)


def _pairs(V, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        P, C = (int(v) for v in torch.randint(1, 4, (2,), generator=g))
        out.append((torch.randint(0, V, (P,), generator=g).tolist(), torch.randint(0, V, (C,), generator=g).tolist()))
    return out


def test_equals_the_evaluators_totals_on_the_same_draws():
    """The evaluator (`estimate`, what `prime-scale eval` runs) fed the same sequences, the context
    as not-counted positions and the request's key as its sample index, gives the same numbers."""
    V, ell, K = 7, 2, 5
    model = TinyModel(V, ell, seed=3)
    pairs = _pairs(V, 12)
    bounds = conditional_bounds(model, pairs, vocab_size=V, ell=ell, seed=11, mc_samples=K, batch_size=4)
    for (context, continuation), bound in zip(pairs, bounds):
        x0 = torch.tensor([context + continuation])
        counted = torch.tensor([[False] * len(context) + [True] * len(continuation)])
        totals = estimate(objective_sums(model, V, ell), [[{"input_ids": x0, "attention_mask": counted,
                                                           "index": torch.tensor([request_key(context, continuation)])}]],
                          vocab_size=V, ell=ell, seed=11, mc_samples=K)
        assert totals.tokens == len(continuation)
        assert bound.nll == pytest.approx(totals.nll, rel=1e-12, abs=1e-12)


def test_batch_size_and_order_change_nothing_and_the_seed_does():
    V, ell = 9, 2
    model = TinyModel(V, ell, seed=4)
    pairs = _pairs(V, 20, seed=1)
    one = conditional_bounds(model, pairs, vocab_size=V, ell=ell, seed=2, mc_samples=3, batch_size=1)
    eight = conditional_bounds(model, pairs, vocab_size=V, ell=ell, seed=2, mc_samples=3, batch_size=8)
    assert one == eight  # bitwise: the noise is keyed by the request, rows only stack same-length requests
    order = list(reversed(range(len(pairs))))
    shuffled = conditional_bounds(model, [pairs[i] for i in order], vocab_size=V, ell=ell, seed=2, mc_samples=3,
                                  batch_size=5)
    assert [shuffled[order.index(i)] for i in range(len(pairs))] == one
    other = conditional_bounds(model, pairs, vocab_size=V, ell=ell, seed=3, mc_samples=3, batch_size=8)
    assert [b.nll for b in other] != [b.nll for b in one]


def test_request_keys_tell_the_split_apart():
    assert request_key([1, 2], [3]) != request_key([1], [2, 3])
    assert request_key([1, 2], [3]) == request_key((1, 2), (3,))
    assert 0 <= request_key([5] * 100, [7]) < 1 << 62


@pytest.mark.parametrize("P,C,seq_len", [(3, 4, 8), (10, 4, 8), (2, 20, 8), (0, 9, 4), (5, 7, 8)])
def test_windows_chain_the_continuation_through_the_model_window(P, C, seq_len):
    context, continuation = list(range(100, 100 + P)), list(range(C))
    pieces = windows(context, continuation, seq_len)
    assert [t for _, piece in pieces for t in piece] == continuation  # every token once, in order
    stream = context + continuation
    at = P
    for before, piece in pieces:
        assert 1 <= len(piece) <= seq_len - 1 and len(before) + len(piece) <= seq_len
        assert before == stream[max(0, at - (seq_len - len(piece))):at]  # the most that fits, left-truncated
        at += len(piece)
    assert len(pieces) == math.ceil(C / (seq_len - 1))
    with pytest.raises(ValueError):
        windows(context, continuation, 1)


def test_bounds_of_pieces_add_with_errors_in_quadrature():
    total = ConditionalBound(1.0, 0.3, 2, 4) + ConditionalBound(2.5, 0.4, 3, 4)
    assert (total.nll, total.tokens) == (3.5, 5) and total.stderr == pytest.approx(0.5)


def test_greedy_fill_takes_the_most_confident_position_first():
    """A model whose every position puts most mass on token 2 except position 3, which is far more
    confident about token 1: the fill puts 1 at position 3 first; each call fixes one token."""
    V, ell, L = 4, 2, 5
    calls = []

    def logits_fn(yt):
        calls.append(yt.clone())
        logits = torch.zeros(yt.shape[0], L, V)
        logits[:, :, 2] = 2.0
        logits[:, 3, 1] = 9.0
        return logits

    filled = greedy_decode(logits_fn, torch.tensor([0]), L, V, ell)
    assert filled.tolist() == [2, 2, 1, 2] and len(calls) == L - 1
    b = 2  # base_for(4, 2)
    second = calls[1].view(L, ell)
    assert (second[3] != b).all() and (second[1:3] == b).all() and (second[4] == b).all()
    # the ideal model of a point mass fills in exactly that sequence
    ideal = IdealModel(3, 2, 3, seed=0)
    ideal.p = torch.zeros_like(ideal.p)
    target = ideal.seqs.index((1, 2, 0))
    ideal.p[target] = 1.0
    assert greedy_decode(ideal, torch.tensor([1]), 3, 3, 2).tolist() == [2, 0]
