"""Untrusted exported files (issue 10, item 9): a consolidated export (or a sharded checkpoint) that
is damaged, altered or made elsewhere fails with one message that names the file and the tensor or
key and says what to do (exit code 2, no traceback), and evaluating a checkpoint never fetches data
from a location the checkpoint names.

One tiny real run is trained and converted once; every fault is planted in a copy of its output.
Most cases call the command line's own entry point (prime_scale.cli.main) in this process, which
saves a process start per case; one runs as `python -m prime_scale.cli` to show the whole path."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.layers=2", "model.hidden=64", "model.heads=2", "optim.warmup_steps=1", "optim.ema=0",
        "train.global_batch=8", "train.micro_batch=8", "train.log_every=1", "eval.every=0", "eval.batches=1",
        "logging.wandb=disabled", "eval.final_batches=null"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# an fp32 run on one data-parallel rank runs ZeRO 0 (config.resolve_zero_stage): DeepSpeed keeps the
# optimizer state beside the module weights
OPTIM_FILE = "mp_rank_00_model_states.pt"
EVAL = ["--max-batches", "1", "--batch-size", "2", "--mc-samples", "1"]


def run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update({"OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"})
    return subprocess.run([sys.executable, "-m", "prime_scale.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the run's step folder, its consolidated export), made once by a real two-step run."""
    root = tmp_path_factory.mktemp("faults")
    proc = run("train", "tiny-cpu", *TINY, "train.steps=2", f"run.dir={root / 'run'}", "--samples", "0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run("convert", str(root / "run"), "--out", str(root / "export"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run" / "checkpoints" / "step_2", root / "export"


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(*argv) -> (exit code, stdout, stderr) of prime_scale.cli.main in this process. Any exception
    other than a UserError escapes it (and fails the test): exit code 2 here means no traceback."""
    from prime_scale.cli import main

    for key in LAUNCH_VARS:  # a one-process parallel state sets them; removed again after the test
        monkeypatch.delenv(key, raising=False)

    def call(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return call


@pytest.fixture
def export_copy(trained, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(trained[1], dst)
    return dst


def _rewrite_weights(folder: Path, change) -> Path:
    """model.safetensors rewritten by the safetensors library itself after change(tensors)."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata={"format": "prime-scale"})
    return f


def _rewrite_header(folder: Path, change) -> Path:
    """model.safetensors with its JSON header edited by change(header), the data bytes kept."""
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return f


def _edit_config(folder: Path, change) -> Path:
    f = folder / "config.json"
    config = json.loads(f.read_text())
    change(config)
    f.write_text(json.dumps(config))
    return f


def _refused(result, *needles):
    rc, _, err = result
    assert rc == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _huge_header(f: Path) -> None:
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 60) + raw[8:])


def _offset_past_end(header: dict) -> None:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4096, end + 4096]


# --------------------------------------------------------------------------- model.safetensors


@pytest.mark.parametrize("fault, needles", [
    (lambda d: _truncate(d / "model.safetensors"), ["truncated"]),
    (lambda d: _huge_header(d / "model.safetensors"), ["header length field says 1152921504606846976 bytes"]),
    (lambda d: _rewrite_header(d, _offset_past_end), ["3.out.weight", "reach past the end of the data area"]),
    (lambda d: _rewrite_header(d, lambda h: h["1.qkv.weight"].update(dtype="F8_E4M3")),
     ["1.qkv.weight", "'F8_E4M3', which prime-scale never writes"]),
    (lambda d: _rewrite_weights(d, lambda t: t.update({"1.fc1.weight": t["1.fc1.weight"].to(torch.int8)})),
     ["tensor 1.fc1.weight is torch.int8 in the file", "torch.float32"]),
    (lambda d: _rewrite_weights(d, lambda t: t.update({"1.lora_a.weight": torch.zeros(4, 64)})),
     ["unknown tensor 1.lora_a.weight"]),
    (lambda d: _rewrite_weights(d, lambda t: t.update({"7.extra": torch.zeros(2)})), ["unknown tensor 7.extra"]),
    (lambda d: _rewrite_weights(d, lambda t: t.pop("2.proj.weight")), ["no tensor 2.proj.weight"]),
    (lambda d: _rewrite_weights(d, lambda t: t["2.fc1.weight"][3, 5].fill_(math.nan)),
     ["tensor 2.fc1.weight holds 1 NaN or infinite values"]),
    (lambda d: _rewrite_weights(d, lambda t: t["0.embed.weight"][0].fill_(math.inf)),
     ["tensor 0.embed.weight holds 32 NaN or infinite values"]),
], ids=["truncated", "huge-header-length", "offsets-past-end", "foreign-dtype", "int8-tensor", "extra-in-layer",
        "extra-layer", "missing-tensor", "nan-weight", "inf-weight"])
