"""Checkpoints: atomic publishing with a completeness manifest, exact resume, weights-only loading,
streaming consolidation of any layout into safetensors, and resharding into any layout.

Modules: manifest (discovery, retention; no torch), store (save/load of a DeepSpeed engine),
safe_load (weights-only loading), rng (RNG streams), shards (megatron TP partitioning),
consolidate (sharded -> full tensors), safetensors_stream (streaming writer), reshard
(consolidated -> any layout), training (periodic saves and --resume in the trainer),
convert (the CLI subcommand).
"""
