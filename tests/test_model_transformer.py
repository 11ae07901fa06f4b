"""The Prime transformer in one process (TP = 1): input embedding, bidirectionality, output head,
layer-keyed initialisation, parameter and FLOP counts."""

from __future__ import annotations


import pytest
import torch

from prime_scale import noise, prime


def _args(**kw):
    from prime_scale.config import ModelConfig
    from prime_scale.model import ModelArgs

    base = dict(vocab_size=100, ell=2, layers=2, hidden=32, heads=4, seq_len=8, seed=3)
    base.update(kw)
    vocab, seed = base.pop("vocab_size"), base.pop("seed")
    return ModelArgs(ModelConfig(**base), vocab_size=vocab, seed=seed)


def _noisy(args, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, args.vocab_size, (B, args.seq_len), generator=g)
    t, mask = noise.prime_noise(seed, 0, torch.arange(B), torch.arange(B), B, args.seq_len, args.ell)
    return x0, prime.apply_mask(x0, mask, args.vocab_size, args.ell)


@pytest.mark.parametrize("ell", [2, 4])
def test_prime_embedding_concatenates_subtoken_vectors(single_process, ell):
    from prime_scale.model import PrimeEmbedding

    args = _args(ell=ell)
    emb = PrimeEmbedding(args)
    table = emb.embed.weight.detach()
    assert table.shape == (args.base + 1, args.hidden // ell)  # b digits + the mask symbol
    _, yt = _noisy(args)
    h = emb(yt)
    assert h.shape == (2, args.seq_len, args.hidden)
    for i in range(args.seq_len):
        expected = torch.cat([table[yt[0, i * ell + j]] for j in range(ell)])
        torch.testing.assert_close(h[0, i], expected)


def test_ell_one_uses_a_vocab_parallel_table_with_the_mask_symbol(single_process):
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    from prime_scale.model import PrimeEmbedding

    args = _args(ell=1)
    emb = PrimeEmbedding(args)
    assert isinstance(emb.embed, VocabParallelEmbedding)
    assert emb.embed.weight.shape == (args.vocab_size + 1, args.hidden)
    _, yt = _noisy(args)
    torch.testing.assert_close(emb(yt), emb.embed.weight[yt].detach())


def test_attention_is_bidirectional_and_the_head_gives_v_logits(single_process):
    from prime_scale.model import PrimeTransformer

    args = _args()
    model = PrimeTransformer(args).eval()
    _, yt = _noisy(args, B=1)
    with torch.no_grad():
        logits = model(yt)
        changed = yt.clone()
        last = yt[0, -args.ell:]
        # mask the last token, or reveal it if it was fully masked
        changed[0, -args.ell:] = prime.subtokenize(torch.tensor([7]), args.vocab_size, args.ell) \
            if bool((last == args.base).all()) else args.base
        logits2 = model(changed)
    assert logits.shape == (1, args.seq_len, args.vocab_size)
    # the first position sees the last one: no causal mask
    assert (logits[0, 0] - logits2[0, 0]).abs().max() > 1e-6


def test_layer_weights_are_keyed_by_seed_and_layer_index(single_process):
    from prime_scale.model import Block, PrimeTransformer, canonical_named_parameters

    args = _args()
    a = dict(canonical_named_parameters(PrimeTransformer(args)))
    torch.manual_seed(12345)  # the global generator's state must not matter
    b = dict(canonical_named_parameters(PrimeTransformer(args)))
    assert a.keys() == b.keys() and "1.qkv.weight" in a and "3.out.weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # a block built on its own (as one pipeline stage does) equals the same block inside the model
    alone = dict(canonical_named_parameters(Block(args, layer_index=2)))
    for name, p in alone.items():
        assert torch.equal(p, a[name]), name
    other = dict(canonical_named_parameters(PrimeTransformer(_args(seed=4))))
    assert not torch.equal(other["1.qkv.weight"], a["1.qkv.weight"])


def test_building_the_model_leaves_every_global_rng_as_it_was(single_process, monkeypatch):
    """The layer seeds are forked off: dropout streams (and DP replicas' differences, seeded by the
    parallel state before the model is built) continue as if no model had been built. On a GPU
    machine the CUDA generators are compared too; on any machine, no CUDA generator may be seeded
    (torch.manual_seed would seed them all, and a CPU-only fork would not restore them)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from prime_scale.model import PrimeTransformer

    torch.manual_seed(2024)  # a state no layer seed gives
    cuda_seeded = []
    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda seed, name=name: cuda_seeded.append((name, seed)))
    tracker = get_cuda_rng_tracker()
    cpu, streams = torch.get_rng_state(), tracker.get_states()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    for ell in (1, 2):  # the vocab-parallel table and the plain nn.Embedding
        PrimeTransformer(_args(ell=ell))
    assert cuda_seeded == []
    assert torch.equal(torch.get_rng_state(), cpu)
    after = tracker.get_states()
    assert after.keys() == streams.keys() and all(torch.equal(after[k], streams[k]) for k in streams)
    if torch.cuda.is_available():
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))


def test_initial_weights_are_the_layer_seeds_normal_draws(single_process):
    """The keying itself: block i's qkv matrix is the first N(0, init_std) draw of the CPU stream
    seeded seed · 1000003 + 7919 · (i + 1), whatever the global generators' states."""
    from prime_scale.model import Block

    args = _args()
    torch.manual_seed(99)
    block = Block(args, layer_index=1)
    expected = torch.empty(3 * args.hidden, args.hidden)
    expected.normal_(0.0, args.init_std, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + 7919 * 2))
    assert torch.equal(block.qkv.weight.detach(), expected)


def test_parameter_and_flop_counts_match_the_built_model(single_process):
    from prime_scale.model import PrimeTransformer, count_parameters, train_flops_per_token

    args = _args(ell=2, layers=3, hidden=48, heads=6, mlp_ratio=4)
    model = PrimeTransformer(args)
    assert count_parameters(args)["total"] == sum(p.numel() for p in model.parameters())
    # 6 × (matmul parameters) per token, plus attention's two L×L products (3 × 4·L·D per layer)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    expected = 6 * matmul_params + 3 * args.layers * 4 * args.seq_len * args.hidden
    assert train_flops_per_token(args) == pytest.approx(expected)
