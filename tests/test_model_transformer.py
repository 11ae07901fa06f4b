"""The Prime transformer in one process (TP = 1): input embedding, bidirectionality, output head,
layer-keyed initialisation, parameter and FLOP counts."""

from __future__ import annotations

import os

import pytest
import torch

from prime_scale import noise, prime
from prime_scale.config import load_recipe


@pytest.fixture(scope="module")
def single_process():
    """One-process parallel state (world 1, gloo), torn down and the environment restored after."""
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    from prime_scale.parallel import state

    state.init(load_recipe("tiny-cpu", ["model.vocab_size=100"]))
    yield
    state.destroy()
    os.environ.clear()
    os.environ.update(saved)


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


def test_parameter_and_flop_counts_match_the_built_model(single_process):
    from prime_scale.model import PrimeTransformer, count_parameters, train_flops_per_token

    args = _args(ell=2, layers=3, hidden=48, heads=6, mlp_ratio=4)
    model = PrimeTransformer(args)
    assert count_parameters(args)["total"] == sum(p.numel() for p in model.parameters())
    # 6 × (matmul parameters) per token, plus attention's two L×L products (3 × 4·L·D per layer)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    expected = 6 * matmul_params + 3 * args.layers * 4 * args.seq_len * args.hidden
    assert train_flops_per_token(args) == pytest.approx(expected)
