"""The Prime transformer: a bidirectional pre-norm transformer over L token positions.

  yt [B, L·ℓ] sub-tokens ─ PrimeEmbedding ─> h [B, L, D] ─ Block × N ─> PrimeHead ─> logits shard
                                                                         [B, L, V_pad / TP]
- Input (docs/method.md, sub-tokens): one shared (b + 1) × (D / ℓ) table; a token's ℓ sub-token vectors are
  concatenated in digit order. For ℓ = 1 the table is (V + 1) × D and is split over the vocabulary
  (megatron's VocabParallelEmbedding), because there it is as large as the output head.
- Blocks: rotary positions, torch scaled_dot_product_attention (no mask: bidirectional, so the GPU
  gets its flash/efficient kernels), MLP × mlp_ratio, dropout; the linear layers are megatron-core's
  ColumnParallelLinear / RowParallelLinear, so attention heads and the MLP width split over TP.
  model.recompute drops the attention core's (selective) or the whole block's (full) activations
  after the forward and recomputes them in the backward pass, with the forward's RNG state.
- Output: V logits, split over TP ranks (vocab-parallel); losses run on the shards
  (model/vocab_parallel.py). The vocabulary is padded to a multiple of TP; padding classes are
  never allowed by the loss, start at zero and get zero gradient.

The model is a plain sequence of layers (`layer_builders`), so a pipeline engine can cut it into
stages; `PrimeTransformer` chains them in one module. Every layer draws its initial weights from a
generator seeded by (seed, layer index), and megatron initialises each full matrix before taking its
TP slice: the initial weights are identical under every (TP, PP, DP) layout.
It knows nothing about launchers or engines; its TP degree and rank come in ModelArgs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from prime_scale import prime
from prime_scale.config import ModelConfig


@dataclass(frozen=True)
class ModelArgs:
    """What the model is built from: the recipe's model section (its fields read through, e.g.
    `args.hidden`), plus what the run decides: the vocabulary (from the data), the seed of the
    initial weights and this rank's place in the tensor-parallel group."""

    config: ModelConfig
    vocab_size: int
    seed: int = 0
    tp: int = 1  # tensor-parallel degree
    tp_rank: int = 0

    @classmethod
    def from_config(cls, cfg, vocab_size: int, tp: int = 1, tp_rank: int = 0) -> "ModelArgs":
        return cls(config=cfg.model, vocab_size=vocab_size, seed=cfg.seed, tp=tp, tp_rank=tp_rank)

    def __getattr__(self, name: str):
        config = self.__dict__.get("config")  # absent while unpickling
        if config is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(config, name)

    @property
    def base(self) -> int:
        return prime.base_for(self.vocab_size, self.ell)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def padded(size: int, tp: int) -> int:
    return -(-size // tp) * tp


def _megatron_config(args: ModelArgs):
    from megatron.core import ModelParallelConfig

    # CPU initialisation: each full matrix is drawn on the host, then sliced for this TP rank
    # (layout-independent weights; also megatron's only initialisation path that runs without CUDA)
    return ModelParallelConfig(tensor_model_parallel_size=args.tp, use_cpu_initialization=True,
                               perform_initialization=True, params_dtype=torch.float32,
                               sequence_parallel=False, gradient_accumulation_fusion=False)


def _normal(std: float, rows: Optional[int] = None):
    """init_method for megatron layers; with `rows`, only the first rows are drawn (padding stays 0)
    and the draw does not depend on how much padding the TP degree adds."""

    def init(weight: torch.Tensor) -> None:
        with torch.no_grad():
            if rows is None:
                weight.normal_(0.0, std)
            else:
                weight.zero_()
                weight[:rows].normal_(0.0, std)

    return init


@contextlib.contextmanager
def _layer_seed(args: ModelArgs, index: int):
    """Initial weights keyed by (seed, layer index), whichever process builds the layer.

    Every initial draw is made on the host from the global CPU generator (megatron's CPU
    initialisation hands init_method a host tensor; nn.Embedding's own reset draws there too), so
    that generator alone is seeded for the layer and restored afterwards. torch.manual_seed would
    also seed every CUDA generator, which a CPU-only fork does not restore: each rank's dropout
    stream would be left at the last layer's seed, the same on every data-parallel replica."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(args.seed * 1_000_003 + 7919 * (index + 1))
        yield


class PrimeLayer(nn.Module):
    """A layer of the sequence; `layer_index` names its parameters the same way in every layout."""

    layer_index: int


# --------------------------------------------------------------------------- input


class PrimeEmbedding(PrimeLayer):
    """yt [B, L·ℓ] -> h [B, L, D]: ℓ sub-token vectors of D/ℓ dims concatenated per token."""

    def __init__(self, args: ModelArgs, layer_index: int = 0):
        super().__init__()
        self.layer_index, self.args = layer_index, args
        table = args.base + 1  # b digits + the mask symbol b
        with _layer_seed(args, layer_index):
            if args.ell == 1:
                from megatron.core.tensor_parallel import VocabParallelEmbedding

                tp = args.tp
                self.embed = VocabParallelEmbedding(padded(table, tp), args.hidden,
                                                    init_method=_normal(args.init_std, rows=table),
                                                    config=_megatron_config(args))
            else:
                self.embed = nn.Embedding(table, args.hidden // args.ell)
                nn.init.normal_(self.embed.weight, 0.0, args.init_std)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, yt: torch.Tensor) -> torch.Tensor:
        h = self.embed(yt)  # [B, L·ℓ, D/ℓ]
        return self.drop(h.reshape(yt.shape[0], yt.shape[1] // self.args.ell, self.args.hidden))


# --------------------------------------------------------------------------- blocks


class Rotary:
    """Rotary position embedding (rotate-half form). Not a module: the tables are caches built in
    float64 per (length, device, dtype), so casting the model to bf16 never degrades their source."""

    def __init__(self, head_dim: int, base: float):
        self.inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self._cache: dict = {}

    def tables(self, length: int, device, dtype):
        key = (length, str(device), dtype)
        if key not in self._cache:
            angles = torch.outer(torch.arange(length, dtype=torch.float64), self.inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self._cache[key] = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
        return self._cache[key]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


# --------------------------------------------------------------------------- activation recompute


def _copied_rng_states(states: dict) -> dict:
    # megatron's tracker hands out its live states: a graph-safe one is a Generator, advanced in place
    return {name: s.clone_state() if isinstance(s, torch.Generator) else s.clone() for name, s in states.items()}


class _ReplayTrackerStates:
    """Recompute context: megatron's TP-rank dropout streams as they were at the forward, for the
    recompute only. torch's checkpoint replays the global CPU and CUDA generators, but not the
    tracker's named streams, which attention dropout forks; by the backward pass they have moved
    on (later micro-batches and pipeline forwards draw from them). Reusable: a retained graph may
    recompute twice."""

    def __init__(self):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        self.tracker = get_cuda_rng_tracker()
        self.at_forward = _copied_rng_states(self.tracker.get_states())

    def __enter__(self):
        self.outside = self.tracker.get_states()
        self.tracker.set_states(_copied_rng_states(self.at_forward))

    def __exit__(self, *exc):
        self.tracker.set_states(self.outside)  # the streams continue from where the training left them


def _recomputed(fn, *inputs: torch.Tensor, uses_tp_stream: bool) -> torch.Tensor:
    """fn(*inputs), keeping only the inputs for the backward pass: fn runs again there, with the RNG
    state of the forward, so dropout masks (and the values) come out bitwise the same. Non-reentrant
    checkpoint keeps autograd's graph as it is (the TP layers' backward all-reduces stay where they
    were; the forward all-reduces inside fn run again, on every TP peer alike) and works under
    DeepSpeed's pipeline engine, whose backward calls torch.autograd.backward on stage outputs."""
    from torch.utils.checkpoint import checkpoint

    def contexts():
        return contextlib.nullcontext(), (_ReplayTrackerStates() if uses_tp_stream else contextlib.nullcontext())

    return checkpoint(fn, *inputs, use_reentrant=False, preserve_rng_state=True, context_fn=contexts)


