"""mosaicml-streaming on this machine: the torchvision shim, and cleanup after a crashed user."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np

from prime_scale.data.shm import SHM_NAME as STREAMING_SHM, clean_stale, stale_streaming_files
from prime_scale.data.streaming_compat import import_streaming


def streaming_segments():
    return {name for name in os.listdir("/dev/shm") if STREAMING_SHM.match(name)}


def run_py(code, env=None, **kw):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_streaming_imports_with_standin_only_when_torchvision_is_broken():
    real = run_py("import torchvision")
    p = run_py("""
        import importlib.util, sys
        from prime_scale.data.streaming_compat import import_streaming, torchvision_is_standin
        s = import_streaming()
        from streaming import MDSWriter, StreamingDataset
        print(s.__version__, torchvision_is_standin(), importlib.util.find_spec("torchvision") is not None)
    """)
    out, err = p.communicate(timeout=120)
    real.communicate(timeout=120)
    assert p.returncode == 0, err
    version, standin, findable = out.split()
    assert version.startswith("0.13") and findable == "True"
    assert standin == str(real.returncode != 0)  # the stand-in exactly when the real import fails


def test_clean_shm_removes_only_what_a_killed_streaming_job_left(tmp_path):
    import_streaming()
    from streaming import MDSWriter

    with MDSWriter(columns={"tokens": "ndarray:uint16:8"}, out=str(tmp_path / "ds")) as w:
        for i in range(64):
            w.write({"tokens": np.full(8, i, dtype=np.uint16)})
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    before = streaming_segments()
    job = run_py(f"""
        import time
        from prime_scale.data.streaming_compat import import_streaming
        import_streaming()
        from streaming import StreamingDataset
        ds = StreamingDataset(local={str(tmp_path / 'ds')!r}, batch_size=4)
        next(iter(ds))
        print("ready", flush=True)
        time.sleep(120)
    """, env={"TMPDIR": str(tmp)}, start_new_session=True)
    try:
        assert job.stdout.readline().strip() == "ready", job.stderr.read()
        left = streaming_segments() - before
        assert left, "a live StreamingDataset holds shared memory"
        # while the job lives, nothing of it is stale
        assert not [p for p in stale_streaming_files(tmp_dir=tmp) if p.name in left or p.parent == tmp]
        # a crash of the whole job (OOM killer, a launcher killing its process group) also takes down
        # Python's resource tracker, which would otherwise unlink the segments
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert left <= streaming_segments()  # kill -9 of the job: the segments stay behind
    assert os.listdir(tmp)  # and so do its lock files
    assert left <= {p.name for p in clean_stale(dry_run=True, tmp_dir=tmp)}
    assert left <= streaming_segments()  # a dry run removes nothing
    removed = clean_stale(tmp_dir=tmp)
    assert left <= {p.name for p in removed}
    assert not left & streaming_segments()
    assert os.listdir(tmp) == []


def test_clean_shm_command_dry_run(capsys):
    from prime_scale.cli import main as cli

    assert cli(["prep", "clean-shm", "--dry-run"]) == 0
    assert "clean-shm: would remove" in capsys.readouterr().err
