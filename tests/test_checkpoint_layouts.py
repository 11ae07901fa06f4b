"""Checkpoints of every layout, with real DeepSpeed engines and megatron-core TP layers (4 gloo processes):
exact resume into a fresh engine, streaming consolidation equal to the live (master) weights gathered
independently, EMA consolidation, and resharding a consolidated checkpoint into other layouts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from prime_scale import cli
from prime_scale.checkpoint import catalog as mf
from harness.checkpoints import V, launch, load_refs

LAYOUTS = [
    {"name": "tp2_z0", "tp": 2, "zero": 0, "ema": True},                    # module files, fp32
    {"name": "tp2_z2_bf16", "tp": 2, "zero": 2, "precision": "bf16", "ema": True},
    {"name": "tp2_z3", "tp": 2, "zero": 3, "ema": True},                    # per-parameter ZeRO-3 partitions
    {"name": "dp4_z0_bf16", "tp": 1, "zero": 0, "precision": "bf16"},      # DeepSpeed's bf16 optimizer
    {"name": "pp2_tp2_z1", "tp": 2, "pp": 2, "zero": 1, "ema": True},      # pipeline engine, TP inside
    {"name": "pp2_dp2_z0", "tp": 1, "pp": 2, "zero": 0},                   # pipeline per-layer files
]
RESHARD = [
    {"name": "rs_pp_to_tp1", "from": "pp2_tp2_z1", "target": {"tp": 1, "zero": 1}},
    {"name": "rs_z3_to_tp4", "from": "tp2_z3", "target": {"tp": 4, "zero": 0}},
    {"name": "rs_bf16_to_pp_tp2", "from": "tp2_z2_bf16", "target": {"tp": 2, "pp": 2, "zero": 1}},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("layouts")
    results = launch(4, {"layouts": LAYOUTS, "reshard": RESHARD}, work)
    return work, results


def test_resume_into_fresh_engine_is_exact(runs):
    _, results = runs
    for lay in LAYOUTS:
        r = results[lay["name"]]
        assert r["fresh_eval"] != r["eval"], lay  # the fresh engine really started elsewhere
        assert r["resumed_eval"] == r["eval"], lay
        assert r["resumed"] == r["after"], lay  # same next-step loss: optimizer, LR, data, RNG restored


def test_same_batches_same_losses_across_fp32_layouts(runs):
    # harness sanity: every layout starts from the same weights and sees the same global batches
    # (Adam's first steps amplify summation-order differences between layouts a little)
    _, results = runs
    evals = [results[lay["name"]]["eval"] for lay in LAYOUTS if lay.get("precision", "fp32") == "fp32"]
    assert max(evals) - min(evals) < 1e-4


def test_manifest_records_layout_and_partitions(runs):
    work, _ = runs
    m = mf.read_manifest(work / "pp2_tp2_z1" / "ckpt" / "step_2")
    assert m["layout"] == {"world_size": 4, "tp": 2, "pp": 2, "dp": 1, "zero_stage": 1, "precision": "fp32",
                           "pipeline": True}
    assert sorted((s["tp"], s["pp"]) for s in m["shards"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    dims = {e["local"]: e["partition_dim"] for s in m["shards"] for e in s["params"]}
    assert dims["0.emb.weight"] == 0 and dims["1.fc1.weight"] == 0 and dims["1.fc2.weight"] == 1
    assert dims["1.fc2.bias"] is None and dims["1.ln.weight"] is None
    padded_rows = {e["local"]: e.get("unpadded_size") for s in m["shards"] for e in s["params"]}
    assert padded_rows["0.emb.weight"] == V and padded_rows["3.out.weight"] == V and padded_rows["1.fc1.weight"] is None
    assert m["step"] == 2 and m["vocab_size"] == V and m["ema"] == "split"
    z3 = mf.read_manifest(work / "tp2_z3" / "ckpt" / "step_2")
    assert z3["ema"] == "per_rank" and len([f for f in z3["files"] if f["path"].startswith("ema/")]) == 4
    assert (work / "pp2_tp2_z1" / "ckpt" / "latest").read_text() == "step_2"
    sizes = {f["path"]: f["bytes"] for f in m["files"]}
    assert "extra/rank_00003.pt" in sizes and "ema/tp01_pp01_dp000.safetensors" in sizes
    # under DP 2 both data-parallel ranks of each shard write a share of its EMA
    z0 = mf.read_manifest(work / "tp2_z0" / "ckpt" / "step_2")
    assert sorted(f["path"] for f in z0["files"] if f["path"].startswith("ema/")) == [
        f"ema/tp{t:02d}_pp00_dp{d:03d}.safetensors" for t in (0, 1) for d in (0, 1)]


def _read_all(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("lay", LAYOUTS, ids=[lay["name"] for lay in LAYOUTS])
def test_convert_equals_gathered_master_weights(runs, tmp_path, lay):
    work, _ = runs
    out = tmp_path / "out"
    assert cli.main(["convert", str(work / lay["name"] / "ckpt"), "--out", str(out), "--weights", "raw"]) == 0
    got, meta = _read_all(out / "model.safetensors")
    want = load_refs(work / lay["name"] / "ref")
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], t), name
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == V and config["ell"] == 2 and config["base"] == math.isqrt(V - 1) + 1
    assert config["weights"] == "raw" and meta["step"] == "2"
    assert config["params"]["1.fc2.weight"]["partition_dim"] == 1


@pytest.mark.parametrize("lay", [x for x in LAYOUTS if x.get("ema")], ids=lambda x: x["name"])
def test_convert_ema_weights(runs, tmp_path, lay):
    work, _ = runs
    out = tmp_path / "ema"
    assert cli.main(["convert", str(work / lay["name"] / "ckpt" / "step_2"), "--out", str(out),
                     "--weights", "ema", "--dtype", "bf16"]) == 0
    got, _ = _read_all(out / "model.safetensors")
    want = load_refs(work / lay["name"] / "ema_ref")
    raw = load_refs(work / lay["name"] / "ref")
    for name, t in want.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], t.to(torch.bfloat16)), name
    assert any(not torch.equal(want[n], raw[n]) for n in want)  # EMA is not the raw weights


def test_reshard_into_other_layouts(runs):
    _, results = runs
    for rs in RESHARD:
        assert results[rs["name"]]["mismatch"] == [], rs
    # fp32 sources: the resharded model computes the source's loss
    assert abs(results["rs_pp_to_tp1"]["eval"] - results["pp2_tp2_z1"]["eval"]) < 1e-5
    assert abs(results["rs_z3_to_tp4"]["eval"] - results["tp2_z3"]["eval"]) < 1e-5


def test_convert_refuses_bad_input(runs, tmp_path, capsys):
    work, _ = runs
    src = work / "tp2_z0" / "ckpt"
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "x"), "--weights", "ema"]) == 0
    # the output exists now: refuse to overwrite
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "x")]) == 2
    assert "already exists" in capsys.readouterr().err
    # no EMA in this checkpoint
    assert cli.main(["convert", str(work / "dp4_z0_bf16" / "ckpt"), "--out", str(tmp_path / "y"),
                     "--weights", "ema"]) == 2
    assert "no EMA" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert cli.main(["convert", str(tmp_path / "nothing"), "--out", str(tmp_path / "z")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