class Block(PrimeLayer):
    """Pre-norm bidirectional transformer block with TP-split attention heads and MLP.

    model.recompute (training with autograd on; evaluation never recomputes):
    - full: only the block's input is kept, the whole block runs again in the backward pass.
    - selective: the attention core (rotary, SDPA with its dropout, the merge of the heads) runs again,
      as in Megatron's selective recompute. Kept: its input, the qkv projection [B, L, 3·D/TP], and
      its output (proj's saved input; with a fused kernel the same storage as SDPA's output). Freed:
      the rotated q and k (2 × [B, L, D/TP]), SDPA's log-sum-exp, and, where SDPA takes its math path
      (on CPU whenever dropout is on), the [B, H/TP, L, L] scores, probabilities and dropout mask:
      the block's largest activations for the least work to redo (no weights, no collectives).
      With a fused kernel (GPU; CPU without dropout) the saving is the rotated q and k. The MLP
      activation is left out: GELU's output is fc2's saved input, which only a region that also
      redoes fc2's matmul and all-reduce could free.
    """

    def __init__(self, args: ModelArgs, layer_index: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        self.layer_index, self.args = layer_index, args
        tp = args.tp
        self.local_heads = args.heads // tp
        cfg = _megatron_config(args)
        init = _normal(args.init_std)
        # residual-branch outputs scaled by 1/sqrt(2·layers) (GPT-2), so depth does not inflate h
        out_init = _normal(args.init_std / math.sqrt(2.0 * args.layers))
        with _layer_seed(args, layer_index):
            self.norm1 = nn.LayerNorm(args.hidden, eps=args.norm_eps)
            # rows ordered head by head, each head's q, k, v together: a TP slice holds whole heads
            self.qkv = ColumnParallelLinear(args.hidden, 3 * args.hidden, config=cfg, init_method=init,
                                            bias=False, gather_output=False)
            self.proj = RowParallelLinear(args.hidden, args.hidden, config=cfg, init_method=out_init,
                                          bias=False, input_is_parallel=True, skip_bias_add=False)
            self.norm2 = nn.LayerNorm(args.hidden, eps=args.norm_eps)
            self.fc1 = ColumnParallelLinear(args.hidden, args.mlp_ratio * args.hidden, config=cfg,
                                            init_method=init, bias=False, gather_output=False)
            self.fc2 = RowParallelLinear(args.mlp_ratio * args.hidden, args.hidden, config=cfg,
                                         init_method=out_init, bias=False, input_is_parallel=True,
                                         skip_bias_add=False)
        self.rotary = Rotary(args.head_dim, args.rotary_base)
        self.drop = nn.Dropout(args.dropout)

    def _recomputes(self, mode: str) -> bool:
        return self.args.recompute == mode and self.training and torch.is_grad_enabled()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv(x)
        if self._recomputes("selective"):
            out = _recomputed(self.attention_core, qkv, uses_tp_stream=self.args.dropout > 0)
        else:
            out = self.attention_core(qkv)
        out, _ = self.proj(out)
        return out

    def attention_core(self, qkv: torch.Tensor) -> torch.Tensor:
        """This rank's heads: qkv [B, L, 3·D/TP] -> attention output [B, L, D/TP], before proj."""
        B, L, _ = qkv.shape
        q, k, v = qkv.view(B, L, self.local_heads, 3, self.args.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        cos, sin = self.rotary.tables(L, qkv.device, q.dtype)
        q, k = Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)
        p = self.args.dropout if self.training else 0.0
        if p > 0:
            # the heads are TP-sharded: their dropout draws from megatron's per-TP-rank stream
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, L, self.local_heads * self.args.head_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._recomputes("full"):
            return _recomputed(self.body, h, uses_tp_stream=self.args.dropout > 0)
        return self.body(h)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.drop(self.attention(self.norm1(h)))
        up, _ = self.fc1(self.norm2(h))
        down, _ = self.fc2(F.gelu(up))
        return h + self.drop(down)


# --------------------------------------------------------------------------- output


class PrimeHead(PrimeLayer):
    """Final norm and the vocab-parallel output projection: h -> this rank's logits shard."""

    def __init__(self, args: ModelArgs, layer_index: int):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        self.layer_index, self.args = layer_index, args
        tp, rank = args.tp, args.tp_rank
        self.padded_vocab = padded(args.vocab_size, tp)
        self.local_vocab = self.padded_vocab // tp
        self.vocab_start = rank * self.local_vocab
        with _layer_seed(args, layer_index):
            self.norm = nn.LayerNorm(args.hidden, eps=args.norm_eps)
            self.out = ColumnParallelLinear(args.hidden, self.padded_vocab, config=_megatron_config(args),
                                            init_method=_normal(args.init_std, rows=args.vocab_size),
                                            bias=False, gather_output=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits, _ = self.out(self.norm(h))
        return logits


# --------------------------------------------------------------------------- the sequence


def layer_builders(args: ModelArgs) -> list[tuple[type, dict]]:
    """The model as a sequence: (layer class, constructor kwargs) for embedding, blocks, head.
    A pipeline engine builds only its stage's entries; PrimeTransformer builds them all."""
    specs: list[tuple[type, dict]] = [(PrimeEmbedding, {"args": args, "layer_index": 0})]
    specs += [(Block, {"args": args, "layer_index": i + 1}) for i in range(args.layers)]
    specs.append((PrimeHead, {"args": args, "layer_index": args.layers + 1}))
    return specs


class PrimeTransformer(nn.Module):
    """All layers in one module: yt [B, L·ℓ] -> logits shard [B, L, V_pad / TP]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(cls(**kwargs) for cls, kwargs in layer_builders(args))

    @property
    def head(self) -> PrimeHead:
        return self.layers[-1]

    def hidden(self, yt: torch.Tensor) -> torch.Tensor:
        """yt [B, L·ℓ] -> the last block's output [B, L, D] (before the head's norm)."""
        h = yt
        for layer in self.layers[:-1]:
            h = layer(h)
        return h

    def forward(self, yt: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(yt))


def count_parameters(args: ModelArgs) -> dict:
    """Unpadded, unsharded parameter counts (for reports and FLOP estimates)."""
    D, r, N, V = args.hidden, args.mlp_ratio, args.layers, args.vocab_size
    embed = (args.base + 1) * (D // args.ell)
    block = 3 * D * D + D * D + 2 * r * D * D + 4 * D  # qkv, proj, mlp, two LayerNorms
    head = D * V + 2 * D
    return {"embedding": embed, "blocks": N * block, "head": head, "total": embed + N * block + head}


def train_flops_per_token(args: ModelArgs) -> float:
    """Model FLOPs per token for one training step (forward + backward = 3 × forward): the matmuls
    of the blocks and head, and attention's two L × L products. Embedding lookups and element-wise
    work are not counted (the usual MFU convention)."""
    D, r, N, L, V = args.hidden, args.mlp_ratio, args.layers, args.seq_len, args.vocab_size
    per_block = 2 * (3 * D * D + D * D + 2 * r * D * D) + 2 * 2 * L * D
    return 3.0 * (N * per_block + 2 * D * V)
