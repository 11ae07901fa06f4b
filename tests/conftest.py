"""Tests never read or write the repository's working tree (runs/, data/): the demo corpus lives in
one temporary directory for the whole session (built at most once), and every test runs in a
temporary working directory of its own, so relative run directories land there."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _demo_and_cache_outside_the_repository(tmp_path_factory):
    os.environ["PRIME_SCALE_DEMO_DIR"] = str(tmp_path_factory.mktemp("demo"))  # subprocesses inherit it
    # downloads and the stamps of verified shards: never the user's own ~/.cache
    os.environ["PRIME_SCALE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def single_process():
    """One-process parallel state in this process (world 1: gloo on the CPU, NCCL on a GPU, megatron's
    RNG tracker seeded), torn down and the launcher environment restored after the module."""
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    from prime_scale.config import load_recipe
    from prime_scale.parallel import state

    state.init(load_recipe("tiny-cpu", ["model.vocab_size=100"]))
    yield state.get_state()
    state.destroy()
    os.environ.clear()
    os.environ.update(saved)



@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """(run directory, consolidated EMA export) of one tiny 10-step run (tests/harness/tiny_run.py),
    trained once per session for every module that only needs a trained checkpoint."""
    from harness.tiny_run import train_and_convert

    return train_and_convert(tmp_path_factory.mktemp("tiny-trained"))
