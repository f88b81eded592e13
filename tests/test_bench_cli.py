"""moe-bench runs end to end on a tiny problem and refuses bad arguments before compiling."""

import pytest

from train.cli import bench_main


def test_bench_runs_and_prints_a_table(capsys):
    argv = ["--experts", "8,16", "--d_model", "16", "--d_ff", "32", "--tokens_per_device", "32", "--seq_len", "16",
            "--repeats", "1", "--iters", "1", "--markdown"]
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    assert "| 8 |" in out and "| 16 |" in out and "MoE / dense" in out


@pytest.mark.parametrize("argv, message", [
    (["--experts", "12"], "--experts=12: not divisible by --expert=8"),
    (["--experts", "8,x"], "expected comma-separated integers"),
    (["--tokens_per_device", "100"], "--tokens_per_device=100"),
])
def test_bench_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
