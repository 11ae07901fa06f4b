"""prime-scale as an lm-evaluation-harness model (docs/evaluation.md):

    lm_eval run --model prime-scale --model_args path=exports/tiny,mc_samples=16 --tasks ...

`path` is anything `prime-scale eval` loads: a consolidated export (`prime-scale convert`), a
step_<N> folder, a checkpoint directory or a run directory. The package declares this class under
the harness's `lm_eval.models` entry-point group, which lm-eval releases with plugin discovery read;
`prime-scale lm-eval ...` runs the harness's own command line with the backend registered, for
releases without it (0.4.13, the newest on PyPI when this was written).

What each request type returns (every number is a bound or a draw of the model, nothing else):
- loglikelihood(context, continuation): minus the conditional sub-token ELBO of the continuation
  with the context given (prime_scale.conditional), from `mc_samples` draws; a lower bound on
  log p(continuation | context). `is_greedy` is computed only with `greedy=true`: the
  confidence-ordered greedy fill (sampling.greedy_decode) reproduces the continuation; otherwise it
  is False for every request and a warning says so once.
- loglikelihood_rolling(text): minus the bound of the whole text, in the harness's rolling windows
  (lm_eval.utils.get_rolling_token_windows, one token of context per window, BOS before the first),
  each window at most the model's seq_len; word/byte perplexity and bits per byte computed from it
  are upper bounds.
- generate_until(context, gen_kwargs): the ancestral sampler (do_sample, at the task's temperature,
  1 when it names none) or the greedy fill (do_sample false / temperature 0), the context as a fixed
  prefix, cut at the model's EOS and at the first stop sequence.

Tokenization follows the training data: documents start with BOS, so every context is BOS + its
text; the harness's convention splits (context, continuation) (TemplateLM._encode_pair). Noise and
sampler draws are keyed by (seed, the request's token ids): results do not depend on batch size,
request order or what else is evaluated, and a seed reproduces them. After each call a log line
gives the Monte Carlo standard error of the total; `last_bounds` holds every request's bound.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from prime_scale.conditional import ConditionalBound, conditional_bounds, generation_seed, windows
from prime_scale.errors import UserError

# under the harness's logger, so its --verbosity and format apply to the backend's lines too
log = logging.getLogger("lm_eval.prime_scale")
NAME = "prime-scale"
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for a task that names no max_gen_toks


@register_model(NAME)
class PrimeScaleLM(TemplateLM):
    """The harness's model: model_args path=..., weights=auto|ema|raw, mc_samples=K (default: the
    recipe's eval.mc_samples), seed (default: the run's seed, as `prime-scale eval`), steps (sampler
    steps, default 128), greedy=false|true (compute is_greedy), top_p; --batch_size: requests per
    forward pass."""

    backend = "causal"  # the harness's split of (context, continuation): encode the whole, then cut

    def __init__(self, path: str, weights: str = "auto", mc_samples: Optional[int] = None,
                 seed: Optional[int] = None, steps: int = 128, greedy: bool = False, top_p: float = 1.0,
                 batch_size: int | str = 1, max_batch_size: Optional[int] = None, device: Optional[str] = None,
                 **unknown):
        super().__init__()
        if unknown:
            raise UserError(f"lm-eval model {NAME}: unknown model_args {sorted(unknown)}; known: path, weights, "
                            "mc_samples, seed, steps, greedy, top_p (docs/evaluation.md)")
        from prime_scale.data import load_tokenizer
        from prime_scale.inference import load_model

        self.steps = _positive_int(steps, "steps")
        self.greedy = _boolean(greedy, "greedy")
        self.top_p = float(top_p)
        self.batch_size = _batch_size(batch_size)
        if mc_samples is not None:
            _positive_int(mc_samples, "mc_samples")
        from prime_scale.parallel import state

        if state.is_initialized():
            raise UserError(f"lm-eval model {NAME}: another model is loaded in this process; close() it first "
                            "(one prime-scale model per process)")
        self._stack = contextlib.ExitStack()
        self._closer = weakref.finalize(self, self._stack.close)  # the parallel state and any temporary export
        try:
            self.loaded = self._stack.enter_context(load_model(path, weights))
            if self.loaded.tokenizer_dir is None:
                raise UserError(f"{path}: the checkpoint carries no tokenizer, so the harness's text cannot be "
                                "encoded")
            self.tokenizer = load_tokenizer(self.loaded.tokenizer_dir)
            cfg = self.loaded.cfg
            self.seq_len, self.carry_over = cfg.model.seq_len, cfg.model.carry_over
            self.mc_samples = _positive_int(mc_samples if mc_samples is not None else cfg.eval.mc_samples,
                                            "mc_samples")
            self.seed = int(cfg.seed if seed is None else seed)
        except BaseException:
            self._closer()
            raise
        self.last_bounds: list[ConditionalBound] = []
        self._warned: set[str] = set()
        # the harness passes device=cuda:0 unless told otherwise, also on a machine without a GPU
        asked = torch.device(device) if device is not None else None
        if asked is not None and (asked.type != "cuda" or torch.cuda.is_available()) \
                and not _same_device(asked, self.loaded.device):
            log.warning("%s: device=%s ignored; the model runs on %s (the process's GPU when there is one: give "
                        "each process its GPU with CUDA_VISIBLE_DEVICES)", NAME, asked, self.loaded.device)
        log.info("%s: %s (%s weights), V=%d, ell=%d, seq_len=%d, K=%d draws per request, seed %d, batch %d",
                 NAME, path, self.loaded.weights, self.loaded.vocab_size, self.loaded.ell, self.seq_len,
                 self.mc_samples, self.seed, self.batch_size)

    # ------------------------------------------------------------------ tokenization (TemplateLM's hooks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # a document starts with BOS, so an empty context is BOS alone

    @property
    def tokenizer_name(self) -> str:
        return f"prime-scale-{self.tokenizer.meta().get('hash', 'tokenizer')}"

    @property
    def device(self):
        return self.loaded.device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else [self.tokenizer.bos_id, *ids]

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # ------------------------------------------------------------------ the request types

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pieces = [windows(context, continuation, self.seq_len) for _, context, continuation in requests]
        bounds = self._bounds(pieces, "loglikelihood", disable_tqdm)
        out = []
        for (args, _, _), bound, parts in zip(requests, bounds, pieces):
            result = (-bound.nll, self._is_greedy(parts))
            self.cache_hook.add_partial("loglikelihood", args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        pieces = []
        for request in requests:
            ids = self.tok_encode(request.args[0], add_special_tokens=False)
            pieces.append([make_disjoint_window(w) for w in get_rolling_token_windows(
                ids, prefix_token=self.prefix_token_id, max_seq_len=self.seq_len - 1, context_len=1)])
        bounds = self._bounds(pieces, "loglikelihood_rolling", disable_tqdm)
        out = []
        for request, bound in zip(requests, bounds):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), -bound.nll)
            out.append(-bound.nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        from prime_scale.inference import decode_sample
        from prime_scale.sampling import ancestral_sample, greedy_decode

        eos_text = self.tokenizer.decode([self.tokenizer.eos_id]) or None
        seen: dict[str, int] = {}  # a task's repeats are the same request again: each gets its own draw
        out = []
        for request in tqdm(requests, desc=f"{NAME} generate_until", disable=disable_tqdm):
            context, gen_kwargs = request.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), default_max_gen_toks=DEFAULT_MAX_GEN_TOKS)
            self._warn_ignored(kw)
            until = handle_stop_sequences(kw.get("until"), eos=eos_text)
            prompt = self.tok_encode(context)
            new = self._new_tokens(int(kw["max_gen_toks"]), len(prompt))
            prefix = prompt[-(self.seq_len - new):]
            length = len(prefix) + new
            if not kw.get("do_sample"):
                tokens = greedy_decode(self.loaded, torch.tensor(prefix), length, self.loaded.vocab_size,
                                       self.loaded.ell, carry_over=self.carry_over, device=self.device)
            else:
                occurrence = seen[repr(request.args)] = seen.get(repr(request.args), -1) + 1
                g = self.loaded.generator(generation_seed(self.seed, prefix, new, occurrence))
                # do_sample with no temperature (or 0) samples the model's distribution, temperature 1
                result = ancestral_sample(self.loaded, 1, length, self.loaded.vocab_size, self.loaded.ell,
                                          self.steps, top_p=float(kw.get("top_p", self.top_p)),
                                          temperature=float(kw.get("temperature") or 0.0) or 1.0,
                                          prefix=torch.tensor(prefix), carry_over=self.carry_over, generator=g,
                                          device=self.device)
                tokens = result.tokens[0, len(prefix):]
            text = decode_sample(self.tokenizer, tokens.tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    def _new_tokens(self, requested: int, prompt_tokens: int) -> int:
        """Tokens to generate: as asked, but leaving the prompt (up to half the window) in the window."""
        room = self.seq_len - min(prompt_tokens, self.seq_len // 2)
        new = max(1, min(requested, room))
        if new < requested:
            self._warn_once("short", "%s: generating %d tokens where the task asks for up to %d: the model's "
                                     "window is %d tokens and keeps the prompt's last %d", NAME, new, requested,
                            self.seq_len, self.seq_len - new)
        return new

    def _warn_ignored(self, kw: dict) -> None:
        ignored = sorted(set(kw) - {"until", "max_gen_toks", "do_sample", "temperature", "top_p"})
        if ignored:
            self._warn_once(f"ignored {ignored}", "%s: generation arguments %s are not used (the sampler takes "
                                                  "until, max_gen_toks, do_sample, temperature, top_p)", NAME, ignored)

    # ------------------------------------------------------------------ helpers

    def _bounds(self, pieces: list[list[tuple[list[int], list[int]]]], what: str,
                disable_tqdm: bool) -> list[ConditionalBound]:
        """One bound per request: the sum of its pieces' bounds (all pieces scored together)."""
        flat = [pair for parts in pieces for pair in parts]
        started = time.perf_counter()
        with tqdm(total=len(flat), desc=f"{NAME} {what} (K={self.mc_samples})", disable=disable_tqdm) as bar:
            scored = conditional_bounds(self.loaded.logits, flat, vocab_size=self.loaded.vocab_size,
                                        ell=self.loaded.ell, seed=self.seed, mc_samples=self.mc_samples,
                                        carry_over=self.carry_over, batch_size=self.batch_size,
                                        device=self.device, progress=bar.update)
        bounds, at = [], 0
        for parts in pieces:
            total = ConditionalBound(0.0, 0.0, 0, self.mc_samples)
            for bound in scored[at: at + len(parts)]:
                total = total + bound
            bounds.append(total)
            at += len(parts)
        self.last_bounds = bounds
        _log_totals(what, bounds, len(flat), time.perf_counter() - started, self.mc_samples)
        return bounds

    def _is_greedy(self, parts: list[tuple[list[int], list[int]]]) -> bool:
        if not self.greedy:
            self._warn_once("greedy", "%s: is_greedy is reported as False for every request (greedy=false); "
                                      "tasks that score greedy matches (e.g. lambada's acc) need model_args "
                                      "greedy=true, at one network call per continuation token", NAME)
            return False
        from prime_scale.sampling import greedy_decode

        for context, piece in parts:
            filled = greedy_decode(self.loaded, torch.tensor(context), len(context) + len(piece),
                                   self.loaded.vocab_size, self.loaded.ell, carry_over=self.carry_over,
                                   device=self.device)
            if filled.tolist() != list(piece):
                return False
        return True

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def close(self) -> None:
        """Release the model, its parallel state and any temporary conversion (also done at exit)."""
        self._closer()


