"""Checkpoint building blocks without engines: discovery of complete checkpoints, retention, the
streaming safetensors writer, megatron TP partitioning, RNG capture, weights-only checks."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from prime_scale.checkpoint import catalog as mf
from prime_scale.checkpoint import rng
from prime_scale.export import shards
from prime_scale.export.safetensors_stream import StreamWriter
from prime_scale.checkpoint.layout import TopologyChanged, check_layout
from prime_scale.checkpoint.store import _weights_only_problem
from prime_scale.data.tokenizer import tokenizer_identity
from prime_scale.model import naming
from prime_scale import fsio
from prime_scale.errors import UserError


def _checkpoint(root, step, files=None, manifest=True, tmp=None):
    """A checkpoint-shaped folder with the given files; the manifest lists them as written."""
    folder = root / (f"step_{step}" if tmp is None else f"step_{step}.tmp-{tmp}")
    folder.mkdir(parents=True)
    for rel, data in (files or {"mp_rank_00_model_states.pt": b"x" * 10}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    if manifest:
        m = {"format": mf.FORMAT, "version": mf.VERSION, "step": step, "files": mf.list_files(folder)}
        (folder / mf.MANIFEST).write_text(json.dumps(m))
    return folder


def test_only_complete_checkpoints_are_found(tmp_path):
    _checkpoint(tmp_path, 3)
    _checkpoint(tmp_path, 5, manifest=False)  # a save that never finished
    truncated = _checkpoint(tmp_path, 4, {"a.pt": b"12345678", "extra/rank_00000.pt": b"abc"})
    (truncated / "a.pt").write_bytes(b"1234")  # truncated after the manifest was written
    missing = _checkpoint(tmp_path, 6, {"a.pt": b"1", "b.pt": b"2"})
    (missing / "b.pt").unlink()
    _checkpoint(tmp_path, 10, tmp="abc")  # unpublished, even with its manifest
    (tmp_path / "latest").write_text("step_5")  # the pointer is a hint, never trusted
    assert mf.find_latest_complete(tmp_path) == tmp_path / "step_3"
    assert [s for s, _ in mf.list_complete(tmp_path)] == [3]
    with pytest.raises(mf.IncompleteCheckpoint, match="no manifest.json"):
        mf.read_manifest(tmp_path / "step_5")
    with pytest.raises(mf.IncompleteCheckpoint, match="a.pt has 4 bytes, the manifest says 8"):
        mf.read_manifest(tmp_path / "step_4")
    with pytest.raises(mf.IncompleteCheckpoint, match="b.pt listed in the manifest is missing"):
        mf.read_manifest(tmp_path / "step_6")
    (tmp_path / "step_7").mkdir()
    (tmp_path / "step_7" / mf.MANIFEST).write_text('{"format": "prime-scale-checkpoint", "vers')
    with pytest.raises(mf.IncompleteCheckpoint, match="unreadable manifest"):
        mf.read_manifest(tmp_path / "step_7")
    assert mf.find_latest_complete(tmp_path / "nothing") is None


def test_newest_step_wins_over_a_stale_latest_pointer(tmp_path):
    # a crash between publishing step_20 and updating `latest` must not hide step_20
    _checkpoint(tmp_path, 9)
    _checkpoint(tmp_path, 20)
    (tmp_path / "latest").write_text("step_9")
    assert mf.find_latest_complete(tmp_path) == tmp_path / "step_20"


def test_retention_keeps_newest_complete_and_leaves_others(tmp_path):
    for s in (1, 2, 3, 4):
        _checkpoint(tmp_path, s)
    _checkpoint(tmp_path, 5, manifest=False)
    assert mf.apply_retention(tmp_path, 2) == ["step_1", "step_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3", "step_4", "step_5"]
    with pytest.raises(ValueError):
        mf.apply_retention(tmp_path, 0)


def test_stale_leftovers_are_removed(tmp_path):
    _checkpoint(tmp_path, 1)
    _checkpoint(tmp_path, 2, tmp="dead")
    (tmp_path / "step_0.trash-17").mkdir()
    assert sorted(mf.remove_stale(tmp_path)) == ["step_0.trash-17", "step_2.tmp-dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]


def test_resolve_checkpoint_accepts_folder_dir_and_run_dir(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints", 7)
    _checkpoint(run / "checkpoints", 8, manifest=False)
    assert mf.resolve_checkpoint(run) == run / "checkpoints" / "step_7"
    assert mf.resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_7"
    assert mf.resolve_checkpoint(run / "checkpoints" / "step_7") == run / "checkpoints" / "step_7"
    with pytest.raises(UserError, match="save that wrote this folder did not finish"):
        mf.resolve_checkpoint(run / "checkpoints" / "step_8")
    empty = tmp_path / "empty"
    _checkpoint(empty, 1, manifest=False)
    with pytest.raises(UserError, match=r"no complete checkpoint found \(incomplete folders only: step_1\)"):
        mf.resolve_checkpoint(empty)


def test_write_atomic_replaces_whole_content(tmp_path):
    f = tmp_path / "latest"
    fsio.write_atomic(f, "step_1")
    fsio.write_atomic(f, "step_22")
    assert f.read_text() == "step_22"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def _megatron_split(full, dim, rank, world, stride):
    # megatron-core's _initialize_affine_weight_cpu, written out: chunks of size/(world*stride),
    # rank r keeps chunks r, r+world, ...
    per = full.shape[dim] // (world * stride)
    chunks = torch.split(full, per, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


@pytest.mark.parametrize("world,stride,dim", [(1, 1, 0), (2, 1, 0), (2, 1, 1), (4, 1, 1), (2, 3, 0), (4, 2, 1)])
def test_tp_split_and_join_follow_megatron(world, stride, dim):
    full = torch.randn(24, 48)
    pieces = [shards.split(full, dim, r, world, stride) for r in range(world)]
    for r, p in enumerate(pieces):
        assert torch.equal(p, _megatron_split(full, dim, r, world, stride))
    assert torch.equal(shards.join(pieces, dim, stride), full)
    assert shards.join([full], None) is full
    with pytest.raises(ValueError, match="not divisible"):
        shards.ranges(10, 0, 4, 1)


def test_partition_info_reads_megatron_attributes():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    assert naming.partition_info(p) == (None, 1)
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 1, 2
    assert naming.partition_info(p) == (1, 2)
    p.tensor_model_parallel = False
    assert naming.partition_info(p) == (None, 1)


def test_stream_writer_round_trips_through_safetensors(tmp_path):
    tensors = {
        "w": torch.randn(5, 7), "b16": torch.randn(3, 4).to(torch.bfloat16), "ids": torch.arange(6).view(2, 3),
        "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6).t(),  # non-contiguous input
    }
    path = tmp_path / "m.safetensors"
    with StreamWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], {"step": 3}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"step": "3"}
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k


def test_stream_writer_refuses_out_of_plan_tensors(tmp_path):
    entries = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match="expected a"):
        with StreamWriter(tmp_path / "x.safetensors", entries) as w:
            w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected b torch.float32 \[3\]"):
        with StreamWriter(tmp_path / "y.safetensors", entries) as w:
            w.write("a", torch.zeros(2))
            w.write("b", torch.zeros(4))
    w = StreamWriter(tmp_path / "z.safetensors", entries)
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="only 1 of 2 tensors written"):
        w.close()


def test_rng_capture_restores_every_stream_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.randn()  # leave a cached gaussian in NumPy's state
    state = rng.capture()
    torch.save(state, tmp_path / "rng.pt")
    draws = (torch.rand(3), random.random(), np.random.randn(2))
    rng.restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.randn(2))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and np.array_equal(draws[2], again[2])


def test_extra_state_must_be_weights_only_loadable():
    assert _weights_only_problem({"loader": {"epoch": 1, "ids": torch.arange(3)}, "name": "x"}) is None
    problem = _weights_only_problem({"loader": np.arange(3)})
    assert problem is not None and "numpy" in problem


def test_tokenizer_identity_changes_with_content(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "spm.model").write_bytes(b"abc")
    a = tokenizer_identity(tmp_path / "t")
    (tmp_path / "t" / "spm.model").write_bytes(b"abd")
    b = tokenizer_identity(tmp_path / "t")
    assert a["files"] == ["spm.model"] and a["sha256"] != b["sha256"]
    assert tokenizer_identity(tmp_path / "t" / "spm.model")["sha256"] == b["sha256"]  # file or its folder
    (tmp_path / "t" / "spm.model").rename(tmp_path / "t" / "other.model")
    assert tokenizer_identity(tmp_path / "t")["sha256"] != b["sha256"]  # names count too
    with pytest.raises(UserError, match="no such file"):
        tokenizer_identity(tmp_path / "missing")


def test_deepspeeds_loader_refuses_a_changed_layout_and_names_the_resharding_resume(tmp_path):
    saved = {"layout": {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 1, "precision": "fp32"}}
    check_layout(saved, dict(saved["layout"], world_size=2, pipeline=False), tmp_path)  # same: fine
    for change in ({"tp": 1, "dp": 2}, {"zero_stage": 2}, {"precision": "bf16"}):
        with pytest.raises(TopologyChanged) as e:
            check_layout(saved, dict(saved["layout"], **change), tmp_path)
        assert "was written with tp=2 pp=1 dp=1 zero_stage=1 precision=fp32" in str(e.value)
        assert f"prime-scale train --resume {tmp_path}" in str(e.value)


def test_resume_plan_says_what_is_resharded_and_what_is_not_continued(tmp_path):
    from prime_scale.export.elastic import resume_plan

    dp1 = {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0, "precision": "fp32", "pipeline": False}
    dp2 = dict(dp1, dp=2, zero_stage=1)
    lines = resume_plan(dp1, dp2, 0.0, tmp_path)
    assert lines[0].startswith("resuming under another layout (dp 1 -> 2, zero_stage 0 -> 1): resharding the fp32 "
                               "master weights, Adam moments, EMA, LR schedule")
    assert "nothing in training draws from them" in lines[-1]
    lines = resume_plan(dp1, dict(dp2, precision="bf16"), 0.1, tmp_path)
    assert any("precision fp32 -> bf16" in line for line in lines)
    assert any("not continued: the RNG streams (model.dropout=0.1)" in line for line in lines)
    assert resume_plan(dict(dp1, pp=2, pipeline=True, precision="bf16"), dp1, 0.0, tmp_path)  # bf16 pipeline: fine
    for source, target, why in ((dp1, dict(dp2, zero_stage=3), "ZeRO 3"), (dict(dp1, zero_stage=3), dp2, "ZeRO 3"),
                                (dict(dp1, precision="bf16"), dp2, "bf16 under ZeRO 0 without a pipeline")):
        with pytest.raises(TopologyChanged) as e:
            resume_plan(source, target, 0.0, tmp_path)
        assert str(tmp_path) in str(e.value) and why in str(e.value)
        assert f"prime-scale convert {tmp_path}" in str(e.value) and "--init-from" in str(e.value)


def test_a_tensor_parallel_piece_taken_from_the_full_tensor_is_the_split_one_padded():
    import torch

    full = torch.arange(4 * 6, dtype=torch.float32).view(4, 6)
    for dim, stride in ((0, 1), (1, 1), (1, 3)):
        for rank in range(2):
            assert torch.equal(shards.take(full, list(full.shape), dim, rank, 2, stride),
                               shards.split(full, dim, rank, 2, stride))
    # 4 rows over TP 3 with 2 per rank: the model pads to 6; the rows past the end are zeros
    pieces = [shards.take(full, [4, 6], 0, rank, 3, local_size=2) for rank in range(3)]
    assert torch.equal(torch.cat(pieces)[:4], full) and not torch.cat(pieces)[4:].any()
    assert torch.equal(shards.take(full, [4, 6], None, 1, 2), full)
    with pytest.raises(ValueError):
        shards.take(full, [4, 6], 0, 0, 2, local_size=1)  # 2 × 1 rows cannot hold 4


# --------------------------------------------------------------------------- CUDA RNG with fewer visible GPUs


def test_cuda_rng_restore_with_fewer_visible_devices_takes_the_stream_the_rank_drew_on():
    from prime_scale.checkpoint.rng import cuda_restore_plan

    assert cuda_restore_plan(2, 8, 0, 0) == ([(0, 0), (1, 1)], [])  # every saved device visible: all
    # 8 saved (8 visible GPUs, this rank computed on cuda:3), 1 visible now (--gpus-per-task=1)
    assert cuda_restore_plan(8, 1, 3, 0) == ([(3, 0)], [0, 1, 2, 4, 5, 6, 7])
    # an older checkpoint without the device index: the rank's LOCAL_RANK chose it
    assert cuda_restore_plan(8, 1, None, 0, local_rank=5) == ([(5, 0)], [0, 1, 2, 3, 4, 6, 7])
    assert cuda_restore_plan(8, 2, None, 1, local_rank=None) == ([(0, 1)], list(range(1, 8)))


def test_rng_restore_of_a_state_with_more_cuda_states_than_devices_does_not_fail():
    import torch

    from prime_scale.checkpoint import rng

    state = rng.capture()
    one = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()
    state["torch_cuda"] = [one.clone() for _ in range(torch.cuda.device_count() + 4)]
    state["torch_cuda_device"] = 2
    if torch.cuda.is_available():
        with pytest.warns(UserWarning, match="not restored: saved devices"):
            rng.restore(state)
    else:
        rng.restore(state)


def test_streams_reseeded_after_a_layout_change_depend_on_the_step():
    """A resharded resume draws fresh dropout streams: seeded from (seed, step), so the masks of the
    run's first steps are not drawn again, and the same resume draws the same ones."""
    import types

    import torch

    from prime_scale.export.elastic import seed_streams
    from prime_scale.parallel.state import seed_everything

    par = types.SimpleNamespace(tp_rank=0, pp_rank=0, dp_rank=0)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(7, par)
        start = torch.rand(8)
        seed_streams(7, 200, par)
        resumed = torch.rand(8)
        seed_streams(7, 200, par)
        again = torch.rand(8)
        seed_streams(7, 201, par)
        later = torch.rand(8)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    assert torch.equal(resumed, again)
    assert not torch.equal(resumed, start) and not torch.equal(resumed, later)
