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
    (["tiny-cpu", "parallel.dp=2", "train.global_batch=16", "train.micro_batch=8"], {}, ["parallel.dp=2 is pinned", "world size 1"]),
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


# --------------------------------------------------------------------------- srun without torchrun

SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[01-02]"}


def test_srun_tasks_without_a_rendezvous_are_refused_with_the_launch_line():
    with pytest.raises(UserError) as info:
        read_launch_env(SRUN)
    message = str(info.value)
    assert "task 5 of an srun step of 8 tasks" in message and "MASTER_ADDR" in message
    assert "scontrol show hostnames" in message and "torchrun --nnodes" in message


def test_srun_tasks_with_a_rendezvous_map_slurms_ranks():
    env = read_launch_env({**SRUN, "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port) == ("gpu01", 29500)
    uneven = {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "4,3", "SLURM_STEP_NUM_TASKS": "7", "SLURM_NTASKS": "7",
              "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"}
    assert read_launch_env(uneven).local_world_size == 3


def test_slurm_outside_a_step_and_torchrun_under_srun_keep_their_meaning():
    batch_script = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    assert read_launch_env(batch_script).world_size == 1  # the batch script's own single process
    assert read_launch_env({**SRUN, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}).world_size == 1
    torchrun = {**SRUN, "RANK": "2", "WORLD_SIZE": "16", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "8",
                "MASTER_ADDR": "gpu01", "MASTER_PORT": "29400"}
    env = read_launch_env(torchrun)  # torchrun's variables win over the srun step's
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (2, 16, 2, 8)


# --------------------------------------------------------------------------- the GPU a rank uses


def test_one_visible_gpu_per_process_is_used_whatever_the_local_rank():
    from prime_scale.parallel.state import gpu_index

    assert gpu_index(3, 8) == 3
    assert gpu_index(3, 1) == 0  # srun --gpus-per-task=1: LOCAL_RANK 3 sees one GPU, its own
    with pytest.raises(UserError, match="LOCAL_RANK=3 but this process sees 2 GPU"):
        gpu_index(3, 2)


def test_cuda_device_max_connections_is_set_for_gpu_tensor_parallel_runs_only():
    from prime_scale.parallel.state import tp_overlap_env

    assert tp_overlap_env(2, True, {}) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert tp_overlap_env(1, True, {}) == {}  # no TP all-reduce to overlap: ZeRO's streams keep theirs
    assert tp_overlap_env(2, False, {}) == {}
    assert tp_overlap_env(2, True, {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}) == {}  # the user's own value


def test_destroy_puts_back_the_launcher_variables_init_set(monkeypatch):
    """An in-process model (eval, the lm-eval backend) must not leave its group's port and rank in
    os.environ: processes started afterwards would inherit them and collide on the port."""
    import os

    from prime_scale.config import load_recipe
    from prime_scale.parallel import state

    for key in state.LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # one the user set stays as it was
    state.init(load_recipe("tiny-cpu", ["model.vocab_size=100"]))
    try:
        assert os.environ["MASTER_PORT"] and os.environ["WORLD_SIZE"] == "1"
    finally:
        state.destroy()
    assert not any(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"))
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_every_library_reads_the_one_device_decision():
    """srun --gpus-per-task=1: task 5 (SLURM_LOCALID 1) sees one GPU, cuda:0. DeepSpeed's engine,
    its PipelineModule and its process-group device read LOCAL_RANK: it must name that GPU (0),
    not the node-local rank (1: "invalid device ordinal" in deepspeed.initialize)."""
    import torch

    from prime_scale.parallel.state import library_environment

    env = read_launch_env({**SRUN, "MASTER_ADDR": "gpu01", "MASTER_PORT": "29500"})
    assert env.local_rank == 1
    one_gpu = library_environment(env, torch.device("cuda", 0))
    assert one_gpu["LOCAL_RANK"] == "0" and one_gpu["RANK"] == "5" and one_gpu["WORLD_SIZE"] == "8"
    assert library_environment(env, torch.device("cuda", 1))["LOCAL_RANK"] == "1"  # all GPUs visible
    assert library_environment(env, torch.device("cpu"))["LOCAL_RANK"] == "1"


def test_every_process_group_gets_the_configured_timeout(monkeypatch):
    """DeepSpeed's pipeline grid creates its groups with new_group(ranks) and no timeout: they must
    get the timeout the parallel state was given (NCCL's default would be 10 minutes)."""
    import datetime

    import torch
    import torch.distributed as dist

    from prime_scale.config import load_recipe
    from prime_scale.parallel import state

    for key in state.LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    default_before = dist.distributed_c10d.default_pg_timeout
    par = state.init(load_recipe("tiny-cpu", ["model.vocab_size=100"]), timeout_s=180)
    try:
        from deepspeed.runtime.pipe.topology import PipelineParallelGrid

        grid = PipelineParallelGrid(topology=par.topology)
        groups = [dist.group.WORLD, grid.get_pipe_parallel_group(), grid.get_data_parallel_group(),
                  grid.get_slice_parallel_group(), par.tp_group, par.dp_group, dist.new_group([0])]
        timeouts = {g._get_backend(torch.device("cpu")).options._timeout for g in groups}
        assert timeouts == {datetime.timedelta(minutes=3)}
    finally:
        state.destroy()
    assert dist.distributed_c10d.default_pg_timeout == default_before  # put back for later groups
