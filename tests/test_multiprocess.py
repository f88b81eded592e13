"""Multi-process training through scripts/launch_local.sh: 2 processes x 4 CPU devices vs 1 x 8.

Every subprocess has a hard timeout and a free port, so a broken runtime fails instead of hanging.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import child_env, tiny_train_args
from test_checkpoint import host
from train.core.checkpoint import Checkpoints
from train.core.config import from_dict
from train.inference.evaluate import evaluate_run, load_run
from train.core.setup import setup

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch_local.sh"
pytestmark = pytest.mark.slow


def _env(cmd=None):
    env = child_env()  # each process sets its own device count
    env["MOE_CMD"] = cmd or f"{sys.executable} -m train"
    env["PYTHON"] = sys.executable
    return env


def _args(tmp, workdir):
    return [*tiny_train_args(tmp, workdir, steps=4), "--init_timeout=60"]


def launch(nproc, devices, args, cmd=None, timeout=240):
    return subprocess.run(["bash", str(LAUNCH), str(nproc), str(devices), *args], env=_env(cmd), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    two = launch(2, 4, _args(tmp, tmp / "2x4"))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = launch(1, 8, _args(tmp, tmp / "1x8"))
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    return tmp, two, one


def test_two_processes_match_one_process(runs):
    tmp, two, _ = runs
    a, b = losses(tmp / "2x4"), losses(tmp / "1x8")
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # only process 0 writes logs; every line of the launcher's output names its process
    assert "[0] done: loss" in two.stdout and "[1] done" not in two.stdout
    for run in ("2x4", "1x8"):
        ckpt = Checkpoints(tmp / run / "checkpoints", read_only=True)
        assert ckpt.all_steps() == [2, 4]
        meta, data = ckpt.read_meta(4)
        assert data["next_batch"] == 4
        ckpt.close()


def test_two_process_checkpoint_resumes_in_one_process_with_the_state_of_the_1x8_run(runs):
    """The whole training state (params, optimizer state, RNG streams, step, data position) that
    2 processes saved restores in this one process and equals what 1 process x 8 saved."""
    tmp, _, _ = runs
    states = []
    for name in ("2x4", "1x8"):
        cfg = from_dict(json.loads((tmp / name / "config.json").read_text()))
        run, state = setup(cfg, tmp / name, log=lambda m: None)
        try:
            assert int(state.step) == 4 and run.batches.get_state()["next_batch"] == 4
            states.append(host(state))
        finally:
            run.close()
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    # and for evaluation on one device
    tmp, _, _ = runs
    one_dev = evaluate_run(load_run(tmp / "2x4", devices=jax.devices()[:1]), log=lambda m: None)
    eight = evaluate_run(load_run(tmp / "2x4"), log=lambda m: None)
    assert one_dev["step"] == 4 and one_dev["loss"] == pytest.approx(eight["loss"], abs=1e-4)


def test_moe_eval_runs_multi_process(runs):
    tmp, _, _ = runs
    proc = launch(2, 4, [f"--workdir={tmp / '2x4'}", "--init_timeout=60"], cmd=f"{sys.executable} -c 'import sys; from train.cli import eval_main; sys.exit(eval_main())'")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if '"loss"' in line]
    assert len(lines) == 1 and lines[0].startswith("[0] ")  # one JSON line, from process 0
    result = json.loads(lines[0][4:])
    single = evaluate_run(load_run(tmp / "2x4"), log=lambda m: None)
    assert result["loss"] == pytest.approx(single["loss"], abs=1e-4)


def test_launcher_stops_everything_when_one_process_fails_at_start_up(tmp_path):
    wrapper = tmp_path / "fail_one.sh"
    wrapper.write_text(
        '#!/usr/bin/env bash\nfor a in "$@"; do [[ $a == --process_id=1 ]] && { echo "boom" >&2; exit 7; }; done\n'
        f'exec {sys.executable} -m train "$@"\n'
    )
    start = time.monotonic()
    proc = launch(2, 4, _args(tmp_path, tmp_path / "w"), cmd=f"bash {wrapper}", timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 7, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[1] boom" in proc.stdout and elapsed < 60  # well inside the 60 s start-up timeout


@pytest.mark.xfail(strict=False, reason="open: in the full suite the launcher has twice not exited after SIGINT "
                   "(600 s); alone, and with -n 2 alone, it always passes")
def test_ctrl_c_reaches_every_process_and_the_stubborn_are_killed_after_the_grace_period(tmp_path):
    """Process 0 ends on SIGINT; process 1 ignores it and is killed LAUNCH_GRACE_S later."""
    child = tmp_path / "child.py"
    child.write_text(
        "import signal, sys, time\n"
        "if '--process_id=1' in sys.argv: signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(3600)\n"
    )
    env = dict(_env(f"{sys.executable} {child}"), LAUNCH_GRACE_S="2")
    # a pytest-xdist worker ignores SIGINT, and a bash started with SIGINT ignored cannot trap it:
    # start the launcher as a terminal would, with SIGINT at its default
    proc = subprocess.Popen(["bash", str(LAUNCH), "2", "1"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ready = [proc.stdout.readline(), proc.stdout.readline()]
        assert sorted(line[:3] for line in ready) == ["[0]", "[1]"], ready
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        # process 1 would sleep for an hour: the launcher ending at all means it was killed (the
        # limit is only there so that a launcher that never kills fails instead of hanging)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)
    left = [p.name for p in pathlib.Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, str(child))]
    assert left == [], left  # nobody outlives the launcher


def _cmdline_has(proc_dir, text):
    try:
        return text in (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _lonely(tmp_path, process_id):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a for a in _args(tmp_path, tmp_path / "w") if not a.startswith("--init_timeout")]
    cmd = [sys.executable, "-m", "train", *args, "--cpu_devices=4", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={process_id}", "--init_timeout=5"]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    return proc, time.monotonic() - start


def test_a_process_without_its_coordinator_fails_with_one_clear_line(tmp_path):
    proc, elapsed = _lonely(tmp_path, process_id=1)
    assert proc.returncode == 3 and elapsed < 120  # no hang (a loaded machine starts Python slowly)
    assert "[process 1] no coordinator at --coordinator_address=127.0.0.1:" in proc.stderr
    assert "--init_timeout=5s" in proc.stderr


def test_a_coordinator_whose_peers_never_come_exits_after_the_timeout(tmp_path):
    proc, elapsed = _lonely(tmp_path, process_id=0)
    assert proc.returncode != 0 and elapsed < 150  # JAX aborts the process: no hang
    assert "[process 0] joining 2 processes at 127.0.0.1:" in proc.stderr
    assert "waiting up to 5 s" in proc.stderr


def test_a_multi_process_job_on_a_held_workdir_is_refused_by_every_process(tmp_path):
    from test_workdir import hold_lock

    work = tmp_path / "w"
    holder = hold_lock(work)
    try:
        proc = launch(2, 4, _args(tmp_path, work))
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[0] [process 0/2] moe-train: --workdir={work}: in use by another run (host" in proc.stdout
    assert sorted(p.name for p in work.iterdir()) == [".lock"]  # nothing else touched


_LATE_PEER = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from sharding import distributed as dist
from sharding.mesh import emulate_cpu_devices

port, pid, delay, use_aligned = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
emulate_cpu_devices(2)
dist.initialize(dist.DistributedSettings(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                                         init_timeout=60))
mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
sharding = jax.sharding.NamedSharding(mesh, jax.P("d"))
x = jax.make_array_from_process_local_data(sharding, np.full((2,), pid + 1.0, np.float32), (4,))
total = jax.jit(lambda v: jnp.sum(v), out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))
step = dist.aligned(total, "the sum") if use_aligned else total
time.sleep(delay)  # a process that is still compiling, under load
print("sum", float(step(x)), flush=True)
dist.shutdown()
"""


def _late_peer(tmp_path, delay, use_aligned):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "late_peer.py"
    script.write_text(_LATE_PEER)
    env = _env()
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(delay if i else 0),
                               str(int(use_aligned))], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], outs


def test_a_process_that_reaches_its_first_collective_40_s_late_is_waited_for(tmp_path):
    """XLA:CPU's gloo gives processes a fixed 30 s to meet at a program's first collective (a
    loaded machine can exceed it while one process still compiles); ``aligned`` meets first at a
    coordination-service barrier (--sync_timeout), so a peer 40 s late is no failure."""
    codes, outs = _late_peer(tmp_path, 40, use_aligned=True)
    assert codes == [0, 0], outs
    assert all("sum 6.0" in out for out, _ in outs), outs