def test_eval_refuses_a_damaged_safetensors_file_naming_file_and_tensor(export_copy, cli, fault, needles):
    fault(export_copy)
    err = _refused(cli("eval", export_copy, *EVAL), str(export_copy / "model.safetensors"), *needles)
    assert "prime-scale convert" in err  # what to do: export again


def test_sample_and_init_from_refuse_a_damaged_safetensors_file(export_copy, cli, tmp_path):
    _rewrite_weights(export_copy, lambda t: t["1.qkv.weight"][0, 0].fill_(math.nan))
    _refused(cli("sample", export_copy, "--steps", "2", "--num", "1", "--length", "4"),
             str(export_copy / "model.safetensors"), "tensor 1.qkv.weight holds 1 NaN")
    _truncate(export_copy / "model.safetensors")  # train --init-from: refused before any process starts
    _refused(cli("train", "tiny-cpu", *TINY, f"run.dir={tmp_path / 'new'}", "--init-from", export_copy),
             str(export_copy / "model.safetensors"), "truncated", "prime-scale convert")
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_the_command_line_process_reports_a_bad_file_in_one_line(export_copy):
    _huge_header(export_copy / "model.safetensors")
    proc = run("eval", str(export_copy), *EVAL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{export_copy / 'model.safetensors'}: not a valid safetensors file" in proc.stderr


# --------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("fault, needles", [
    (lambda d: (d / "config.json").write_text('{"format": "prime-scale-consolidated", '), ["not valid JSON"]),
    (lambda d: (d / "config.json").write_bytes(b"\xff\xfe binary"), ["not valid JSON"]),
    (lambda d: (d / "config.json").write_text("[1, 2]"), ["not a JSON object"]),
    (lambda d: _edit_config(d, lambda c: c.update(recipe=["model", "data"])),
     ["key 'recipe' must be an object, got list"]),
    (lambda d: _edit_config(d, lambda c: c["recipe"].update(model=[1])), ["key 'recipe.model' must be an object"]),
    (lambda d: _edit_config(d, lambda c: c.update(vocab_size="4096")), ["key 'vocab_size' must be an integer"]),
    (lambda d: _edit_config(d, lambda c: c.pop("weights")), ["key 'weights' is missing"]),
], ids=["not-json", "not-utf8", "not-object", "recipe-list", "recipe-model-list", "vocab-string", "no-weights"])
def test_eval_and_sample_refuse_a_bad_config_json(export_copy, cli, fault, needles):
    fault(export_copy)
    for command in (["eval", export_copy, *EVAL], ["sample", export_copy, "--steps", "2", "--num", "1"]):
        err = _refused(cli(*command), str(export_copy / "config.json"), *needles)
        assert "prime-scale convert" in err


# --------------------------------------------------------------------------- sharded checkpoint files


