"""train.services.metrics (JSONL, TensorBoard, console) and scripts/plot_metrics.py; no JAX needed."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import pathlib
import struct

import numpy as np
import pytest

from moe.costs import transformer_flops_per_token
from train.services.metrics import NOMINAL_PEAK_FLOPS, MetricsWriter, mfu, peak_flops_per_device

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write_run(workdir: pathlib.Path, stream: io.StringIO, **kwargs) -> None:
    with MetricsWriter(workdir, total_steps=30, progress=False, stream=stream, **kwargs) as w:
        for step in (10, 20, 30):
            w.write(
                step,
                {
                    "loss": np.float32(3.0 - step / 100),
                    "lr": 3e-3,
                    "tokens_per_sec": np.array(10532.4),  # 0-d array
                    "mfu": 0.003,
                    "moe/dropped_fraction": 0.012,
                    "moe/expert_load": np.array([0.5, 0.25, 0.125, 0.125], dtype=np.float32),
                    "tokens_seen": np.int64(step * 2048),
                    "grad_norm": float("nan") if step == 20 else 1.5,
                },
            )
        w.write(30, {"loss": 2.41}, split="eval")
        w.log("done")


def _read_events(path: pathlib.Path) -> list:
    """Parse a TFRecord event file (u64 length, u32 crc, data, u32 crc) into Event protos."""
    from tensorboardX.proto import event_pb2

    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return events


def test_jsonl_rows(tmp_path):
    _write_run(tmp_path, io.StringIO())
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["step"], r["split"]) for r in rows] == [(10, "train"), (20, "train"), (30, "train"), (30, "eval")]
    first = rows[0]
    assert first["loss"] == pytest.approx(2.9) and type(first["loss"]) is float
    assert type(first["tokens_seen"]) is int and first["tokens_seen"] == 20480
    assert first["tokens_per_sec"] == pytest.approx(10532.4)
    assert first["moe/expert_load"] == [0.5, 0.25, 0.125, 0.125]
    assert rows[1]["grad_norm"] is None and "NaN" not in lines[1]
    assert rows[3] == {"step": 30, "split": "eval", "loss": 2.41}


def test_jsonl_appends_and_is_flushed_before_close(tmp_path):
    w = MetricsWriter(tmp_path, total_steps=5, tensorboard=False, progress=False, stream=io.StringIO())
    w.write(1, {"loss": 1.0, "nested": [[1, 2], [3, float("inf")]]})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1, "split": "train", "loss": 1.0, "nested": [[1, 2], [3, None]]
    }
    w.close()
    w.close()  # twice is fine
    with MetricsWriter(tmp_path, total_steps=5, tensorboard=False, progress=False, stream=io.StringIO()) as w:
        w.write(2, {"loss": 0.5})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "tensorboard").exists()
    with MetricsWriter(tmp_path, total_steps=5, tensorboard=False, progress=False) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write(3, {"step": 1})


def test_tensorboard_scalars_and_histogram(tmp_path):
    _write_run(tmp_path, io.StringIO())
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    scalars: dict[str, dict[int, float]] = {}
    histograms: set[str] = set()
    for event in _read_events(files[0]):
        for value in event.summary.value:
            if value.HasField("histo"):
                histograms.add(value.tag)
            else:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert scalars["train/loss"][10] == pytest.approx(2.9)
    assert set(scalars["train/loss"]) == {10, 20, 30}
    assert scalars["eval/loss"] == {30: pytest.approx(2.41)}
    assert scalars["train/moe/expert_load/0"][20] == pytest.approx(0.5)
    assert scalars["train/moe/expert_load/3"][30] == pytest.approx(0.125)
    assert math.isnan(scalars["train/grad_norm"][20])
    assert {"train/lr", "train/tokens_per_sec", "train/mfu", "train/tokens_seen"} <= set(scalars)
    assert histograms == {"train/moe/expert_load"}


def test_tensorboard_is_written_without_importing_torch(tmp_path):
    """tensorboardX imports torch whenever it is installed (as it is in the test environment): a run
    writes its events without it, and torch still imports afterwards."""
    import subprocess
    import sys

    code = ("import sys; from train.services.metrics import MetricsWriter\n"
            f"with MetricsWriter({str(tmp_path)!r}, total_steps=1, progress=False) as w: w.write(1, {{'loss': 1.0}})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import torch")
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert next((tmp_path / "tensorboard").glob("events.out.tfevents.*")).stat().st_size > 0


def test_disabled_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    stream = io.StringIO()
    with MetricsWriter(workdir, total_steps=10, enabled=False, stream=stream) as w:
        w.write(1, {"loss": 1.0})
        w.write(1, {"loss": 1.0}, split="eval")
        w.log("hello")
    assert not workdir.exists() and stream.getvalue() == ""


def test_plain_lines(tmp_path):
    stream = io.StringIO()
    _write_run(tmp_path, stream, tensorboard=False)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "step 10/30  loss 2.900  lr 3.0e-03  tok/s 10,532  mfu 0.3%  drop 0.012"
    assert lines[3] == "eval step 30  loss 2.410  ppl 11.13"
    assert lines[4] == "done" and len(lines) == 5


def test_progress_bar_writes_to_stream(tmp_path):
    stream = io.StringIO()
    with MetricsWriter(tmp_path, total_steps=4, tensorboard=False, progress=True, stream=stream) as w:
        w.write(2, {"loss": 1.25, "tokens_per_sec": 1000.0})
        w.write(4, {"loss": 1.5}, split="eval")
        w.log("note")
    out = stream.getvalue()
    assert "loss=1.250" in out and "tok/s=1,000" in out and "2/4" in out
    assert "eval step 4  loss 1.500" in out and "note" in out


def test_progress_defaults_to_plain_lines_off_a_terminal(tmp_path):
    w = MetricsWriter(tmp_path, total_steps=3, tensorboard=False, stream=io.StringIO())
    assert w._bar is None
    w.close()


def test_default_stream_is_the_stderr_of_the_moment_not_of_the_import(tmp_path, monkeypatch):
    # the module is imported once per process; a writer made later (a second run, a test's capsys)
    # writes to whatever sys.stderr is then
    later = io.StringIO()
    monkeypatch.setattr("sys.stderr", later)
    with MetricsWriter(tmp_path, total_steps=1, tensorboard=False) as w:
        w.log("to the current stderr")
    assert later.getvalue() == "to the current stderr\n"


def test_flops_dense_and_moe():
    base = dict(num_layers=2, d_model=8, num_heads=2, seq_len=4, vocab_size=16, d_ff=32, num_experts=4)
    # active = 2*4*64 + 2*2*8*32 + 8*16 = 1664; attention = 2*2*4*8 = 128; 3*(2*1664 + 128)
    dense = transformer_flops_per_token(**base, moe_layers=0, expert_d_ff=16, experts_per_token=2, gated=False)
    assert dense == 10368.0
    # active = 512 + 3*8*32 (dense block) + (2*3*8*16 + 8*4) (MoE block) + 128 = 2208; 3*(2*2208 + 128)
    moe = transformer_flops_per_token(**base, moe_layers=1, expert_d_ff=16, experts_per_token=2, gated=True)
    assert moe == 13632.0
    with pytest.raises(ValueError):
        transformer_flops_per_token(**base, moe_layers=3, expert_d_ff=16, experts_per_token=1, gated=True)


def test_mfu():
    assert mfu(1000.0, 6e9, 4, 1e12) == pytest.approx(1.5)
    assert mfu(10_000.0, 13632.0, 8, NOMINAL_PEAK_FLOPS) == pytest.approx(10_000 * 13632 / 8e11)


@pytest.mark.parametrize(
    "kind, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 495e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
        ("NVIDIA A10", "bfloat16", 125e12),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5p", "float32", 459e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("cpu", "float32", NOMINAL_PEAK_FLOPS),
        ("Some Future Accelerator", "bfloat16", NOMINAL_PEAK_FLOPS),
    ],
)
def test_peak_flops(kind, dtype, expected):
    assert peak_flops_per_device(kind, dtype) == expected


def test_peak_flops_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="dtype"):
        peak_flops_per_device("TPU v4", "int8")


def _plot_module():
    spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "scripts" / "plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_metrics(tmp_path, capsys):
    plot = _plot_module()
    _write_run(tmp_path, io.StringIO(), tensorboard=False)
    out = tmp_path / "plots" / "run.png"
    assert plot.main([str(tmp_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_metrics_train_rows_only(tmp_path, capsys):
    plot = _plot_module()
    with MetricsWriter(tmp_path, total_steps=3, tensorboard=False, progress=False, stream=io.StringIO()) as w:
        for step in (1, 2, 3):
            w.write(step, {"loss": 1.0 / step})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "spl')  # a line cut short by a crash
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "metrics.png").stat().st_size > 0
    assert plot.main([str(tmp_path / "missing")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_moe_plot_draws_curves_expert_load_heatmaps_and_drops(tmp_path, capsys):
    from train.cli import plot_main
    from train.analysis.plots import moe_layers, read_rows, read_series

    with MetricsWriter(tmp_path, total_steps=4, tensorboard=False, progress=False, stream=io.StringIO()) as w:
        for step in (1, 2, 3, 4):
            w.write(step, {"loss": 3.0 / step, "moe/dropped_fraction": 0.1 / step,
                           "moe/layer1/expert_load": [0.5, 0.25, 0.125, 0.125], "moe/layer1/dropped_fraction": 0.2 / step,
                           "moe/layer3/expert_load": [0.25] * 4, "moe/layer3/dropped_fraction": 0.0})
        w.write(4, {"loss": 2.5}, split="eval")
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert moe_layers(rows) == ["layer1", "layer3"]
    steps, loads = read_series(tmp_path / "metrics.jsonl", "moe/layer1/expert_load", rows)["train"]
    assert steps == [1, 2, 3, 4] and loads[0] == [0.5, 0.25, 0.125, 0.125]
    assert plot_main([f"--workdir={tmp_path}"]) == 0
    written = capsys.readouterr().out.split()
    assert [pathlib.Path(p).name for p in written] == ["metrics.png", "expert_load.png", "dropped.png"]
    for p in written:
        assert pathlib.Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exc:
        plot_main([f"--workdir={tmp_path / 'nothing'}"])
    assert exc.value.code == 2 and "no metrics.jsonl there" in capsys.readouterr().err


def test_moe_plot_of_a_dense_run_draws_only_the_curves(tmp_path, capsys):
    from train.cli import plot_main

    with MetricsWriter(tmp_path, total_steps=2, tensorboard=False, progress=False, stream=io.StringIO()) as w:
        w.write(1, {"loss": 2.0})
    assert plot_main([f"--workdir={tmp_path}", f"--out_dir={tmp_path / 'p'}"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "p" / "metrics.png")]


def test_moe_plot_reads_a_metrics_file_torn_by_bytes_that_are_not_utf8(tmp_path, capsys):
    from train.cli import plot_main
    from train.analysis.plots import read_rows

    with MetricsWriter(tmp_path, total_steps=3, tensorboard=False, progress=False, stream=io.StringIO()) as w:
        w.write(1, {"loss": 3.0})
        w.write(2, {"loss": 2.0})
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "split": "train", "loss": 1.\xff\xfe5}\n\x80\x81 torn\n')  # a torn write
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert sorted(rows["train"]) == [1, 2]  # the bad rows are skipped
    assert plot_main([f"--workdir={tmp_path}"]) == 0
    assert capsys.readouterr().out.split()[0].endswith("metrics.png")


def test_tensorboard_leaves_out_values_not_measured_yet(tmp_path, caplog):
    """The first rows have no tokens/s yet (None): nothing is written for them, and nothing warns."""
    import logging

    with caplog.at_level(logging.WARNING):
        with MetricsWriter(tmp_path, total_steps=2, progress=False, stream=io.StringIO()) as w:
            w.write(1, {"loss": 3.0, "tokens_per_sec": None, "mfu": None})
            w.write(2, {"loss": 2.0, "tokens_per_sec": 100.0, "mfu": 0.1})
    assert not [r for r in caplog.records if "NaN or Inf" in r.getMessage()]
    scalars = {}
    for event in _read_events(next((tmp_path / "tensorboard").glob("events.*"))):
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert scalars["train/tokens_per_sec"] == {2: 100.0} and set(scalars["train/loss"]) == {1, 2}
