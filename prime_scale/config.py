"""Recipes: the one configuration mechanism of prime-scale.

A recipe is a YAML file. It may name a `base:` recipe (a path relative to itself, or a name in
recipes/) and override any subset of it; bases chain, cycles are an error. Command-line overrides
use dotted keys (`model.layers=4 parallel.tp=2`). Everything is checked against the typed schema
below before any work starts, and every error names the file (or "command line") and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from prime_scale.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "tiny-cpu"
COMMAND_LINE = "command line"


class RecipeError(UserError):
    """A recipe or override is wrong. The message names the file and the key."""


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    vocab_size: Optional[int] = None  # None: taken from the data manifest
    seq_len: int = 128
    ell: int = 1  # token granularity: sub-tokens per token
    carry_over: bool = True
    objective: Literal["prime_joint", "prime_elbo"] = "prime_elbo"
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.1  # floor of cosine/linear decay, as a fraction of lr
    clip: float = 1.0  # 0 disables clipping
    ema: float = 0.0  # EMA decay of the weights; 0 disables EMA


@dataclass
class MixtureEntry:
    path: str
    weight: float = 1.0


@dataclass
class DataConfig:
    path: Optional[str] = None  # a prepared dataset (prime-scale prep shard); None: the demo corpus
    mixture: list[MixtureEntry] = field(default_factory=list)  # several datasets with weights
    format: Literal["auto", "mds", "wds"] = "auto"
    num_workers: int = 1
    shuffle: bool = True
    shuffle_block: int = 262144  # samples shuffled together (the loader's locality/randomness trade-off)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 0  # 0: world size / (tp * pp)
    zero_stage: int = 1


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 8
    micro_batch: int = 8
    log_every: int = 10


@dataclass
class EvalConfig:
    every: int = 100  # validation every N steps (and at the end); 0: only at the end
    batches: int = 4
    mc_samples: int = 1  # Monte Carlo noise draws per sequence


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep_last: int = 2
    dir: Optional[str] = None  # None: <run.dir>/checkpoints


@dataclass
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "prime-scale"


@dataclass
class RunConfig:
    dir: str = "runs/tiny-cpu"
    name: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def resolve_recipe_path(ref: str, relative_to: Optional[Path] = None) -> Path:
    """A recipe reference is a path (absolute, or relative to the referring file or the cwd)
    or a bare name in recipes/ (with or without .yaml)."""
    candidates = []
    p = Path(ref)
    if relative_to is not None and not p.is_absolute():
        candidates.append(relative_to.parent / p)
    candidates.append(p)
    for name in (ref, ref + ".yaml"):
        candidates.append(RECIPES_DIR / name)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    where = f"{relative_to}: base" if relative_to else "recipe"
    names = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(f"{where} '{ref}' not found (looked for a file, and for a name in {RECIPES_DIR}: {names})")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origin: str, provenance: dict, prefix: str = "") -> None:
    """Deep-merge src into dst, recording which file set each key."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, provenance, dotted + ".")
        else:
            dst[key] = value
            provenance[dotted] = origin
            if isinstance(value, dict):
                for sub in _leaf_keys(value, dotted + "."):
                    provenance[sub] = origin


def _leaf_keys(d: dict, prefix: str):
    for k, v in d.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaf_keys(v, f"{prefix}{k}.")