def test_eval_refuses_an_old_style_pickle_in_a_sharded_checkpoint(trained, cli, tmp_path):
    """A non-zip torch file (torch.save(..., _use_new_zipfile_serialization=False)) over the optimizer
    state, with the manifest updated to match it: memory-mapped loading cannot read it."""
    from prime_scale.checkpoint import safe_load

    step = tmp_path / "ckpt" / trained[0].name
    shutil.copytree(trained[0], step)
    target = step / OPTIM_FILE
    torch.save(safe_load.load(target), target, _use_new_zipfile_serialization=False)
    manifest = json.loads((step / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == OPTIM_FILE:
            entry["bytes"] = target.stat().st_size
            if "sha256" in entry:  # as if whoever replaced the file re-recorded it
                entry["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (step / "manifest.json").write_text(json.dumps(manifest))
    _refused(cli("eval", step, *EVAL), str(target), "old-style pickle", "step folder")


# --------------------------------------------------------------------------- data the checkpoint names


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve a host name or open a connection is recorded and refused."""
    attempts = []

    def refuse(what):
        def guard(*args, **kwargs):
            attempts.append((what, args[:2]))
            raise OSError(f"network blocked by the test ({what})")
        return guard

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    return attempts


def test_eval_never_fetches_data_a_checkpoint_names(trained, export_copy, cli, no_network, tmp_path):
    config = _edit_config(export_copy, lambda c: c["recipe"]["data"].update(path="sftp://attacker.invalid/x"))
    _refused(cli("eval", export_copy, *EVAL), str(config), "recipe key 'data.path'",
                   "'sftp://attacker.invalid/x'", "nothing was downloaded", "--data")
    assert no_network == []
    _edit_config(export_copy, lambda c: c["recipe"]["data"].update(
        path=None, mixture=[{"path": str(export_copy), "weight": 1.0}, {"path": "s3://bucket/y", "weight": 1.0}]))
    _refused(cli("eval", export_copy, *EVAL), "recipe key 'data.mixture[1].path'", "'s3://bucket/y'", "--data")
    assert no_network == []
    # a sharded checkpoint's recipe (its manifest.json, which records the other files' hashes) alike
    step = tmp_path / "ckpt" / trained[0].name
    shutil.copytree(trained[0], step)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["recipe"]["data"]["path"] = "gs://attacker-bucket/data"
    (step / "manifest.json").write_text(json.dumps(manifest))
    _refused(cli("eval", step, *EVAL), f"{step} (the recipe in its manifest.json)", "'gs://attacker-bucket/data'",
             "nothing was downloaded", "--data")
    assert no_network == []
    # sampling reads no data at all: the same checkpoint samples
    rc, out, err = cli("sample", export_copy, "--steps", "2", "--num", "1", "--length", "4", "--json")
    assert rc == 0, err
    assert len(json.loads(out[out.index("{"):])["samples"]) == 1 and no_network == []


def test_a_remote_data_argument_the_user_gives_is_still_fetched(export_copy, cli, no_network):
    _edit_config(export_copy, lambda c: c["recipe"]["data"].update(path="sftp://attacker.invalid/x"))
    _refused(cli("eval", export_copy, *EVAL, "--data", "sftp://user-chosen.invalid/data"),
             "sftp://user-chosen.invalid/data/manifest.json: download failed")
    assert no_network and all("attacker" not in str(a) for a in no_network)  # tried the user's host only


# --------------------------------------------------------------------------- the checks pass good files


def test_an_untouched_export_and_its_checkpoint_still_evaluate(trained, cli):
    step, export = trained
    results = []
    for ckpt in (export, step):
        rc, out, err = cli("eval", ckpt, *EVAL, "--json", "-")
        assert rc == 0, err
        results.append(json.loads(out[out.index("{"):]))
    assert all(math.isfinite(r["nll_per_token"]) and r["tokens"] == 2 * 128 for r in results)
    assert results[0]["nll_per_token"] == pytest.approx(results[1]["nll_per_token"], abs=1e-6)
