"""A trained model in one process, for evaluation and sampling: loading, and generating text.

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
    weights: str  # "ema" or "raw": which weights of the run these are
    device: torch.device = torch.device("cpu")  # where the model lives: this rank's GPU when there is one

    @torch.no_grad()
    def logits(self, yt: torch.Tensor) -> torch.Tensor:
        """yt [B, L*ell] -> logits [B, L, V] on the model's device (the padded vocabulary rows, if
        any, dropped)."""
        return self.model(yt.to(self.device))[..., : self.vocab_size].float()

    @torch.no_grad()
    def states(self, yt: torch.Tensor) -> torch.Tensor:
        """yt [B, L*ell] -> the backbone's hidden states [B, L, D]: with `logits`, the model as the
        sampler's Predictor, so the output head runs only at the positions that draw."""
        return self.model.hidden(yt.to(self.device))

    @torch.no_grad()
    def logits_at(self, states: torch.Tensor) -> torch.Tensor:
        """Hidden states [n, D] -> logits [n, V] (the head at n chosen positions)."""
        return self.model.head(states.unsqueeze(0))[0, :, : self.vocab_size].float()

    def generator(self, seed: int) -> torch.Generator:
        """A generator on the model's device, seeded with `seed`: the sampler draws where the logits
        are (the same seed gives the same samples on the same kind of device; CUDA's stream is not
        the CPU's)."""
        return torch.Generator(device=self.device).manual_seed(seed)


