"""What each launcher does with a stop signal, read from its environment and command line, and the
start-up warnings when a preemption's checkpoint could not be written in time (the launchers'
behaviour itself: tests/test_faults_checkpoint.py runs torchrun as docs/training.md gives it)."""

from __future__ import annotations

from prime_scale.parallel.preemption import (TORCHRUN_PREEMPTION_FLAGS, preemption_warnings, stop_grace)

TORCHRUN = ["/usr/bin/python3", "/usr/local/bin/torchrun", "--nproc-per-node", "8", "-m", "prime_scale.cli.train"]


def test_torchrun_defaults_forward_no_sigusr1_and_give_30_seconds():
    grace = stop_grace({}, TORCHRUN, own_launcher=False)
    assert grace.launcher == "torchrun" and grace.grace_s == 30 and "SIGUSR1" not in grace.forwarded
    lines = preemption_warnings(grace, save_s=95.0, slurm=True)
    assert len(lines) == 2
    assert "does not forward SIGUSR1" in lines[0] and "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in lines[0]
    assert "95 s" in lines[1] and "--shutdown-timeout 190" in lines[1]
    assert preemption_warnings(grace, save_s=5.0, slurm=False) == []  # no SLURM: SIGUSR1 is the user's own
    measured = preemption_warnings(grace, save_s=41.0, slurm=False, measured=True)  # after the first save
    assert len(measured) == 1 and "took 41 s" in measured[0] and "--shutdown-timeout 82" in measured[0]


def test_the_documented_torchrun_line_and_its_environment_variables_are_read():
    argv = TORCHRUN[:2] + list(TORCHRUN_PREEMPTION_FLAGS) + TORCHRUN[2:]
    grace = stop_grace({}, argv, own_launcher=False)
    assert "SIGUSR1" in grace.forwarded and grace.grace_s == 600
    assert preemption_warnings(grace, save_s=95.0, slurm=True) == []
    # the agent exports its final signal list to the workers; PET_ variables stand for the flags
    env = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGUSR1", "PET_SHUTDOWN_TIMEOUT": "300"}
    grace = stop_grace(env, ["python", "-m", "torch.distributed.run", "--shutdown_timeout=120"], own_launcher=False)
    assert grace.forwarded == {"SIGTERM", "SIGUSR1"} and grace.grace_s == 120  # the flag wins over PET_


def test_other_launchers():
    ds = stop_grace({}, ["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"], own_launcher=False)
    assert ds.grace_s == 30 and "SIGUSR1" not in ds.forwarded
    assert "train.max_minutes" in preemption_warnings(ds, save_s=40.0, slurm=False)[0]
    srun = stop_grace({"SLURM_JOB_ID": "7"}, ["slurmstepd: [7.0]"], own_launcher=False)
    assert srun.launcher == "srun" and "#SBATCH --signal=USR1@" in preemption_warnings(srun, 40.0, slurm=True)[0]
    ours = stop_grace({"SLURM_JOB_ID": "7"}, ["python", "-m", "prime_scale.cli", "train"], own_launcher=True)
    assert ours.grace_s is None and preemption_warnings(ours, save_s=1e4, slurm=True) == []
