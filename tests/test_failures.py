"""Failure behaviour: kill -9 and SIGTERM lose nothing, unreadable checkpoints are set aside,
non-finite updates are skipped, stalled peers stop the job, and bad input ends in one line."""

import dataclasses
import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import child_env, tiny_train_args
from test_checkpoint import assert_trees_equal, host, train, train_losses
from test_train import tiny_config
from train.errors import CheckpointError
from train.core import loop
from train.core.setup import setup
from train.errors import NonFiniteError

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- kill -9 and SIGTERM
def cli_args(tmp, workdir):
    return [sys.executable, "-m", "train", *tiny_train_args(tmp, workdir, steps=8)]


def run_until(cmd, marker, sig, timeout=240, then=None):
    """Start ``cmd``; when a stderr line contains ``marker`` send ``sig``, and with ``then`` send that
    too once the run has said it is stopping (two signals sent close together reach Python's handler
    as one when its main thread is busy in a compiled program); returns (exit code, later stderr)."""
    env = child_env(PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    sends = [(marker, sig)] + ([("stopping at the next step boundary", then)] if then is not None else [])
    try:
        for line in proc.stderr:
            if sends[0][0] in line:
                proc.send_signal(sends.pop(0)[1])
                if not sends:
                    break
            assert time.monotonic() < deadline, f"{sends[0][0]!r} never appeared"
        rest = proc.stderr.read()
        return proc.wait(timeout=timeout), rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_to_end(cmd):
    env = child_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    run_to_end(cli_args(tmp, tmp / "straight"))
    return tmp, train_losses(tmp / "straight")


KILL_POINTS = {
    "before-first-checkpoint": "step 1/8",
    "mid-step": "step 3/8",
    "during-async-save": "checkpoint 4: saving",
    "after-a-save": "step 5/8",
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_at_any_point_then_rerun_gives_the_uninterrupted_losses(uninterrupted, point):
    tmp, expected = uninterrupted
    work = tmp / f"killed-{point}"
    cmd = cli_args(tmp, work)
    assert run_until(cmd, KILL_POINTS[point], signal.SIGKILL)[0] == -signal.SIGKILL
    planted = work / "checkpoints" / "7.orbax-checkpoint-tmp-1700000000000000"  # a half-written later step
    (planted / "params").mkdir(parents=True)
    (planted / "params" / "junk").write_bytes(b"\0" * 100)
    run_to_end(cmd)
    assert train_losses(work) == expected  # bit for bit, every step
    leftovers = [p.name for p in (work / "checkpoints").iterdir() if not p.name.isdigit()]
    assert leftovers == [], leftovers  # no half-written step is left behind


# ---------------------------------------------------------------- unreadable checkpoints
def _largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's aborted reads
def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.train.steps, cfg.checkpoint.every_steps, cfg.eval_batches = 6, 2, 1
    straight, _ = train(cfg, tmp_path / "straight")
    work = tmp_path / "w"
    shutil.copytree(tmp_path / "straight", work)
    victim = _largest_file(work / "checkpoints" / "6" / "params")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # truncated
    shutil.rmtree(work / "checkpoints" / "4" / "params")  # missing files
    logs = []
    run, state = setup(cfg, work, log=logs.append)
    try:
        assert int(state.step) == 2
        assert any("checkpoint 6 at" in m and "cannot be restored" in m for m in logs), logs
        assert any("checkpoint 4 at" in m for m in logs) and any(m.startswith("resumed from") for m in logs)
        names = sorted(p.name for p in (work / "checkpoints").iterdir())
        assert names == ["2", "4.unreadable", "6.unreadable"]  # set aside, never deleted
        state, _ = loop.train(run, state)
        assert_trees_equal(host(state.params), straight.params)  # 2 -> 6 again, bit for bit
    finally:
        run.close()
    for step in ("2", "4", "6"):
        shutil.rmtree(work / "checkpoints" / step, ignore_errors=True)
    (work / "checkpoints" / "2").mkdir()  # a step folder with nothing readable in it
    with pytest.raises(CheckpointError, match="no checkpoint can be restored"):
        setup(cfg, work, log=lambda m: None)


# ---------------------------------------------------------------- non-finite updates
def _nan_weights(run, local):
    local = dict(local)
    local["weights"] = np.full(local["inputs"].shape, np.nan, np.float32)
    return run.global_batch(local)


def _router_state(state):
    return [x for x in jax.tree.leaves(host(state.model_state)) if x.dtype == np.float32]  # loss_free's bias


def test_a_non_finite_update_is_skipped_and_counted(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model.moe.router = "loss_free"  # its bias is state the step moves: a skipped step must not
    run, state = setup(cfg, tmp_path / "w")
    try:
        with run.context():
            ones = lambda local: run.global_batch(  # noqa: E731
                {**local, "weights": np.ones(local["inputs"].shape, np.float32)})
            state, m = run.train_step(state, ones(next(run.batches)))
            assert int(m["skipped"]) == 0
            before = host((state.params, state.opt_state))
            bias = _router_state(state)
            state, m = run.train_step(state, _nan_weights(run, next(run.batches)))
            assert int(m["skipped"]) == 1 and int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
            assert_trees_equal(host((state.params, state.opt_state)), before)  # nothing applied
            assert bias and all(np.array_equal(a, b) for a, b in zip(_router_state(state), bias, strict=True))
            assert int(state.step) == 2
            state, m = run.train_step(state, ones(next(run.batches)))
            assert int(m["skipped"]) == 0
            assert any(not np.array_equal(a, b) for a, b in zip(_router_state(state), bias, strict=True))
            after = host(state.params)
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before[0]), strict=True))
    finally:
        run.close()


def test_consecutive_non_finite_steps_stop_the_run_without_a_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.train.steps, cfg.train.max_nonfinite_steps, cfg.checkpoint.every_steps = 10, 2, 0
    run, state = setup(cfg, tmp_path / "w")
    clean = run.batches

    class Poisoned:  # from the 3rd batch on, every batch has NaN weights
        def __init__(self):
            self.n = 0

        def __next__(self):
            local = dict(next(clean))
            self.n += 1
            local["weights"] = np.full(local["inputs"].shape, np.nan if self.n >= 3 else 1.0, np.float32)
            return local

        def get_state(self):
            return clean.get_state()

    run = dataclasses.replace(run, batches=Poisoned())
    try:
        with pytest.raises(NonFiniteError, match=r"^train: step 4 ends 2 non-finite steps in a row"):
            state, _ = loop.train(run, state)
    finally:
        run.close()
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train" and r["skipped"]] == [3, 4]  # flushed
    assert not (tmp_path / "w" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "w" / "checkpoints").iterdir()
    )


def test_loss_spike_skipping_is_off_by_default_and_works_when_on(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.train.spike_sigma, cfg.train.spike_window = 1.0, 2
    run, state = setup(cfg, tmp_path / "w")
    try:
        with run.context():
            batch = run.global_batch(next(run.batches))
            for _ in range(3):  # fill the window with the same, falling loss
                state, m = run.train_step(state, batch)
            local = next(run.batches)
            rng = np.random.default_rng(0)
            noise = {k: rng.integers(0, 255, v.shape).astype(np.int32) for k, v in local.items()}
            state, m = run.train_step(state, run.global_batch(noise))
            assert int(m["skipped"]) == 1 and int(m["nonfinite"]) == 0
    finally:
        run.close()
    assert tiny_config(tmp_path).train.spike_sigma == 0.0


# ---------------------------------------------------------------- stalled or dead peer
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL, signal.SIGTERM], ids=["stalled", "dead", "preempted"])
def test_a_stalled_dead_or_preempted_peer_makes_process_0_stop(tmp_path, sig):
    """Two processes started by hand (no launcher to clean up): process 1 is frozen, killed or
    sent SIGTERM after step 3. Process 0 must end on its own instead of waiting forever: non-zero
    for a frozen or dead peer; for a preempted one, both save the same step and exit 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = cli_args(tmp_path, tmp_path / "w") + ["--config.train.steps=200", "--config.train.step_timeout_s=8",
                                                 "--config.checkpoint.every_steps=0", "--init_timeout=60",
                                                 "--cpu_devices=4", f"--coordinator_address=127.0.0.1:{port}",
                                                 "--num_processes=2"]
    if sig == signal.SIGTERM:  # the watchdog is for the frozen peer; a slow final save is no stall
        base.append("--config.train.step_timeout_s=120")
    env = child_env(PYTHONUNBUFFERED="1")
    peer = subprocess.Popen([*base, "--process_id=1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    main = subprocess.Popen([*base, "--process_id=0"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = []
    try:
        for line in main.stderr:
            err.append(line)
            if re.search(r"step +3/200", line):
                peer.send_signal(sig)
                break
        start = time.monotonic()
        err.append(main.communicate(timeout=150)[1])
        elapsed = time.monotonic() - start
        if sig == signal.SIGTERM:
            peer.wait(timeout=120)
    finally:
        for proc in (main, peer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = "".join(err)
    if sig == signal.SIGTERM:  # only process 1 was signalled; both stop after the same step
        assert main.returncode == 0 and peer.returncode == 0, text[-3000:]
        saved = re.search(r"stopped \(a signal to another process\): checkpoint (\d+) saved", text)
        assert saved, text[-3000:]
        steps = [int(p.name) for p in (tmp_path / "w" / "checkpoints").iterdir()]
        assert steps == [int(saved.group(1))] and 3 <= steps[0] < 200, steps
        return
    assert main.returncode != 0 and elapsed < 120, text[-3000:]
    if sig == signal.SIGSTOP:  # a frozen peer: only the watchdog can tell
        assert main.returncode == 4
        assert re.search(r"\[process 0/2\] moe-train: no step finished for \d+ s after step \d+", text), text[-2000:]
    elif main.returncode == 1:  # the dead peer broke a collective; process 0 leaves without a barrier
        assert elapsed < 60, text[-3000:]
        assert "[process 0/2] moe-train: " in text and "stopping without waiting for the other processes" in text
    else:  # the collective waited on the dead peer instead of failing: the watchdog ends it
        assert main.returncode == 4 and elapsed < 60, text[-3000:]
        assert re.search(r"\[process 0/2\] moe-train: no step finished for \d+ s after step \d+", text), text[-2000:]


@pytest.mark.parametrize("error", [CheckpointError("checkpoint: no checkpoint can be restored from /w"),
                                   NonFiniteError("train: step 4 ends 2 non-finite steps in a row")])
def test_a_run_that_cannot_go_on_ends_in_one_line_with_exit_1(capsys, error):
    from train.cli.common import run_guarded as _run_guarded

    def fail():
        raise error

    with pytest.raises(SystemExit) as exc:
        _run_guarded("moe-train", False, fail)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and err == f"moe-train: {error}"
    with pytest.raises(type(error)):  # --verbose: the traceback
        _run_guarded("moe-train", True, fail)


def test_a_checkpoint_from_an_incompatible_config_is_refused_in_one_line(tmp_path, capsys):
    from train.cli import train_main

    args = [a for a in cli_args(tmp_path, tmp_path / "w")[3:] if not a.startswith("--config.train.steps")]
    assert train_main([*args, "--config.train.steps=2"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train_main([*args, "--config.train.steps=4", "--config.model.d_model=64"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "config.model.d_model=64: differs from the checkpoint" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert train_main([*args, "--config.train.steps=4"]) == 0  # extending the same run is fine
