"""Nothing a run has done is lost: a resumed run asked for fewer steps (or exactly the steps) it
has reached writes no checkpoint, metrics row or summary, and its retention deletes nothing."""

import pathlib

from conftest import tiny_train_args
from train.cli import train_main


def _snapshot(work: pathlib.Path) -> dict:
    ckpts = work / "checkpoints"
    return {
        "steps": sorted(p.name for p in ckpts.iterdir()),
        "metrics": (work / "metrics.jsonl").read_text(),
        "summary": (work / "summary.json").read_text(),
    }


def test_resuming_with_fewer_or_equal_steps_is_a_no_op_that_keeps_the_latest_checkpoint(tmp_path, capsys):
    work = tmp_path / "w"
    assert train_main(tiny_train_args(tmp_path, work, 3)) == 0
    before = _snapshot(work)
    assert before["steps"] == ["2", "3"]
    capsys.readouterr()
    for steps in (1, 3):
        argv = tiny_train_args(tmp_path, work, steps) + ["--config.checkpoint.keep=1"]
        assert train_main(argv) == 0
        err = capsys.readouterr().err
        line = f"train.steps={steps}: the run in {work} is already at step 3; nothing to do"
        assert err.strip().splitlines()[-1] == line, err  # the last word: no save, no evaluation after it
        assert _snapshot(work) == before  # checkpoint 3 kept, no row for a lower step, summary intact
