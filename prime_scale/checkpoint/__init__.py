"""Checkpoints: atomic publishing with a completeness manifest, exact resume (under the layout that
wrote them, or resharded into another), weights-only loading.

Modules: catalog (discovery, completeness, retention; no torch), layout (where a rank's pieces sit,
the parameter table, layout comparison), store (save/load of a DeepSpeed engine under its own
layout), elastic (resume under another layout: every tensor cut anew for the new ranks), hooks
(periodic saves and --resume in the trainer), rng (RNG streams), safe_load (weights-only loading).
Reading sharded checkpoints tensor by tensor and converting them lives in prime_scale.export.
"""
