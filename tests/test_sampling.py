"""The ancestral sub-token sampler against closed forms and exact distributions.

The "models" here are fixed functions of yt (the sampler only ever sees a callable); idle-step
statistics do not depend on the model at all, and for a model that ignores yt the sampler's output
must follow the model's own distribution exactly (chain rule over revealed digits)."""

import math

import pytest
import torch

from prime_scale.errors import UserError
from prime_scale.prime import base_for, subtokenize
from prime_scale.sampling import INVALID_TOKEN, T_END, ancestral_sample, expected_isr

torch.set_num_threads(1)


class Counting:
    """Wraps a logits function; records every input it was called with."""

    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, yt):
        self.inputs.append(yt.clone())
        return self.fn(yt)


def fixed_logits(table):
    """A model that ignores yt: logits[b, i] = table[i]."""
    return lambda yt: table.expand(yt.shape[0], *table.shape).clone()


def digits_of(c, b, ell):
    return [(c // b ** (ell - 1 - j)) % b for j in range(ell)]


# --------------------------------------------------------------------------- idle steps, NFE


def exact_idle_moments(steps, n):
    """Mean and variance of the idle-step ratio for n initially masked sub-tokens, derived from the
    grid step by step (not from the telescoped closed form): a sub-token reveals at step k with
    probability d_k = Π_{j<k}(1 - p_j) p_k, p_k = (t_k - t_{k+1})/t_k, at most once."""
    grid = torch.linspace(1.0, T_END, steps + 1, dtype=torch.float64).tolist()
    d, alive = [], 1.0
    for k in range(steps):
        p = (grid[k] - grid[k + 1]) / grid[k]
        d.append(alive * p)
        alive *= 1 - p
    q = [(1 - dk) ** n for dk in d]
    var = sum(qk * (1 - qk) for qk in q)
    var += sum((1 - d[j] - d[k]) ** n - q[j] * q[k] for j in range(steps) for k in range(steps) if j != k)
    return sum(q) / steps, var / steps**2


def test_closed_form_matches_stepwise_derivation():
    for steps, n in [(8, 6), (64, 10), (1024, 1024)]:
        mean, _ = exact_idle_moments(steps, n)
        assert expected_isr(n, steps) == pytest.approx(mean, rel=1e-9)

@pytest.mark.parametrize("ell,paper_percent", [(1, 36.77), (2, 13.52), (3, 4.97), (4, 1.83), (6, 0.25), (8, 0.03)])
def test_closed_form_reproduces_the_papers_isr_table(ell, paper_percent):
    """The paper's measured ISR at L = 1024, T = 1024 (Chao et al. 2025, the idle-step ratio table), to its printed digits."""
    assert round(100 * expected_isr(1024 * ell, 1024), 2) == paper_percent


def test_measured_isr_matches_closed_form_one_sequence_at_a_time():
    V, ell, L, steps, runs = 7, 2, 3, 8, 300
    table = torch.randn(L, V, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    isr = [ancestral_sample(fixed_logits(table), 1, L, V, ell, steps, generator=g).isr for _ in range(runs)]
    mean, var = exact_idle_moments(steps, L * ell)
    se = math.sqrt(var / runs)
    measured = sum(isr) / runs
    assert abs(measured - mean) < 4 * se, (measured, mean, se)
    assert abs(mean - (1 - 1 / steps) ** (L * ell)) < 1e-3  # the approximation


def test_per_sequence_isr_matches_closed_form_with_prefix():
    V, ell, L, P, steps, B = 10, 3, 4, 1, 16, 3000  # b = 3: 27 codes, 17 of them invalid
    table = torch.randn(L, V, generator=torch.Generator().manual_seed(2))
    out = ancestral_sample(fixed_logits(table), B, L, V, ell, steps, prefix=torch.tensor([9]),
                           generator=torch.Generator().manual_seed(3))
    n = (L - P) * ell  # the prefix's sub-tokens are never masked
    mean, var = exact_idle_moments(steps, n)
    assert abs(out.seq_isr - mean) < 4 * math.sqrt(var / B), (out.seq_isr, mean)
    assert out.seq_isr == pytest.approx(expected_isr(n, steps), abs=4 * math.sqrt(var / B))
    # a batch is idle only when all its sequences are: almost never at this size
    assert out.idle_steps <= int(out.seq_idle_steps.min())


@pytest.mark.parametrize("V,ell,L,B,steps,carry,P", [
    (7, 1, 5, 1, 40, True, 0), (7, 2, 3, 2, 30, True, 1), (10, 3, 4, 1, 100, True, 0),
    (10, 3, 4, 3, 5, False, 2), (5, 2, 2, 1, 1, True, 0), (5, 2, 3, 2, 12, True, 3), (9, 2, 6, 4, 64, True, 1)])
def test_the_network_runs_only_for_sequences_that_draw(V, ell, L, B, steps, carry, P):
    """Per-sequence caching: a sequence is computed at the steps where it draws (its non-idle
    steps) and for the final fill if it still has something masked; never otherwise."""
    table = torch.randn(L, V, generator=torch.Generator().manual_seed(V + L))
    prefix = torch.arange(P) % V if P else None
    for seed in range(5):
        model = Counting(fixed_logits(table))
        out = ancestral_sample(model, B, L, V, ell, steps, prefix=prefix, carry_over=carry,
                               generator=torch.Generator().manual_seed(seed))
        assert out.nfe == len(model.inputs) and out.nfe - (steps - out.idle_steps) in (0, 1)
        assert int(out.seq_nfe.sum()) == sum(x.shape[0] for x in model.inputs)  # rows computed = Σ per sequence
        extra = out.seq_nfe - (steps - out.seq_idle_steps)  # the final fill: 1 where something was left
        assert bool(((extra == 0) | (extra == 1)).all())
        if B == 1:  # one sequence: every call sees a strictly more unmasked input
            for a, c in zip(model.inputs, model.inputs[1:]):
                assert not torch.equal(a, c)
    if P == L:  # nothing to sample: every step idle and no call at all
        assert out.idle_steps == steps and out.nfe == 0


def test_the_head_runs_only_at_the_positions_that_draw():
    """A Predictor sees each drawing position's state once per draw, never all B·L positions."""
    V, ell, L, B, steps = 12, 2, 16, 3, 40
    table = torch.randn(L, V, generator=torch.Generator().manual_seed(1))

    class Split:
        def __init__(self):
            self.rows, self.positions = [], 0

        def states(self, yt):
            self.rows.append(yt.shape[0])
            return table.expand(yt.shape[0], L, V).clone()

        def logits_at(self, states):
            self.positions += states.shape[0]
            return states

    split = Split()
    out = ancestral_sample(split, B, L, V, ell, steps, generator=torch.Generator().manual_seed(0))
    # a position draws each time one of its digits reveals (once or up to ell times), never when idle …
    assert B * L <= split.positions <= B * L * ell
    assert sum(split.rows) == int(out.seq_nfe.sum())
    plain = ancestral_sample(fixed_logits(table), B, L, V, ell, steps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.tokens, out.tokens) and plain.nfe == out.nfe  # … and the draws are the same


# --------------------------------------------------------------------------- validity, distribution


def adversarial(V, ell):
    """Logits that push hard towards classes INCONSISTENT with the visible digits, so a sampler
    without the carry-over restriction mixes digits of different tokens into invalid codes."""
    b = base_for(V, ell)
    dig = torch.tensor([digits_of(c, b, ell) for c in range(V)])  # own digit table

    def fn(yt):
        y = yt.view(yt.shape[0], -1, ell)
        visible = y != b
        agrees = ((dig[None, None] == y[:, :, None]) | ~visible[:, :, None]).all(-1)  # [B, L, V]
        return 20.0 * (~agrees).float() + (dig[:, 0] == b - 1).float() * 5.0
    return fn


@pytest.mark.parametrize("V,ell", [(5, 2), (10, 3), (50, 2), (7, 1)])
def test_carry_over_never_produces_an_invalid_code(V, ell):
    b = base_for(V, ell)
    out = ancestral_sample(adversarial(V, ell), 400, 6, V, ell, 12,
                           generator=torch.Generator().manual_seed(V))
    assert out.invalid_codes == 0
    assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < V
    assert torch.equal(subtokenize(out.tokens, V, ell), out.subtokens)
    assert int(out.subtokens.max()) < b  # no mask symbol left


@pytest.mark.parametrize("V,ell", [(5, 2), (10, 3)])
def test_without_carry_over_invalid_codes_are_counted_and_flagged(V, ell):
    b = base_for(V, ell)
    out = ancestral_sample(adversarial(V, ell), 400, 6, V, ell, 12, carry_over=False,
                           generator=torch.Generator().manual_seed(V))
    codes = (out.subtokens.view(400, 6, ell) * torch.tensor([b ** (ell - 1 - j) for j in range(ell)])).sum(-1)
    invalid = codes >= V
    assert out.invalid_codes == int(invalid.sum()) > 0
    assert torch.equal(out.tokens == INVALID_TOKEN, invalid)
    assert torch.equal(out.tokens[~invalid], codes[~invalid])


def chi_square(counts, probs):
    n = counts.sum()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("V,ell,steps", [(5, 1, 8), (5, 2, 32), (10, 3, 32), (10, 3, 1)])
def test_with_carry_over_samples_follow_the_model_distribution(V, ell, steps):
    """A model that ignores yt defines p(x_i) = softmax(table[i]); drawing revealed digits one
    group at a time, each from p restricted to the digits already visible, is the chain rule, so
    the final tokens must be distributed as p exactly."""
    L, B = 3, 3000
    table = torch.randn(L, V, generator=torch.Generator().manual_seed(7)) * 1.5
    out = ancestral_sample(fixed_logits(table), B, L, V, ell, steps,
                           generator=torch.Generator().manual_seed(8))
    stat = sum(chi_square(torch.bincount(out.tokens[:, i], minlength=V).double(),
                          torch.softmax(table[i].double(), -1)) for i in range(L))
    dof = L * (V - 1)
    assert stat < dof + 6 * math.sqrt(2 * dof), stat  # about p < 1e-4


def test_temperature_and_nucleus_reshape_the_distribution():
    V, L, B = 5, 2, 3000
    p = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04], dtype=torch.float64)
    table = p.log().float().expand(L, V)
    hot = ancestral_sample(fixed_logits(table), B, L, V, 1, 4, temperature=2.0,
                           generator=torch.Generator().manual_seed(0))
    warm = p.sqrt() / p.sqrt().sum()
    stat = chi_square(torch.bincount(hot.tokens.flatten(), minlength=V).double(), warm)
    assert stat < 4 + 6 * math.sqrt(8), stat
    # nucleus 0.75 keeps {0, 1} (mass ahead of token 2 is 0.8), renormalised to 5:3
    nucleus = ancestral_sample(fixed_logits(table), B, L, V, 1, 4, top_p=0.75,
                               generator=torch.Generator().manual_seed(0))
    assert set(nucleus.tokens.unique().tolist()) == {0, 1}
    share = float((nucleus.tokens == 0).double().mean())
    assert abs(share - 0.625) < 4 * math.sqrt(0.625 * 0.375 / (B * L))


# --------------------------------------------------------------------------- behaviour


def test_prefix_is_kept_and_visible_to_every_call():
    V, ell, L = 10, 3, 5
    prefix = torch.tensor([9, 0, 4])
    model = Counting(adversarial(V, ell))
    out = ancestral_sample(model, 4, L, V, ell, 10, prefix=prefix, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens[:, :3], prefix.expand(4, 3))
    want = subtokenize(prefix, V, ell)
    for yt in model.inputs:  # the sequences that draw at that step, each with the prefix
        assert torch.equal(yt[:, : 3 * ell], want.expand(yt.shape[0], -1))


def test_seeded_generator_is_deterministic():
    V, ell, L = 10, 2, 6
    table = torch.randn(L, V, generator=torch.Generator().manual_seed(0))
    runs = [ancestral_sample(fixed_logits(table), 8, L, V, ell, 20, top_p=0.9, temperature=0.8,
                             generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and runs[0].nfe == runs[1].nfe
    assert torch.equal(runs[0].seq_idle_steps, runs[1].seq_idle_steps)
    assert not torch.equal(runs[0].tokens, runs[2].tokens)


@pytest.mark.parametrize("ell,carry", [(1, True), (2, True), (2, False)])
def test_revealed_sub_tokens_never_change(ell, carry):
    """ell = 1 is MDLM's sampler: a position is revealed once, to its final token, and never
    changes; for ell > 1 the same holds per sub-token (without carry-over too, where the draws
    disagree with visible digits)."""
    V, L = 6, 8
    b = base_for(V, ell)
    for seed in range(4):  # one sequence at a time: each call then sees that sequence's whole history
        model = Counting(adversarial(V, ell))
        out = ancestral_sample(model, 1, L, V, ell, 50, carry_over=carry,
                               generator=torch.Generator().manual_seed(seed))
        states = model.inputs + [out.subtokens]
        for before, after in zip(states, states[1:]):
            revealed = before != b
            assert torch.equal(after[revealed], before[revealed])
            assert bool((after != b).sum() > revealed.sum()) or after is out.subtokens
        assert bool((model.inputs[0] == b).all())  # every position starts masked
        if ell == 1:
            assert torch.equal(out.tokens, out.subtokens)


def test_bad_arguments_are_user_errors():
    fn = fixed_logits(torch.zeros(4, 5))
    for kwargs in ({"steps": 0}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": 0.0},
                   {"prefix": torch.tensor([1, 2, 3, 4, 0])}, {"prefix": torch.tensor([5])},
                   {"prefix": torch.tensor([[1]])}):
        args = {"steps": 4, **kwargs}
        with pytest.raises(UserError):
            ancestral_sample(fn, 2, 4, 5, 2, **args)
    with pytest.raises(ValueError, match="shape"):
        ancestral_sample(fixed_logits(torch.zeros(3, 5)), 2, 4, 5, 2, 4)


def test_a_loaded_models_cpu_generator_is_the_plain_seeded_one():
    """inference draws on the model's device; on the CPU that is exactly the generator it used before."""
    from prime_scale.inference import LoadedModel

    loaded = LoadedModel(None, None, 10, 2, None, None, "raw")
    assert loaded.device == torch.device("cpu")
    V, ell, L = 10, 2, 6
    table = torch.randn(L, V, generator=torch.Generator().manual_seed(0))
    a = ancestral_sample(fixed_logits(table), 4, L, V, ell, 10, generator=loaded.generator(7))
    b = ancestral_sample(fixed_logits(table), 4, L, V, ell, 10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe
