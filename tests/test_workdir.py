"""The run folder and the disk: one writer per workdir, a full disk in one line, a failed start
leaves no trace, and a step that cannot fit the devices is refused before anything is allocated."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from conftest import child_env, tiny_train_args
from test_checkpoint import train_losses
from test_train import tiny_config
from train.cli import train_main
from train.errors import WorkdirError
from train.services.workdir import LOCK_FILE, RunFolder

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env():
    return child_env(PYTHONUNBUFFERED="1")


def hold_lock(workdir):
    """A separate process holding the workdir as a running trainer would (prints 'held')."""
    code = "import sys, time; from train.services.workdir import RunFolder; RunFolder(sys.argv[1]).open(); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_held_workdir_is_refused_and_a_killed_holder_never_blocks(tmp_path, capsys):
    work = tmp_path / "w"
    (work / "checkpoints").mkdir(parents=True)
    (work / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
    holder = hold_lock(work)
    try:
        with pytest.raises(SystemExit) as exc:
            train_main(tiny_train_args(tmp_path, work, steps=2))
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1, err
        assert f"--workdir={work}: in use by another run (host {socket.gethostname()}, PID {holder.pid}, since" in err
        assert (work / "metrics.jsonl").read_text() == '{"step": 1, "split": "train", "loss": 2.0}\n'  # untouched
        assert sorted(p.name for p in work.iterdir()) == [LOCK_FILE, "checkpoints", "metrics.jsonl"]
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
    RunFolder(work).open().release()  # a stale lock file never blocks a restart


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    first = RunFolder(tmp_path / "w").open()
    with pytest.raises(WorkdirError, match=f"PID {os.getpid()}"):
        RunFolder(tmp_path / "w").open()
    first.release()
    RunFolder(tmp_path / "w").open().release()


def test_a_failed_start_leaves_an_existing_workdir_as_it_was(tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    args = tiny_train_args(tmp_path, work, steps=2) + [f"--config.data.path={tmp_path / 'missing'}"]
    with pytest.raises(SystemExit) as exc:
        train_main(args)
    assert exc.value.code == 2 and "data.path=" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- a full disk
FULL_DISK = """
import errno, sys
import orbax.checkpoint as ocp

original = ocp.JsonCheckpointHandler._save_fn


async def full_disk(self, item, directory):  # the writes of checkpoint 4 and later fail: the disk is full
    step = int(str(directory).split("/checkpoints/")[1].split("/")[0].split(".")[0])
    if step >= 4:
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, item, directory)


ocp.JsonCheckpointHandler._save_fn = full_disk
from train.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_full_disk_during_an_asynchronous_save_ends_in_one_line_and_the_rerun_resumes(tmp_path):
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    args = tiny_train_args(tmp_path, tmp_path / "w", steps=8)
    full = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr and not any(line.startswith("ERROR") for line in lines), full.stderr[-3000:]
    assert lines[-1] == (
        f"moe-train: checkpoint 4: saving to {tmp_path / 'w' / 'checkpoints' / '4'} failed: no space left on the "
        "device (or over the disk quota); checkpoint 2 is intact. Free space (or fix the folder), then run the same "
        "command to resume"
    ), full.stderr[-3000:]
    assert len(lines) <= 12  # the run's own lines; none from the saving threads
    rerun = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0 and f"resumed from {tmp_path / 'w' / 'checkpoints' / '2'}" in rerun.stderr
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "train", *tiny_train_args(tmp_path, straight, steps=8)], cwd=ROOT, env=_env(),
                   check=True, capture_output=True, timeout=300)
    assert train_losses(tmp_path / "w") == train_losses(straight)  # nothing lost, bit for bit


def test_a_save_that_cannot_fit_the_free_space_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil

    import jax.numpy as jnp

    from train.core.checkpoint import Checkpoints
    from train.errors import CheckpointError

    ckpt = Checkpoints(tmp_path / "checkpoints")
    state = {"params": {"w": jnp.zeros((256, 256))}}  # 256 KiB

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 1000, 1000))
    with pytest.raises(CheckpointError) as err:
        ckpt._check_space(6, state)
    assert str(err.value) == (
        f"checkpoint 6: saving to {tmp_path / 'checkpoints' / '6'} failed: it needs about 282 KiB and 1 KiB are free on "
        "that disk; no earlier checkpoint exists. Free space (or fix the folder), then run the same command to resume"
    )
    ckpt.close()


# ---------------------------------------------------------------- the memory pre-flight
def test_the_memory_estimate_tracks_what_xla_allocates(tmp_path):
    from train.core.setup import setup

    for batch in (8, 32):
        cfg = tiny_config(tmp_path)
        cfg.train.batch_size = batch
        run, state = setup(cfg, tmp_path / f"b{batch}")
        with run.context():
            local = next(run.batches)
            batch_arrays = run.global_batch(local)
            analysis = run.programs.train_step.lower(state, batch_arrays, run.programs.stop[0]).compile().memory_analysis()
        run.close()
        xla = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
        assert 0.6 <= run.step_memory.total / xla <= 1.5, (batch, run.step_memory, xla)


def test_a_step_that_cannot_fit_names_the_largest_term_and_can_be_overridden(tmp_path, monkeypatch, capsys):
    from train.services import memory

    monkeypatch.setattr(memory, "_host_available_bytes", lambda: 2 << 20)  # 2 MiB for 8 devices: 256 KiB each
    args = tiny_train_args(tmp_path, tmp_path / "w", steps=1) + ["--config.train.batch_size=128"]
    with pytest.raises(SystemExit) as exc:
        train_main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "config.train.batch_size=128: a training step needs about" in err and "activations the largest" in err
    assert "more than the 256 KiB each device has (the 2.0 MiB of host memory available, shared by 8" in err
    assert not (tmp_path / "w").exists()
    assert train_main(args + ["--skip_memory_check"]) == 0
