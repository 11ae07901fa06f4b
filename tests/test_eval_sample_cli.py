"""`prime-scale eval` and `prime-scale sample` on a real (tiny) trained run: sharded and consolidated
checkpoints give the same bound, the numbers are the ELBO's, and samples decode with the run's tokenizer."""

from __future__ import annotations

import json
import math

import pytest

from harness.tiny_run import run


@pytest.fixture(scope="module")
def trained(tiny_trained):
    return tiny_trained


def _eval(ckpt, json_path, *extra):
    proc = run("eval", str(ckpt), "--mc-samples", "2", "--max-batches", "2", "--batch-size", "4",
               "--json", str(json_path), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(json_path.read_text())


def test_eval_sharded_equals_consolidated_and_reports_the_bound(trained, tmp_path):
    run_dir, consolidated = trained
    table, a = _eval(consolidated, tmp_path / "a.json")
    _, b = _eval(run_dir, tmp_path / "b.json")
    assert a["nll_per_token"] == pytest.approx(b["nll_per_token"], abs=1e-6)
    assert a["tokens"] == b["tokens"] == 2 * 4 * 128 and a["sequences"] == 8
    assert a["ppl"] == pytest.approx(math.exp(a["nll_per_token"]))
    assert a["bound"] == "subtoken_elbo" and a["stderr"] > 0
    assert "train_objective_joint" in a and "perplexity" in table.lower()
    # 2 batches of the split: its bits per byte credit each sequence the split's mean bytes, labelled
    assert a["bits_per_byte_estimated"] is True and "mean bytes" in a["bits_per_byte_note"]
    (line,) = [r for r in table.splitlines() if "bound in bits per byte" in r]
    assert f"{a['bits_per_byte']:.4f} (estimate: a part of the split" in line
    _, again = _eval(consolidated, tmp_path / "c.json")
    assert again["nll_per_token"] == a["nll_per_token"]  # deterministic for a seed
    _, other_seed = _eval(consolidated, tmp_path / "d.json", "--seed", "5")
    assert other_seed["nll_per_token"] != a["nll_per_token"]


def test_eval_with_its_defaults_covers_the_whole_split_in_every_unit(trained, tmp_path):
    """The README flow: `eval CKPT --json F`, no --max-batches. The demo's val split (431 sequences)
    is not a multiple of the batch (8): its padded last batch counts only its real rows."""
    from prime_scale.data.demo import demo_dataset

    _, consolidated = trained
    proc = run("eval", str(consolidated), "--json", str(tmp_path / "full.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads((tmp_path / "full.json").read_text())
    val = json.loads((demo_dataset(128) / "manifest.json").read_text())["splits"]["val"]
    assert val["sequences"] % 8 and (d["sequences"], d["tokens"]) == (val["sequences"], val["sequences"] * 128)
    assert d["bits_per_byte"] == pytest.approx(d["nll_per_token"] * d["tokens"] / (math.log(2) * val["bytes"]),
                                               rel=1e-9)
    assert d["unigram_bits_per_byte"] == pytest.approx(
        d["unigram_nll_per_token"] * d["tokens"] / (math.log(2) * val["bytes"]), rel=1e-9)
    assert d["weights"] == "ema" and d["stderr"] > 0
    assert d["bits_per_byte_estimated"] is False and "bits_per_byte_note" not in d  # the text's own bytes
    assert "estimate" not in proc.stdout
    for label in ("bits per byte", "unigram baseline", "perplexity bound"):
        assert label in proc.stdout


def test_sample_decodes_and_counts_network_calls(trained):
    _, consolidated = trained
    proc = run("sample", str(consolidated), "--num", "2", "--steps", "24", "--length", "32", "--json",
               "--prompt", "The Python")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert len(r["samples"]) == 2 and all(s.startswith("The Python") for s in r["samples"])
    assert r["nfe"] - (r["steps"] - r["idle_steps"]) in (0, 1) and r["invalid_codes"] == 0
    assert r["isr"] == pytest.approx(r["idle_steps"] / r["steps"])


def test_eval_and_sample_refuse_missing_checkpoints(tmp_path):
    for cmd in ("eval", "sample"):
        proc = run(cmd, str(tmp_path / "nowhere"))
        assert proc.returncode == 2 and "nowhere: no such checkpoint or directory" in proc.stderr


def test_the_model_split_at_its_head_is_the_whole_model(trained):
    """The sampler's Predictor view of a checkpoint (backbone states, the head at chosen positions)
    gives the full forward's logits, and the same seeded samples as the plain logits_fn."""
    import torch

    from prime_scale.inference import load_model
    from prime_scale.sampling import ancestral_sample

    _, consolidated = trained
    with load_model(consolidated) as loaded:
        L, ell, V = loaded.cfg.model.seq_len, loaded.ell, loaded.vocab_size
        g = torch.Generator().manual_seed(0)
        yt = torch.randint(0, loaded.model.args.base + 1, (3, L * ell), generator=g)
        chosen = torch.rand(3, L, generator=g) < 0.1
        split = loaded.logits_at(loaded.states(yt)[chosen])
        assert split.shape == (int(chosen.sum()), V)
        assert torch.allclose(split, loaded.logits(yt)[chosen], atol=1e-5, rtol=1e-5)
        runs = [ancestral_sample(model, 2, 32, V, ell, 24, generator=torch.Generator().manual_seed(3))
                for model in (loaded, loaded.logits)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and runs[0].nfe == runs[1].nfe
    assert torch.equal(runs[0].seq_nfe, runs[1].seq_nfe)


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--max-batches", "-1"], "--max-batches"), (["eval", "--max-batches", "0"], "--max-batches"),
    (["eval", "--batch-size", "0"], "--batch-size"), (["eval", "--mc-samples", "-2"], "--mc-samples"),
    (["eval", "--seed", "-1"], "--seed"), (["eval", "--seed", str(2**40)], "--seed"),
    (["sample", "--steps", "0"], "--steps"), (["sample", "--num", "-1"], "--num"),
    (["sample", "--length", "0"], "--length"), (["sample", "--length", "-3"], "--length"),
    (["sample", "--top-p", "0"], "--top-p"), (["sample", "--top-p", "1.5"], "--top-p"),
    (["sample", "--top-p", "nan"], "--top-p"), (["sample", "--temperature", "0"], "--temperature"),
    (["sample", "--temperature", "nan"], "--temperature"), (["sample", "--temperature", "inf"], "--temperature"),
    (["sample", "--seed", "-5"], "--seed")])
def test_every_absurd_number_option_of_eval_and_sample_is_a_named_error(trained, capsys, argv, flag):
    """Each numeric option of eval and sample out of its range: exit 2 and one line naming the flag
    and its range, before the checkpoint is loaded (no traceback, no ValueError from a library)."""
    from prime_scale import cli

    _, consolidated = trained
    command, *options = argv
    code = cli.main([command, str(consolidated), *options])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"prime-scale {command}: error: {flag} must be") and "Traceback" not in err, err
    assert options[1] in err  # the value given
