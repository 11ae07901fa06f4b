"""What each rank holds: the model's layers cut into pipeline stages and sliced over TP, as numbers.

Mirrors prime_scale/model/transformer.py exactly (the planner's --verify builds the real layers on
the meta device and requires equal counts): the embedding is megatron's VocabParallelEmbedding of
the padded (b + 1)-row table for ℓ = 1 and a replicated (b + 1) × D/ℓ table for ℓ > 1; a Block has
two replicated LayerNorms and TP-sliced qkv, proj, fc1, fc2 (no biases); the head is a replicated
LayerNorm and a TP-sliced projection to the vocabulary padded to a multiple of TP. Stages are cut
as DeepSpeed's PipelineModule cuts them (partition_method "type:Block": its own balanced
partition of the Block layers; the embedding goes with the first stage, the head with the last).
"""

from __future__ import annotations

from dataclasses import dataclass

from prime_scale import prime
from prime_scale.model.transformer import padded


@dataclass(frozen=True)
class Dims:
    """The numbers every estimate is made of."""

    vocab: int
    ell: int
    hidden: int
    heads: int
    layers: int
    mlp_ratio: int
    seq_len: int
    tp: int
    pp: int

    @classmethod
    def of(cls, cfg, vocab: int) -> "Dims":
        m, p = cfg.model, cfg.parallel
        return cls(vocab=vocab, ell=m.ell, hidden=m.hidden, heads=m.heads, layers=m.layers, mlp_ratio=m.mlp_ratio,
                   seq_len=m.seq_len, tp=p.tp, pp=p.pp)

    @property
    def table_rows(self) -> int:  # b digits + the mask symbol
        return prime.base_for(self.vocab, self.ell) + 1

    @property
    def padded_vocab(self) -> int:
        return padded(self.vocab, self.tp)


def layer_kinds(d: Dims) -> list[str]:
    return ["embedding"] + ["block"] * d.layers + ["head"]


def stage_bounds(d: Dims) -> list[tuple[int, int]]:
    """[start, stop) layer indices of each pipeline stage, by DeepSpeed's own partitioner."""
    if d.pp == 1:
        return [(0, d.layers + 2)]
    from prime_scale.parallel.state import import_deepspeed

    import_deepspeed()  # with this machine's accelerator chosen, as every run imports it
    from deepspeed.runtime.utils import partition_balanced

    weights = [1 if kind == "block" else 0 for kind in layer_kinds(d)]
    parts = partition_balanced(weights=weights, num_parts=d.pp)
    return [(parts[s], parts[s + 1]) for s in range(d.pp)]


def layer_parameters(d: Dims, kind: str) -> dict:
    """One TP rank's parameters of a layer: {"sharded": n, "replicated": n} (replicated ones are the
    same on every TP rank: LayerNorms, and the ℓ > 1 input table)."""
    D, t = d.hidden, d.tp
    if kind == "embedding":
        if d.ell == 1:
            return {"sharded": padded(d.table_rows, t) // t * D, "replicated": 0}
        return {"sharded": 0, "replicated": d.table_rows * (D // d.ell)}
    if kind == "block":
        matrices = 3 * D * D + D * D + 2 * d.mlp_ratio * D * D  # qkv, proj, fc1, fc2: all split over TP
        return {"sharded": matrices // t, "replicated": 4 * D}
    if kind == "head":
        return {"sharded": d.padded_vocab // t * D, "replicated": 2 * D}
    raise ValueError(kind)


def full_layer_parameters(d: Dims, kind: str) -> int:
    """A layer's parameters before TP slicing (padding included): what megatron's CPU
    initialisation draws in full on every rank's host."""
    one = layer_parameters(Dims(**{**d.__dict__, "tp": 1}), kind)
    if kind == "head":
        return d.padded_vocab * d.hidden + 2 * d.hidden
    if kind == "embedding" and d.ell == 1:
        return padded(d.table_rows, d.tp) * d.hidden
    return one["sharded"] + one["replicated"]


def stage_parameters(d: Dims) -> list[dict]:
    """Per pipeline stage, one TP rank's parameters: its layers, sharded/replicated counts, total."""
    kinds = layer_kinds(d)
    out = []
    for s, (start, stop) in enumerate(stage_bounds(d)):
        sharded = replicated = 0
        for kind in kinds[start:stop]:
            n = layer_parameters(d, kind)
            sharded, replicated = sharded + n["sharded"], replicated + n["replicated"]
        blocks = sum(1 for k in kinds[start:stop] if k == "block")
        out.append({"stage": s, "layers": [start, stop], "blocks": blocks,
                    "embedding": kinds[start] == "embedding", "head": kinds[stop - 1] == "head",
                    "sharded": sharded, "replicated": replicated, "total": sharded + replicated,
                    "largest_full_layer": max(full_layer_parameters(d, k) for k in kinds[start:stop])})
    return out


def model_parameters(d: Dims) -> dict:
    """The whole model: unsharded and unpadded (the count a README quotes), and as trained (the
    vocabulary and ℓ = 1 table padded to a multiple of TP; replicated parameters counted once)."""
    unpadded = Dims(**{**d.__dict__, "tp": 1})
    total = sum(sum(layer_parameters(unpadded, k).values()) for k in layer_kinds(d))
    trained = sum(s["sharded"] * d.tp + s["replicated"] for s in stage_parameters(d))
    return {"total": total, "as_trained": trained}