def _load_chain(path: Path, seen: tuple[Path, ...], provenance: dict) -> dict:
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"{path}: base cycle: {chain}")
    data = _read_yaml(path)
    base_ref = data.pop("base", None)
    merged: dict = {}
    if base_ref is not None:
        if not isinstance(base_ref, str):
            raise RecipeError(f"{path}: key 'base' must be a recipe name or path, got {base_ref!r}")
        merged = _load_chain(resolve_recipe_path(base_ref, relative_to=path), (*seen, path), provenance)
    _merge(merged, data, str(path), provenance)
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RecipeError(f"{COMMAND_LINE}: override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"{COMMAND_LINE}: override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply_override(tree: dict, key: str, value: Any, provenance: dict) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
    provenance[key] = COMMAND_LINE


def load_recipe(ref: Optional[str] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a recipe (path or name; None: the embedded default), apply overrides, validate."""
    provenance: dict[str, str] = {}
    if ref is None:
        ref = DEFAULT_RECIPE
    tree = _load_chain(resolve_recipe_path(ref), (), provenance)
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(tree, key, value, provenance)
    cfg = _build(Config, tree, "", provenance)
    validate(cfg, provenance)
    return cfg


# --------------------------------------------------------------------------- typing


def _where(key: str, provenance: dict) -> str:
    # the nearest recorded ancestor names the file that set this key
    probe = key
    while probe:
        if probe in provenance:
            return provenance[probe]
        probe = probe.rpartition(".")[0]
    return "defaults"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, provenance: dict) -> Any:
    def bad(expected: str = None):
        return RecipeError(
            f"{_where(key, provenance)}: key '{key}' expects {expected or _type_name(tp)}, got {value!r}"
        )

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, provenance)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad(f"one of {_type_name(tp)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad()
        return [_coerce(v, item, f"{key}[{i}]", provenance) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key + ".", provenance)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        # YAML 1.1 reads 3e-4 (no dot) as a string; accept any number spelled as text
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"unsupported schema type {tp!r} for {key}")


def _build(cls, data: dict, prefix: str, provenance: dict):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise RecipeError(f"{_where(dotted, provenance)}: unknown key '{dotted}'{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted, provenance)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field (no default) is missing
        raise RecipeError(f"{_where(prefix.rstrip('.'), provenance)}: '{prefix.rstrip('.')}': {e}") from None


# --------------------------------------------------------------------------- validation


def validate(cfg: Config, provenance: Optional[dict] = None) -> None:
    """Cross-key checks that a type system cannot express. Raises RecipeError naming the key."""
    provenance = provenance or {}

    def fail(key: str, msg: str):
        raise RecipeError(f"{_where(key, provenance)}: key '{key}': {msg}")

    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key, value in [
        ("model.layers", m.layers), ("model.hidden", m.hidden), ("model.heads", m.heads),
        ("model.mlp_ratio", m.mlp_ratio), ("model.seq_len", m.seq_len), ("train.steps", t.steps),
        ("train.global_batch", t.global_batch), ("train.micro_batch", t.micro_batch),
        ("parallel.tp", p.tp), ("parallel.pp", p.pp), ("train.log_every", t.log_every),
        ("eval.batches", cfg.eval.batches), ("eval.mc_samples", cfg.eval.mc_samples),
    ]:
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    if m.ell < 1:
        fail("model.ell", f"the token granularity must be at least 1, got {m.ell}")
    if m.vocab_size is not None and m.vocab_size < 2:
        fail("model.vocab_size", f"must be at least 2, got {m.vocab_size}")
    if m.hidden % m.ell:
        fail("model.ell", f"model.hidden={m.hidden} is not divisible by model.ell={m.ell} "
             "(each sub-token gets hidden/ell embedding dims)")
    if m.hidden % m.heads:
        fail("model.heads", f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
    if (m.hidden // m.heads) % 2:
        fail("model.heads", f"head dim {m.hidden // m.heads} must be even for rotary positions")
    if not 0.0 <= m.dropout < 1.0:
        fail("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if p.dp < 0:
        fail("parallel.dp", f"must be 0 (auto) or positive, got {p.dp}")
    if p.zero_stage not in (0, 1, 2, 3):
        fail("parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.pp > 1 and p.zero_stage > 1:
        fail("parallel.zero_stage", f"pipeline parallelism (parallel.pp={p.pp}) runs DeepSpeed's pipeline "
             f"engine, which supports ZeRO stage 0 or 1 only; got {p.zero_stage}")
    if p.pp > 1 and cfg.precision == "bf16" and p.zero_stage == 0:
        fail("parallel.zero_stage", "bf16 with pipeline parallelism needs ZeRO stage 1 "
             "(DeepSpeed's bf16 pipeline optimizer cannot reload a stage-0 checkpoint)")
    if p.pp > m.layers:
        fail("parallel.pp", f"{p.pp} pipeline stages for {m.layers} layers: each stage needs a layer")
    if m.heads % p.tp:
        fail("parallel.tp", f"model.heads={m.heads} is not divisible by parallel.tp={p.tp}")
    if (m.hidden * m.mlp_ratio) % p.tp:
        fail("parallel.tp", f"MLP width {m.hidden * m.mlp_ratio} is not divisible by parallel.tp={p.tp}")
    if t.global_batch % t.micro_batch:
        fail("train.global_batch", f"{t.global_batch} is not divisible by train.micro_batch={t.micro_batch}")
    if p.dp and t.global_batch % (t.micro_batch * p.dp):
        fail("train.global_batch", f"{t.global_batch} is not divisible by train.micro_batch × parallel.dp "
             f"= {t.micro_batch} × {p.dp}")
    if not 0.0 <= cfg.optim.ema < 1.0:
        fail("optim.ema", f"must be in [0, 1), got {cfg.optim.ema}")
    if cfg.optim.lr <= 0:
        fail("optim.lr", f"must be positive, got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        fail("optim.betas", f"must be two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.optim.warmup_steps < 0:
        fail("optim.warmup_steps", f"must be 0 or more, got {cfg.optim.warmup_steps}")
    if cfg.eval.every < 0 or cfg.checkpoint.every < 0:
        fail("eval.every" if cfg.eval.every < 0 else "checkpoint.every", "must be 0 or more")
    if cfg.checkpoint.keep_last < 1:
        fail("checkpoint.keep_last", f"must be at least 1, got {cfg.checkpoint.keep_last}")
    if cfg.data.shuffle_block < 1:
        fail("data.shuffle_block", f"must be at least 1, got {cfg.data.shuffle_block}")
    if cfg.data.path is not None and cfg.data.mixture:
        fail("data.mixture", "give either data.path or data.mixture, not both")
    for i, entry in enumerate(cfg.data.mixture):
        if entry.weight <= 0:
            fail(f"data.mixture[{i}].weight", f"must be positive, got {entry.weight}")


def resolve_dp(cfg: Config, world_size: int) -> int:
    """Data-parallel degree for a world size; a clear error when the layout cannot work."""
    p, t = cfg.parallel, cfg.train
    mp = p.tp * p.pp
    if world_size % mp:
        raise RecipeError(f"world size {world_size} is not divisible by parallel.tp × parallel.pp = "
                          f"{p.tp} × {p.pp}; launch a multiple of {mp} processes")
    dp = world_size // mp
    if p.dp and p.dp != dp:
        raise RecipeError(f"parallel.dp={p.dp} is pinned, but world size {world_size} / (tp × pp = {mp}) "
                          f"gives {dp}; launch {p.dp * mp} processes or set parallel.dp=0")
    if t.global_batch % (t.micro_batch * dp):
        raise RecipeError(f"train.global_batch={t.global_batch} is not divisible by train.micro_batch × dp "
                          f"= {t.micro_batch} × {dp}; change the batch sizes for {world_size} processes")
    return dp


def config_from_dict(tree: dict, where: str = "checkpoint config") -> Config:
    """A Config from a resolved recipe stored as a mapping (a checkpoint's config.json)."""
    provenance = {key: where for key in _leaf_keys(tree, "")}
    cfg = _build(Config, tree, "", provenance)
    validate(cfg, provenance)
    return cfg
