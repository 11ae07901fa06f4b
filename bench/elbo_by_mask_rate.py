"""Where a checkpoint's bound comes from: the sub-token ELBO's integrand at each mask rate.

    python bench/elbo_by_mask_rate.py runs/tiny-cpu               # the default run's checkpoint
    python bench/elbo_by_mask_rate.py RUN --sequences 128 --rates 0.05 0.25 0.5 0.75 1.0

With the linear schedule the bound is the average over t ∈ (0, 1] of
    f(t) = E[ (1/t) Σ_{masked digits j} −log p(y0_j | y_t) ] / L   (nats per token),
every digit masked with probability t. Printed per t (the same validation sequences and one noise
draw each), beside two context-free references: the tokenizer's unigram cross-entropy H (what a
model that learned only token frequencies scores at every t when ℓ = 1) and Σ_j H(d_j), the sum of
the digits' cross-entropies under their unigram marginals, which is what such a model scores at
t = 1 when ℓ > 1 (every digit of a token masked: each is charged by its marginal). A model that uses its context is below H at small
t; f(1) can never go below the context-free figure. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    import numpy as np
    import torch

    from prime_scale import prime
    from prime_scale.data import build_loader
    from prime_scale.data.loader import load_manifests
    from prime_scale.data.stats import SplitStats
    from prime_scale.inference import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--rates", type=float, nargs="*", default=[0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with load_model(args.checkpoint) as m:
        cfg = m.cfg
        loader = build_loader(cfg, "val", 0, 1, 16, cfg.seed, single_pass=True)
        rows = []
        for batch in loader:
            rows.append(batch["input_ids"][batch["valid"]])
            if sum(len(r) for r in rows) >= args.sequences:
                break
        x0 = torch.cat(rows)[: args.sequences]
        V, ell = m.vocab_size, m.ell
        g = torch.Generator().manual_seed(args.seed)
        integrand = {}
        for t in args.rates:
            mask = torch.rand(x0.shape[0], x0.shape[1] * ell, generator=g) < t
            yt = prime.apply_mask(x0, mask, V, ell)
            total = 0.0
            for i in range(0, len(x0), 16):
                logits = m.logits(yt[i:i + 16])
                nll, _ = prime.prime_loss(logits, x0[i:i + 16].to(logits.device), yt[i:i + 16].to(logits.device),
                                          torch.full((len(logits),), t, device=logits.device), None, V, ell,
                                          "prime_elbo", cfg.model.carry_over)
                total += float(nll.sum())
            integrand[str(t)] = total / x0.numel()
        log_q = SplitStats(load_manifests(cfg, "val"), "val", [1.0]).unigram_log_probs()
        q = log_q.exp().numpy()
        ids, b = np.arange(V), prime.base_for(V, ell)
        targets = prime.subtokenize(x0, V, ell).view(*x0.shape, ell).numpy()
        digit_ce = 0.0  # Σ_j of each digit's cross-entropy under its unigram marginal
        for j in range(ell):
            mass = np.bincount((ids // b ** (ell - 1 - j)) % b, weights=q, minlength=b)
            digit_ce += float(-np.log(mass[targets[..., j]]).mean())
        unigram = float(-log_q[x0].mean())
    print(json.dumps({"checkpoint": args.checkpoint, "vocab_size": V, "ell": ell, "sequences": len(x0),
                      "integrand_nats_per_token": integrand, "unigram_cross_entropy": unigram,
                      "sum_of_digit_cross_entropies": digit_ce}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
