"""The lm-evaluation-harness backend (prime_scale/lm_eval_model.py) on a real tiny trained run, offline:
the harness's own command line runs local tasks written here (multiple choice, rolling perplexity,
generation), and every number it reports is recomputed independently from the evaluator
(`evaluation.estimate`, what `prime-scale eval` runs) on token windows built by hand."""

from __future__ import annotations

import glob
import json
import logging
import math
import re
from importlib.metadata import entry_points

import pytest
import torch

from harness.tiny_run import run

K, SEED = 3, 7
LONG = ("The interpreter reads a module, compiles it to bytecode and runs it; a package is a directory of "
        "modules with an __init__ file, and the import system finds both on sys.path. ") * 6
DOCS = ["The json module can serialize Python objects to strings.",
        "Use a virtual environment to keep the packages of one project apart from another.",
        "import os\nprint(os.getcwd())", LONG]
QUESTIONS = [{"question": "The built-in function that returns the length of a list is", "choices": ["len", "size", "count"],
              "answer": 0},
             {"question": "To read a file line by line, open it and iterate over the", "choices": ["file object", "banana"],
              "answer": 0}]
PROMPT = "The print function writes"
STOP = "e"


def _task(name, data, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    (root / "choice.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "gen.jsonl").write_text(json.dumps({"prompt": PROMPT, "answer": "text"}) + "\n")
    (root / "ps_rolling.yaml").write_text(_task("ps_rolling", root / "docs.jsonl", (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))
    (root / "ps_choice.yaml").write_text(_task("ps_choice", root / "choice.jsonl", (
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')))
    (root / "ps_gen.yaml").write_text(_task("ps_gen", root / "gen.jsonl", (
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        f'generation_kwargs:\n  until: ["{STOP}"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")))
    return root


def offline_env(tmp_path):
    return {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def evaluator_bound(loaded, context, continuation):
    """−log p(continuation | context) bound by the evaluator: the sequence with the context as
    uncounted positions, noised under the request's key, K draws, the run's loss code."""
    from prime_scale.conditional import request_key
    from prime_scale.evaluation import estimate, objective_sums

    x0 = torch.tensor([list(context) + list(continuation)])
    counted = torch.zeros_like(x0, dtype=torch.bool)
    counted[0, len(context):] = True
    chunk = [{"input_ids": x0, "attention_mask": counted, "index": torch.tensor([request_key(context, continuation)])}]
    totals = estimate(objective_sums(loaded.logits, loaded.vocab_size, loaded.ell, loaded.cfg.model.carry_over),
                      [chunk], vocab_size=loaded.vocab_size, ell=loaded.ell, seed=SEED, mc_samples=K)
    assert totals.tokens == len(continuation)
    return totals.nll


def rolling_windows_by_hand(ids, bos, seq_len):
    """The harness's rolling convention for a model of seq_len positions: the first window is BOS +
    up to seq_len − 1 tokens, each later one the next (up to) seq_len − 1 tokens after the tokens
    before them that fill the window (one for a full window, more for a short last one)."""
    out, start = [], 0
    while start < len(ids):
        piece = ids[start:start + seq_len - 1]
        out.append(([bos] if start == 0 else ids[start - (seq_len - len(piece)):start], piece))
        start += len(piece)
    return out


def test_the_package_declares_the_backend_under_the_harness_plugin_group():
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    from prime_scale.lm_eval_model import PrimeScaleLM

    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "prime-scale"]
    assert ep.load() is PrimeScaleLM and issubclass(PrimeScaleLM, LM)
    assert get_model("prime-scale") is PrimeScaleLM


def test_the_harness_reports_the_evaluators_numbers(tiny_trained, tasks, tmp_path):
    from prime_scale.data import load_tokenizer
    from prime_scale.inference import load_model
    from prime_scale.sampling import greedy_decode

    _, export = tiny_trained
    proc = run("lm-eval", "run", "--model", "prime-scale", "--model_args", f"path={export},mc_samples={K},seed={SEED}",
               "--tasks", "ps_rolling,ps_choice,ps_gen", "--include_path", str(tasks), "--batch_size", "4",
               "--output_path", str(tmp_path / "out"), "--log_samples", env_extra=offline_env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Monte Carlo s.e." in proc.stderr + proc.stdout  # the per-call log line
    (results_file,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    results = json.load(open(results_file))["results"]

    def samples(task):
        (path,) = glob.glob(str(tmp_path / "out" / "*" / f"samples_{task}_*.jsonl"))
        return sorted((json.loads(line) for line in open(path)), key=lambda d: d["doc_id"])

    with load_model(export) as loaded:
        tok = load_tokenizer(loaded.tokenizer_dir)
        seq_len = loaded.cfg.model.seq_len
        # rolling perplexity: per-document bounds and the harness's three aggregates
        nll = []
        for text in DOCS:
            pieces = rolling_windows_by_hand(tok.encode(text), tok.bos_id, seq_len)
            nll.append(sum(evaluator_bound(loaded, c, p) for c, p in pieces))
        assert len(rolling_windows_by_hand(tok.encode(LONG), tok.bos_id, seq_len)) >= 2  # windows are exercised
        got = [float(s["resps"][0][0]) for s in samples("ps_rolling")]
        assert got == pytest.approx([-n for n in nll], rel=1e-6)
        words = sum(len(re.split(r"\s+", t)) for t in DOCS)
        n_bytes = sum(len(t.encode("utf-8")) for t in DOCS)
        r = results["ps_rolling"]
        assert r["bits_per_byte,none"] == pytest.approx(sum(nll) / n_bytes / math.log(2), rel=1e-6)
        assert r["word_perplexity,none"] == pytest.approx(math.exp(sum(nll) / words), rel=1e-6)
        assert r["byte_perplexity,none"] == pytest.approx(math.exp(sum(nll) / n_bytes), rel=1e-6)
        # multiple choice: context = BOS + question, the choice split off the whole encoding
        correct = []
        for q, s in zip(QUESTIONS, samples("ps_choice")):
            context = [tok.bos_id, *tok.encode(q["question"])]
            lls = []
            for choice in q["choices"]:
                whole = [tok.bos_id, *tok.encode(q["question"] + " " + choice)]
                lls.append(-evaluator_bound(loaded, context, whole[len(context):]))
            assert [float(r[0]) for r in s["filtered_resps"]] == pytest.approx(lls, rel=1e-6)
            correct.append(float(max(range(len(lls)), key=lls.__getitem__) == q["answer"]))
        assert results["ps_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
        # generation: greedy (do_sample false), 8 new tokens at most, cut at the stop sequence
        prefix = [tok.bos_id, *tok.encode(PROMPT)]
        filled = greedy_decode(loaded.logits, torch.tensor(prefix), len(prefix) + 8, loaded.vocab_size, loaded.ell)
        body = filled.tolist()
        body = body[: body.index(tok.eos_id)] if tok.eos_id in body else body
        expected = tok.decode([i for i in body if i not in (tok.bos_id, tok.pad_id)]).split(STOP)[0]
        (gen,) = samples("ps_gen")
        assert gen["resps"][0][0] == expected and STOP not in gen["resps"][0][0]


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a if isinstance(a, tuple) else (a,), i) for i, a in enumerate(args)]


PAIRS = [("The json module", " can serialize objects."), ("Use a virtual", " environment."), ("import", " os"),
         ("The built-in function", " len"), ("The built-in function", " size"), ("", "Start of a document")]


def capture_backend_logs(caplog, monkeypatch, level):
    """The backend's records reach caplog even after the harness set up its own logger in this
    process (it stops propagation to the root logger, where caplog listens)."""
    monkeypatch.setattr(logging.getLogger("lm_eval"), "propagate", True)
    caplog.set_level(level, logger="lm_eval.prime_scale")


def test_batch_size_order_and_checkpoint_form_change_nothing(tiny_trained, caplog, monkeypatch):
    from prime_scale.lm_eval_model import PrimeScaleLM

    run_dir, export = tiny_trained
    capture_backend_logs(caplog, monkeypatch, logging.INFO)
    results = {}
    for path, batch in ((export, 1), (export, 8), (run_dir, 3)):
        lm = PrimeScaleLM(path=str(path), mc_samples=K, seed=SEED, batch_size=batch)
        try:
            ll = lm.loglikelihood(_instances("loglikelihood", PAIRS), disable_tqdm=True)
            backwards = lm.loglikelihood(_instances("loglikelihood", PAIRS[::-1]), disable_tqdm=True)[::-1]
            rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", DOCS), disable_tqdm=True)
            stderr = [b.stderr for b in lm.last_bounds]
        finally:
            lm.close()
        assert backwards == ll
        results[(str(path), batch)] = (ll, rolling)
        assert all(s > 0 for s in stderr)
    one, eight = results[(str(export), 1)], results[(str(export), 8)]
    assert one == eight  # bitwise
    sharded = results[(str(run_dir), 3)]
    assert [x for x, _ in sharded[0]] == pytest.approx([x for x, _ in one[0]], abs=1e-5)
    assert sharded[1] == pytest.approx(one[1], abs=1e-5)
    assert all(ll < 0 and greedy is False for ll, greedy in one[0])
    assert "Monte Carlo s.e." in caplog.text and "is_greedy is reported as False" in caplog.text
    lm = PrimeScaleLM(path=str(export), mc_samples=K, seed=SEED + 1)
    try:
        other = lm.loglikelihood(_instances("loglikelihood", PAIRS), disable_tqdm=True)
    finally:
        lm.close()
    assert [x for x, _ in other] != [x for x, _ in one[0]]


def test_scores_stay_bounds_with_more_extreme_positions_than_the_gpus_capacity(tiny_trained, monkeypatch):
    """On a GPU a training call of the loss keeps a fixed number of exactly recomputed positions; the
    backend's scores must not: with the accelerator's rule forced on the CPU and > 1024 extreme
    positions in one forward pass, every score is minus the exact conditional bound."""
    from prime_scale.conditional import _concat, _draws, conditional_bounds
    from prime_scale.lm_eval_model import PrimeScaleLM
    from prime_scale.model import vocab_parallel as vp

    _, export = tiny_trained
    draws = 8
    lm = PrimeScaleLM(path=str(export), mc_samples=draws, seed=SEED, batch_size=10)
    try:
        loaded = lm.loaded
        with torch.no_grad():  # logits ~1e3 apart: most masked digits' mass far below e^-87
            loaded.model.head.out.weight.mul_(300.0)
        ids = torch.randint(4, loaded.vocab_size, (10, 36), generator=torch.Generator().manual_seed(0)).tolist()
        pairs = [(row[:8], row[8:]) for row in ids]  # one length: the 10 × 8 draws share one forward pass
        exact = conditional_bounds(loaded.logits, pairs, vocab_size=loaded.vocab_size, ell=loaded.ell, seed=SEED,
                                   mc_samples=draws, carry_over=lm.carry_over, batch_size=10)
        monkeypatch.setattr(vp, "FORCE_ACCELERATOR_RULE", True)
        scores = lm._loglikelihood_tokens([(("", ""), c, x) for c, x in pairs], disable_tqdm=True)
        assert [score for score, _ in scores] == [-b.nll for b in exact]
        # the pass holds more extreme positions than any capacity: the training rule leaves some out
        batch = _concat([b for p in pairs for b in _draws(p, loaded.vocab_size, loaded.ell, SEED, draws)])
        vp.take_exact_overflow()
        vp.prime_loss_parallel(loaded.logits(batch.yt), batch.x0, batch.yt, batch.t, batch.mask, loaded.vocab_size,
                               loaded.ell, vocab_start=0, backward=True)
        capacity = vp.exact_capacity_for(batch.x0.numel())
        assert vp.take_exact_overflow() + capacity > 1024
    finally:
        lm.close()


def test_is_greedy_is_the_greedy_fill(tiny_trained):
    from prime_scale.lm_eval_model import PrimeScaleLM
    from prime_scale.sampling import greedy_decode

    _, export = tiny_trained
    lm = PrimeScaleLM(path=str(export), mc_samples=1, greedy=True)
    try:
        context = lm.tok_encode("The json module")
        loaded = lm.loaded
        filled = greedy_decode(loaded.logits, torch.tensor(context), len(context) + 3, loaded.vocab_size,
                               loaded.ell).tolist()
        other = [(filled[0] + 1) % loaded.vocab_size, *filled[1:]]
        out = lm._loglikelihood_tokens([(("a", "b"), context, filled), (("a", "c"), context, other)],
                                       disable_tqdm=True)
        assert [greedy for _, greedy in out] == [True, False]
    finally:
        lm.close()


def test_bad_model_args_are_clear_errors(tiny_trained, tmp_path):
    from prime_scale.errors import UserError
    from prime_scale.lm_eval_model import PrimeScaleLM

    _, export = tiny_trained
    with pytest.raises(UserError, match="unknown model_args \\['temperatur'\\]"):
        PrimeScaleLM(path=str(export), temperatur=0.5)
    with pytest.raises(UserError, match="mc_samples=0 must be a positive integer"):
        PrimeScaleLM(path=str(export), mc_samples=0)
    with pytest.raises(UserError, match="nowhere: no such checkpoint or directory"):
        PrimeScaleLM(path=str(tmp_path / "nowhere"))
    lm = PrimeScaleLM(path=str(export), mc_samples=1)  # a failed load left no parallel state behind
    lm.close()


def test_sampled_generation_is_seeded_per_request_and_honours_the_stop_and_length(tiny_trained, caplog,
                                                                                   monkeypatch):
    from prime_scale.lm_eval_model import PrimeScaleLM

    _, export = tiny_trained
    sampled = {"until": ["e"], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0}
    prompts = [("The json module", sampled), ("Use a virtual", sampled), ("The json module", {**sampled, "until": []})]
    lm = PrimeScaleLM(path=str(export), steps=16, seed=SEED)
    try:
        with pytest.raises(Exception, match="another model is loaded in this process"):
            PrimeScaleLM(path=str(export))
        first = lm.generate_until(_instances("generate_until", prompts), disable_tqdm=True)
        again = lm.generate_until(_instances("generate_until", prompts[::-1]), disable_tqdm=True)[::-1]
        n_tokens = [len(lm.tok_encode(t, add_special_tokens=False)) for t in first]
        # a task's repeats: the same request again, each its own draw (the first one as before)
        repeats = lm.generate_until(_instances("generate_until", [prompts[2]] * 3), disable_tqdm=True)
        capture_backend_logs(caplog, monkeypatch, logging.WARNING)
        long_prompt = " ".join(["word"] * 300)
        (long,) = lm.generate_until(_instances("generate_until", [(long_prompt, {"max_gen_toks": 1000, "top_k": 5})]),
                                    disable_tqdm=True)
        window = lm.seq_len
    finally:
        lm.close()
    assert first == again  # keyed by the prompt, not by its place
    assert "e" not in first[0] + first[1] and first[2].startswith(first[0])  # the same draw, cut at the stop
    assert max(n_tokens) <= 6 + 1  # re-encoding a generated piece may split it in two
    assert repeats[0] == first[2] and len(set(repeats)) == 3
    assert f"generating {window - window // 2} tokens where the task asks for up to 1000" in caplog.text
    assert "['top_k'] are not used" in caplog.text and isinstance(long, str)
