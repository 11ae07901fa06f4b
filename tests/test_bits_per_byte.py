"""Bits per byte credit each sequence its split's mean bytes (prime_scale.data.stats): the text's own
bytes over a whole split only, and labelled an estimate over a part of it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from prime_scale.evaluation import EvalResult, EvalTotals


def test_bits_per_byte_of_a_part_of_the_split_are_labelled_an_estimate():
    """A sequence is credited its split's mean bytes: the text's own bytes over the whole split only.
    A part of it (eval --max-batches, validation on eval.batches) is labelled an estimate wherever
    the figure is shown: the JSON, the table, the metrics record and the console lines."""
    from prime_scale import metrics

    totals = EvalTotals(sequences=3, tokens=30, nll=60, joint=70, nll_sq=1300, tokens_sq=300, nll_tokens=600,
                        unigram=90, bytes=120)
    meta = dict(mc_samples=1, seed=0, vocab_size=50, ell=2, carry_over=True)
    whole = EvalResult.from_totals(totals, split_sequences=3, **meta)
    part = EvalResult.from_totals(totals, split_sequences=10, **meta)
    unknown = EvalResult.from_totals(dataclasses.replace(totals, bytes=math.nan), split_sequences=10, **meta)
    assert whole.bits_per_byte == part.bits_per_byte == pytest.approx(60 / (120 * math.log(2)))
    assert (whole.bits_per_byte_estimated, part.bits_per_byte_estimated, unknown.bits_per_byte_estimated) == (
        False, True, None)
    assert EvalResult.from_totals(totals, **meta).bits_per_byte_estimated is True  # the split's size unknown
    assert part.as_dict()["bits_per_byte_estimated"] is True and "mean bytes" in part.as_dict()["bits_per_byte_note"]
    assert "bits_per_byte_note" not in whole.as_dict()
    assert "estimate" in _table_row(part, "bound in bits per byte") and "estimate" in _table_row(part, "unigram")
    assert "estimate" not in whole.format_table()
    for r, label in ((part, True), (whole, False)):
        record = {"val_nll_bound": 2.0, "val_stderr": 0.1, "val_ppl": math.exp(2.0), "val_bits_per_byte": r.bits_per_byte,
                  "val_bits_per_byte_estimated": r.bits_per_byte_estimated, "val_unigram_nll": 3.0,
                  "val_unigram_bits_per_byte": r.unigram_bits_per_byte, "val_tokens": 30, "val_weights": "raw"}
        assert ("bits/byte, estimated" in metrics.describe_validation(record)) is label
        assert ("estimated" in metrics.compare_with_baselines(record, 50, None)) is label


def _table_row(result, label):
    (row,) = [r for r in result.format_table().splitlines() if label in r]
    return row
