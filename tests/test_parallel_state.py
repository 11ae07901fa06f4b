"""Bad launcher input and impossible topologies give clear errors before any model is built."""

from __future__ import annotations

import pytest

from prime_scale.cli import main as cli_main
from prime_scale.errors import UserError
from prime_scale.parallel.state import read_launch_env, threads_per_rank

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_no_launcher_means_one_process():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert 0 < env.master_port < 65536


def test_torchrun_and_deepspeed_launcher_variables():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    env = read_launch_env(torchrun)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    deepspeed = {**torchrun, "LOCAL_SIZE": "2"}
    del deepspeed["LOCAL_WORLD_SIZE"]
    assert read_launch_env(deepspeed).local_world_size == 2


@pytest.mark.parametrize("environ,words", [
    ({"RANK": "0"}, ["WORLD_SIZE", "LOCAL_RANK", "not set"]),
    ({"RANK": "two", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["RANK='two'", "not an integer"]),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, ["MASTER_ADDR"]),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, ["WORLD_SIZE=0"]),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2",
      "MASTER_ADDR": "x", "MASTER_PORT": "1"}, ["LOCAL_RANK=3", "local world size 2"]),
])
def test_bad_launcher_environment_is_named(environ, words):
    with pytest.raises(UserError) as info:
        read_launch_env(environ)
    for word in words:
        assert word in str(info.value)
    assert "torchrun" in str(info.value) or "WORLD_SIZE=0" in str(info.value)


def test_threads_split_the_cores_unless_the_user_chose():
    assert threads_per_rank(2, {"OMP_NUM_THREADS": "3"}) == 3
    import os

    cores = len(os.sched_getaffinity(0))
    assert threads_per_rank(1, {}) == cores
    assert threads_per_rank(cores * 2, {}) == 1  # never zero


def _train(monkeypatch, capsys, argv, environ):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    code = cli_main(["train", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,environ,words", [
    (["tiny-cpu", "parallel.tp=2"], {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                     "MASTER_PORT": "29999"}, ["world size 3", "tp × parallel.pp", "multiple of 2"]),
    (["tiny-cpu", "parallel.dp=2", "train.micro_batch=8"], {}, ["parallel.dp=2 is pinned", "world size 1"]),
    (["tiny-cpu", "train.global_batch=16", "train.micro_batch=8", "parallel.dp=0"],
     {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"},
     ["train.global_batch=16", "micro_batch × dp", "8 × 4"]),
    (["tiny-cpu", "parallel.pp=2", "parallel.zero_stage=2"], {}, ["parallel.zero_stage", "pipeline", "ZeRO stage 0 or 1"]),
    (["tiny-cpu"], {"RANK": "0"}, ["WORLD_SIZE", "not set"]),
    (["--nproc", "3", "tiny-cpu", "parallel.tp=2"], {}, ["world size 3", "multiple of 2"]),
    (["--nproc", "0", "tiny-cpu"], {}, ["--nproc must be at least 1"]),
])
def test_train_refuses_bad_layouts_and_launchers_before_building_anything(monkeypatch, capsys, argv, environ, words):
    code, err = _train(monkeypatch, capsys, argv, environ)
    assert code == 2, err
    assert err.startswith("prime-scale train: error:"), err
    for word in words:
        assert word in err, (word, err)
    assert "Traceback" not in err
