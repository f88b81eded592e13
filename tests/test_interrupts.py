"""SIGTERM and Ctrl-C: stop at the next step boundary, save, lose nothing; a second Ctrl-C stops at once."""

import re
import signal

import pytest

from test_checkpoint import train_losses
from test_failures import cli_args, run_to_end, run_until


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupts")
    run_to_end(cli_args(tmp, tmp / "straight"))
    return tmp, train_losses(tmp / "straight")


def saved_step(err: str, reason: str) -> int:
    saved = re.search(rf"stopped \({reason}\): checkpoint (\d+) saved; run the same command to resume", err)
    assert saved, err[-2000:]
    return int(saved.group(1))


def checkpoint_steps(work) -> list[int]:
    return sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
@pytest.mark.parametrize("sig, reason, code", [(signal.SIGTERM, "SIGTERM", 0), (signal.SIGINT, "Ctrl-C", 130)],
                         ids=["sigterm", "ctrl-c"])
def test_a_signal_saves_the_step_it_stopped_at_and_the_rerun_loses_nothing(uninterrupted, sig, reason, code):
    tmp, expected = uninterrupted
    work = tmp / f"stopped-{reason}"
    cmd = cli_args(tmp, work)
    rc, err = run_until(cmd, "step 3/8", sig)
    assert rc == code, err[-2000:]
    step = saved_step(err, reason)
    assert 3 <= step <= 5  # the next step boundary: at most the step in flight is finished
    assert checkpoint_steps(work)[-1] == step  # saved at the step it was on, and complete
    run_to_end(cmd)
    assert train_losses(work) == expected


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(uninterrupted):
    tmp, _ = uninterrupted
    work = tmp / "twice"
    proc_rc, err = run_until(cli_args(tmp, work), "step 3/8", signal.SIGINT, then=signal.SIGINT)
    assert proc_rc == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "moe-train: interrupted", err[-2000:]
    assert max(train_losses(work)) < 8  # it did not run on to the end


@pytest.mark.slow
def test_sigterm_before_the_first_step_stops_at_the_first_boundary(uninterrupted):
    """Signalled while the trainer is still being built: at most the step in flight then runs."""
    tmp, _ = uninterrupted
    work = tmp / "early"
    rc, err = run_until(cli_args(tmp, work), "model:", signal.SIGTERM)
    assert rc == 0, err[-2000:]
    if "before the first step: nothing to save" in err:  # no step taken: the new workdir is gone
        assert not work.exists()
    else:  # the first step was already running: it finishes and is saved
        assert saved_step(err, "SIGTERM") == 1 and checkpoint_steps(work) == [1]
        assert list(train_losses(work)) == [1]
