"""Checkpoints: atomic publishing with a completeness manifest, exact resume under the layout that
wrote them, weights-only loading.

Modules: catalog (discovery, completeness, retention; no torch), layout (where a rank's pieces sit,
the parameter table, layout comparison), store (save/load of a DeepSpeed engine under its own
layout), rng (RNG streams), safe_load (weights-only loading). Reading sharded checkpoints tensor by
tensor, converting them and resharding them into another layout (export/elastic.py) live in
prime_scale.export; the trainer's periodic saves and --resume in prime_scale.checkpointing.
"""
