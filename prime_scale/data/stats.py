"""Facts about the data splits that the evaluator needs beyond the sequences themselves.

    stats = SplitStats(loader.manifests, "val", loader.weights)   # or SplitStats.for_loader(loader)
    nbytes = stats.sequence_bytes(batch["index"])   # Float64[B]: NaN where unknown
    log_p = stats.unigram_log_probs()               # Float64[V], or None where unknown
    if not stats.bytes_known: print(stats.describe_unknown("bytes"))

- **Bits per byte** (comparable across tokenizers) needs the UTF-8 bytes of the text the sequences
  hold: `splits.<split>.bytes` of each manifest (data_prep/shard.py; the split's dropped tail is
  prorated). A sequence is credited its split's mean, bytes / sequences: one sequence's own share is
  not recorded, but summed over a whole pass of the split (the padding rows excluded) the credits
  are the split's bytes, so bits per byte of a pass = total NLL in nats / (ln 2 · total bytes).
- **The unigram baseline** is the cross-entropy of the evaluated split under the training split's
  token frequencies, `splits.train.token_counts` (every position counted, BOS and EOS included: the
  model is scored there too), add-one (Laplace) smoothed so an id unseen in training still gets a
  finite cost: p(v) = (count(v) + 1) / (total + V). A mixture's distribution is the datasets'
  smoothed distributions mixed by the normalised weights, as the training stream samples them.

A mixture's global sample index is the sample id plus the sizes of the earlier datasets' same split,
as in loader.py. What a manifest does not record (it was prepared before these fields existed, or
from pre-tokenized ids, which carry no text) is never guessed: the figure is unknown, and
describe_unknown() says why and what to do.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from prime_scale.data.format import manifest_path, split_info
from prime_scale.errors import UserError

_FIGURES = {"bytes": ("split bytes", "bits per byte"), "unigram": ("token counts", "the unigram baseline")}


class SplitStats:
    """Bytes per sequence of one split and the training unigram distribution of a mixture."""

    def __init__(self, manifests: Sequence[Mapping], split: str, weights: Optional[Sequence[float]] = None):
        if not manifests:
            raise UserError("split statistics need at least one dataset")
        weights = [1.0] * len(manifests) if weights is None else [float(w) for w in weights]
        names = [manifest_path(m) for m in manifests]
        if len(weights) != len(manifests) or min(weights) < 0 or sum(weights) <= 0:
            raise UserError(f"{', '.join(names)}: weights {weights} must be one non-negative number per dataset, "
                            "not all zero")
        sizes = {m["vocab_size"] for m in manifests}
        if len(sizes) > 1:
            raise UserError(f"{', '.join(names)}: the datasets differ in vocab_size ({sorted(sizes)}); a mixture "
                            "needs data prepared with one tokenizer")
        self.manifests, self.split, self.weights, self.names = list(manifests), split, weights, names
        self.vocab_size = sizes.pop()
        infos = [split_info(m, split) for m in manifests]
        self.sequences = [int(info["sequences"]) for info in infos]
        self._starts = torch.tensor([0] + self.sequences, dtype=torch.int64).cumsum(0)
        split_bytes = [info.get("bytes") for info in infos]
        self.bytes_known = all(isinstance(b, int) for b in split_bytes)
        # the split's bytes over all datasets: what one whole pass over it reads
        self.total_bytes: Optional[int] = sum(split_bytes) if self.bytes_known else None
        self._per_sequence = torch.tensor(
            [b / n if isinstance(b, int) and n else float("nan") for b, n in zip(split_bytes, self.sequences)],
            dtype=torch.float64)
        # why a figure is unknown, per dataset: None = prepared before the field existed, else the message
        self._unknown: dict = {"bytes": {}, "unigram": {}}
        for m, name, info in zip(manifests, names, infos):
            if "bytes" not in info:
                self._unknown["bytes"][name] = None
            elif info["bytes"] is None:
                self._unknown["bytes"][name] = (
                    f"{name}: prepared from pre-tokenized ids (an external vocabulary), so the {split} split's "
                    "text and its bytes are unknown: no bits per byte; prepare it from text with "
                    "`prime-scale prep shard --tokenizer DIR` to get one")
            if "token_counts" not in m["splits"]["train"]:
                self._unknown["unigram"][name] = None
        self.unigram_known = not self._unknown["unigram"]
        self._log_probs: Optional[torch.Tensor] = None

    @classmethod
    def for_loader(cls, loader) -> "SplitStats":
        """The statistics of what a Loader reads: its datasets, split and mixture weights."""
        return cls(loader.manifests, loader.split, loader.weights)

    def sequence_bytes(self, index: torch.Tensor) -> torch.Tensor:
        """Float64 bytes credited to each global sample index: its dataset's split bytes / sequences
        (NaN where that dataset did not record bytes), on the index's device."""
        index = torch.as_tensor(index)
        flat = index.to("cpu", torch.int64)
        total = int(self._starts[-1])
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= total):
            raise IndexError(f"sample index outside the {self.split} split's [0, {total})")
        dataset = torch.searchsorted(self._starts, flat, right=True) - 1
        return self._per_sequence[dataset].to(index.device)

    def unigram_log_probs(self) -> Optional[torch.Tensor]:
        """Float64 [V]: log of the training split's add-one smoothed id frequencies, mixed by the
        normalised weights; None when a dataset's train split did not record token_counts."""
        if not self.unigram_known:
            return None
        if self._log_probs is None:
            V, norm = self.vocab_size, sum(self.weights)
            mix = torch.zeros(V, dtype=torch.float64)
            for m, w in zip(self.manifests, self.weights):
                counts = torch.tensor(m["splits"]["train"]["token_counts"], dtype=torch.float64)
                mix += (w / norm) * (counts + 1) / (counts.sum() + V)
            self._log_probs = mix.log()
        return self._log_probs.clone()

    def describe_unknown(self, figure: str = "all") -> Optional[str]:
        """One line saying why a figure ("bytes", "unigram" or "all") is unknown; None when known."""
        figures = list(_FIGURES) if figure == "all" else [figure]
        if not set(figures) <= set(_FIGURES):
            raise ValueError(f"figure must be one of {', '.join(_FIGURES)} or all, got {figure!r}")
        lines, stale = [], {}
        for f in figures:
            for name, message in self._unknown[f].items():
                if message is None:
                    stale.setdefault(name, []).append(f)
                else:
                    lines.append(message)
        for name, missing in stale.items():
            fields, gets = (" and ".join(_FIGURES[f][i] for f in missing) for i in (0, 1))
            lines.append(f"{name}: prepared before prime-scale recorded {fields}; re-run `prime-scale prep shard` "
                         f"to get {gets}")
        return "; ".join(lines) or None
