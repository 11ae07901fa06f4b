"""The Prime transformer (megatron-core tensor-parallel layers), its tensor names, and its
vocab-parallel losses."""

from prime_scale.model.naming import canonical_named_parameters, name_map, unpadded_sizes
from prime_scale.model.objective import PrimeObjective
from prime_scale.model.transformer import (Block, ModelArgs, PrimeEmbedding, PrimeHead, PrimeLayer,
                                           PrimeTransformer, count_parameters, layer_builders,
                                           train_flops_per_token)

__all__ = ["Block", "ModelArgs", "PrimeEmbedding", "PrimeHead", "PrimeLayer", "PrimeObjective",
           "PrimeTransformer", "canonical_named_parameters", "count_parameters", "layer_builders",
           "name_map", "train_flops_per_token", "unpadded_sizes"]