def is_consolidated(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


@contextlib.contextmanager
def consolidated_view(ref: str | Path, weights: str = "auto") -> Iterator[Path]:
    """A consolidated directory for ref: ref itself, or a temporary conversion of a sharded checkpoint."""
    from prime_scale.checkpoint.catalog import resolve_checkpoint
    from prime_scale.export.consolidate import consolidate

    from prime_scale.export.reshard import read_config

    path = Path(ref)
    if is_consolidated(path):
        exported = read_config(path).get("weights", "raw")
        if weights not in ("auto", exported):
            raise UserError(f"{path}: this export holds the {exported} weights only (prime-scale convert "
                            f"--weights {weights} makes one with the {weights} weights); use --weights auto")
        yield path
        return
    folder = resolve_checkpoint(path)
    with tempfile.TemporaryDirectory(prefix="prime-scale-eval-") as tmp:
        out = Path(tmp) / "consolidated"
        consolidate(folder, out, weights=weights)
        yield out


@contextlib.contextmanager
def load_model(ref: str | Path, weights: str = "auto") -> Iterator[LoadedModel]:
    """The model of a checkpoint in this process (parallel state of one rank, torn down on exit)."""
    from prime_scale.export.reshard import load_consolidated_into, read_config
    from prime_scale.model import ModelArgs, PrimeTransformer, name_map
    from prime_scale.parallel import state

    with consolidated_view(ref, weights) as folder:
        meta = read_config(folder)  # checked: a JSON object with the keys and types used below
        overrides = {"parallel": {"tp": 1, "pp": 1, "dp": 0, "zero_stage": 0}}
        tree = {**meta["recipe"], **overrides}
        tree["model"] = {**tree.get("model", {}), "vocab_size": int(meta["vocab_size"]), "dropout": 0.0}
        tree["train"] = {**tree.get("train", {}), "micro_batch": 1, "global_batch": 1}
        cfg = config_from_dict(tree, where=f"{folder}/config.json")
        par = state.init(cfg)
        try:
            model = PrimeTransformer(ModelArgs.from_config(cfg, cfg.model.vocab_size))
            # a sharded checkpoint's temporary conversion is named by the checkpoint it came from
            where = None if folder == Path(ref) else f"{ref} (converted for loading)"
            load_consolidated_into(model, folder, name_map=name_map(model), where=where)
            # loaded on the host, run on this rank's GPU where there is one (fp32, the exported weights)
            model.to(par.device).eval()
            tok = folder / "tokenizer"
            yield LoadedModel(model, cfg, cfg.model.vocab_size, cfg.model.ell,
                              tok if tok.is_dir() else None, Path(ref), meta.get("weights", "raw"), par.device)
        finally:
            state.destroy()


def generate(loaded: LoadedModel, *, steps: int, num: int, length: Optional[int] = None, top_p: float = 1.0,
             temperature: float = 1.0, prompt: Optional[str] = None, carry_over: bool = True,
             seed: int = 0) -> tuple[list[str], "SampleResult"]:
    """Decoded texts and the SampleResult of the ancestral sub-token sampler (prime_scale.sampling)."""
    from prime_scale.data import load_tokenizer
    from prime_scale.sampling import ancestral_sample

    if loaded.tokenizer_dir is None:
        raise UserError(f"{loaded.source}: the checkpoint carries no tokenizer, so samples cannot be decoded")
    tok = load_tokenizer(loaded.tokenizer_dir)
    length = length or loaded.cfg.model.seq_len
    if not 1 <= length <= loaded.cfg.model.seq_len:
        raise UserError(f"--length must be between 1 and model.seq_len={loaded.cfg.model.seq_len}, got {length}")
    prefix = None
    if prompt:
        prefix = torch.tensor([tok.bos_id, *tok.encode(prompt)], dtype=torch.long)
    result = ancestral_sample(loaded, num, length, loaded.vocab_size, loaded.ell, steps,
                              top_p=top_p, temperature=temperature, prefix=prefix, carry_over=carry_over,
                              generator=loaded.generator(seed))
    result = _on_host(result)
    return [decode_sample(tok, row) for row in result.tokens.tolist()], result


def decode_sample(tok, ids: list[int]) -> str:
    """Text of sampled token ids: up to the first EOS (a document ends there), without BOS,
    padding or invalid codes."""
    from prime_scale.sampling import INVALID_TOKEN

    skip = {tok.bos_id, tok.pad_id, INVALID_TOKEN}
    body = [i for i in ids if i not in skip and i >= 0]
    return tok.decode(body[: body.index(tok.eos_id)] if tok.eos_id in body else body)


def _on_host(result):
    """The SampleResult with its tensors on the CPU (decoding and the callers' statistics read them)."""
    import dataclasses

    return dataclasses.replace(result, tokens=result.tokens.cpu(), subtokens=result.subtokens.cpu(),
                               seq_idle_steps=result.seq_idle_steps.cpu(), seq_nfe=result.seq_nfe.cpu())


def recipe_of(ref: str | Path) -> Config:
    """The resolved recipe a checkpoint was trained with (consolidated or sharded), without its weights."""
    from prime_scale.checkpoint.catalog import read_manifest, resolve_checkpoint
    from prime_scale.export.reshard import read_config

    path = Path(ref)
    if is_consolidated(path):
        tree, where = read_config(path)["recipe"], f"{path}/config.json"
    else:
        folder = resolve_checkpoint(path, verify=False)  # the recipe only: loading the weights verifies them
        tree, where = read_manifest(folder)["recipe"], f"{folder}/manifest.json"
    return config_from_dict(tree, where=where)


def remote_data(cfg: Config) -> list[tuple[str, str]]:
    """(recipe key, location) of every remote dataset the recipe names."""
    from prime_scale.data.remote import is_remote

    named = [("data.path", cfg.data.path)] + [(f"data.mixture[{i}].path", e.path)
                                              for i, e in enumerate(cfg.data.mixture)]
    return [(key, location) for key, location in named if location is not None and is_remote(str(location))]


def refuse_remote_data(cfg: Config, where: str) -> None:
    """Evaluation reads the data a checkpoint's recipe names only when it is local: a checkpoint from
    elsewhere could name any host, and fetching from it would leak where and when it is evaluated
    (and read whatever that host serves). A remote dataset must come from the user (--data)."""
    for key, location in remote_data(cfg):
        raise UserError(f"{where}: recipe key '{key}' is the remote location {location!r}; data a checkpoint "
                        "names is never fetched, so nothing was downloaded. Pass --data DATASET (a local "
                        "prepared dataset, or a URI you trust) to choose what to evaluate on")


def evaluate_checkpoint(ref: str | Path, *, weights: str = "auto", data: Optional[str] = None,
                        split: str = "val", batch_size: int = 8, max_batches: Optional[int] = None,
                        seed: Optional[int] = None, mc_samples: Optional[int] = None):
    """The bound (prime_scale.evaluation) of a checkpoint on a split of its data (or of `data`).
    The noise seed defaults to the run's (cfg.seed), as training validation uses it: the same
    split and draws then give the run's val_nll_bound."""
    import dataclasses
    import itertools

    from prime_scale.data import build_loader
    from prime_scale.data.stats import SplitStats
    from prime_scale.evaluation import EvalResult, estimate, objective_sums

    with load_model(ref, weights) as loaded:
        cfg = loaded.cfg
        if data is None:  # the recipe's data: checked before the loader opens (and maybe fetches) it
            refuse_remote_data(cfg, f"{ref}/config.json" if is_consolidated(Path(ref))
                               else f"{ref} (the recipe in its manifest.json)")
        source = dataclasses.replace(cfg.data, num_workers=0, shuffle=False)
        if data is not None:
            source = dataclasses.replace(source, path=data, mixture=[])
        cfg = dataclasses.replace(cfg, data=source)
        loader = build_loader(cfg, split, 0, 1, batch_size, cfg.seed, single_pass=True)
        batches = itertools.islice(iter(loader), max_batches)
        # evaluation.evaluate_bound, with each noised batch moved to the model's device: the noise is
        # drawn on the host (layout- and device-independent), the model and both losses run there
        sums = objective_sums(loaded.logits, loaded.vocab_size, loaded.ell, cfg.model.carry_over)
        seed = cfg.seed if seed is None else seed
        mc_samples = mc_samples or cfg.eval.mc_samples
        stats = SplitStats(loader.manifests, split, loader.weights)
        totals = estimate(lambda chunk: sums([b.to(loaded.device) for b in chunk]), ([b] for b in batches),
                          vocab_size=loaded.vocab_size, ell=loaded.ell, seed=seed, mc_samples=mc_samples,
                          stats=stats)
        result = EvalResult.from_totals(totals, split_sequences=sum(stats.sequences), mc_samples=mc_samples,
                                        seed=seed, vocab_size=loaded.vocab_size, ell=loaded.ell,
                                        carry_over=cfg.model.carry_over)
        return dataclasses.replace(result, weights=loaded.weights)
