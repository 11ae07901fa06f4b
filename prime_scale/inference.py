"""A trained model in one process, for evaluation and sampling.

Takes a consolidated checkpoint (a directory written by `prime-scale convert`) or a sharded one
(a step_<N> folder, a checkpoint directory or a run directory: it is consolidated into a temporary
directory first, streamed tensor by tensor). Weights are loaded with safetensors: nothing in the
file is executed.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from prime_scale.config import Config, config_from_dict
from prime_scale.errors import UserError


@dataclass
class LoadedModel:
    model: torch.nn.Module
    cfg: Config
    vocab_size: int
    ell: int
    tokenizer_dir: Optional[Path]
    source: Path

    @torch.no_grad()
    def logits(self, yt: torch.Tensor) -> torch.Tensor:
        """yt [B, L*ell] -> logits [B, L, V] (the padded vocabulary rows, if any, dropped)."""
        return self.model(yt)[..., : self.vocab_size].float()


def is_consolidated(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@contextlib.contextmanager
def consolidated_view(ref: str | Path, weights: str) -> Iterator[Path]:
    """A consolidated directory for ref: ref itself, or a temporary conversion of a sharded checkpoint."""
    from prime_scale.checkpoint.consolidate import consolidate
    from prime_scale.checkpoint.manifest import resolve_checkpoint

    path = Path(ref)
    if is_consolidated(path):
        yield path
        return
    folder = resolve_checkpoint(path)
    with tempfile.TemporaryDirectory(prefix="prime-scale-eval-") as tmp:
        out = Path(tmp) / "consolidated"
        consolidate(folder, out, weights=weights)
        yield out


@contextlib.contextmanager
def load_model(ref: str | Path, weights: str = "ema") -> Iterator[LoadedModel]:
    """The model of a checkpoint in this process (parallel state of one rank, torn down on exit)."""
    from prime_scale.checkpoint.reshard import load_consolidated_into, read_config
    from prime_scale.checkpoint.training import name_map
    from prime_scale.model.transformer import ModelArgs, PrimeTransformer
    from prime_scale.parallel import state

    with consolidated_view(ref, weights) as folder:
        meta = read_config(folder)
        if meta.get("format") != "prime-scale-consolidated":
            raise UserError(f"{folder}/config.json: not a prime-scale checkpoint")
        overrides = {"parallel": {"tp": 1, "pp": 1, "dp": 0, "zero_stage": 0}}
        tree = {**meta["recipe"], **overrides}
        tree["model"] = {**tree.get("model", {}), "vocab_size": int(meta["vocab_size"]), "dropout": 0.0}
        tree["train"] = {**tree.get("train", {}), "micro_batch": 1, "global_batch": 1}
        cfg = config_from_dict(tree, where=f"{folder}/config.json")
        state.init(cfg)
        try:
            model = PrimeTransformer(ModelArgs.from_config(cfg, cfg.model.vocab_size))
            load_consolidated_into(model, folder, name_map=name_map(model))
            model.eval()
            tok = folder / "tokenizer"
            yield LoadedModel(model, cfg, cfg.model.vocab_size, cfg.model.ell,
                              tok if tok.is_dir() else None, Path(ref))
        finally:
            state.destroy()