def _log_totals(what: str, bounds: list[ConditionalBound], windows_scored: int, seconds: float, K: int) -> None:
    if not bounds:
        return
    total = sum(b.nll for b in bounds)
    tokens = sum(b.tokens for b in bounds)
    stderr = math.sqrt(sum(b.stderr ** 2 for b in bounds)) if K > 1 else math.nan
    per_token = f"{total / tokens:.4f} ± {stderr / tokens:.4f}" if tokens else "n/a"
    log.info("%s %s: %d requests (%d windows, %d tokens), K=%d: bound %.3f nats in total, Monte Carlo "
             "s.e. ±%.3f (per token %s nats); %.1f s, %.1f requests/s", NAME, what, len(bounds), windows_scored,
             tokens, K, total, stderr, per_token, seconds, len(bounds) / max(seconds, 1e-9))


def _same_device(asked: torch.device, actual: torch.device) -> bool:
    return asked.type == actual.type and (asked.index is None or asked.index == (actual.index or 0))


def _positive_int(value, name: str) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise UserError(f"lm-eval model {NAME}: model_args {name}={value!r} must be a positive integer")
    return int(text)


def _boolean(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserError(f"lm-eval model {NAME}: model_args {name}={value!r} must be true or false")


def _batch_size(value) -> int:
    """--batch_size N: requests per forward pass. 'auto' (the harness's memory probe, which needs a
    causal model's forward) is taken as 8."""
    if str(value).startswith("auto"):
        log.info("%s: --batch_size %s taken as 8 requests per forward pass", NAME, value)
        return 8
    return _positive_int(value, "batch_size")
