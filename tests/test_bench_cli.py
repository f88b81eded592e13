"""moe-bench runs end to end on a tiny problem and refuses bad arguments before compiling."""

import json
import pathlib

import pytest

from train.analysis.stages import STAGES
from train.cli import bench_main


def test_bench_layer_sweeps_and_writes_json_and_a_plot(capsys, tmp_path):
    argv = ["layer", "--experts", "8,16", "--tokens_per_device", "32", "--experts_per_token", "2",
            "--d_model", "16", "--d_ff", "32", "--seq_len", "16", "--repeats", "1", "--iters", "1", "--markdown",
            "--dropless", "--grouped_matmul", "auto,megablox", "--stages",
            "--json", str(tmp_path / "layer.json"), "--plot", str(tmp_path / "layer.png")]
    assert bench_main(argv) == 0
    out = capsys.readouterr().out
    assert "| 32 | 2 | 8 |" in out and "| 32 | 2 | 16 |" in out and "MoE / dense" in out
    assert "| dropless auto (ms) | dropless megablox (ms) |" in out and "| dropless megablox / MoE |" in out
    rows = json.loads((tmp_path / "layer.json").read_text())["rows"]
    assert {(r["tokens_per_device"], r["k"], r["experts"]) for r in rows} == {
        (32, 2, e) for e in (8, 16)
    }
    for r in rows:  # every case timed and its compiled temp memory reported
        assert min(r["moe_ms"], r["dense_ms"], r["onehot_ms"], r["dropless_ms"], r["dropless_megablox_ms"]) > 0
        assert r["dropless_megablox_vs_moe"] == pytest.approx(r["dropless_megablox_ms"] / r["moe_ms"])
        assert r["moe_temp_bytes"] > 0 and r["dense_temp_bytes"] > 0
        for case in ("moe", "dropless", "dropless_megablox"):  # the profile found the stages, both ways
            stages = r[f"{case}_stages_ms"]  # (XLA may fuse a small stage's ops into its neighbour's)
            assert set(stages) <= {s + d for s in STAGES for d in ("", " bwd")} | {"other"}, stages
            assert stages["experts"] > 0 and stages["experts bwd"] > 0 and stages["exchange"] > 0, stages
            assert len({s.split()[0] for s in stages} & set(STAGES)) >= 5, stages
    assert "| 32 | 2 | 8 | dropless_megablox |" in out
    assert (tmp_path / "layer.png").read_bytes()[:4] == b"\x89PNG"


def test_stage_of_reads_the_innermost_stage_and_the_direction():
    from train.analysis.stages import op_stages, stage_of

    assert stage_of("jit(f)/jvp(route)/dot_general") == "route"
    assert stage_of("jit(f)/transpose(jvp())/shard_map/exchange/all_to_all") == "exchange bwd"
    assert stage_of("jit(f)/jvp()/shard_map/exchange_back/reshape") == "exchange_back"
    assert stage_of("permute/jit(argsort)/sort") == "permute"
    assert stage_of("jit(f)/jvp()/shard_map/experts/ragged_dot;exchange/reshape") == "exchange"
    assert stage_of("jit(f)/reduce_sum") == "other"
    hlo = ('  %fusion.3 = f32[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/jvp()/experts/dot_general"}\n'
           '  ROOT %sort.1 = s32[8]{0} sort(%q), metadata={op_name="permute/jit(argsort)/sort" source_file="x.py"}\n')
    assert op_stages(hlo) == {"fusion.3": "experts", "sort.1": "permute"}


def test_bench_train_times_moe_dense_and_the_expert_sweep(capsys, tmp_path):
    argv = ["train", "--experts", "8,16", "--steps", "1", "--repeats", "1", "--peak_size", "64",
            "--json", str(tmp_path / "train.json"), "--config.train.batch_size=8", "--config.train.seq_len=32",
            "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.d_ff=64",
            "--config.model.num_heads=2"]
    assert bench_main(argv) == 0
    assert "MoE / dense tokens/s" in capsys.readouterr().out
    result = json.loads((tmp_path / "train.json").read_text())
    assert result["peak_flops"] > 0
    assert result["moe"]["active_params"] < result["moe"]["params"]  # the MoE config, with experts
    assert result["dense"]["experts"] == 0 and 0 < result["dense"]["mfu"] < 1
    assert [r["experts"] for r in result["expert_sweep"]] == [8, 16]
    assert result["expert_sweep"][1]["params"] > result["expert_sweep"][0]["params"]


@pytest.mark.parametrize("argv, message", [
    (["--experts", "12"], "--experts=12: not divisible by --expert=8"),
    (["--experts", "8,x"], "expected comma-separated integers"),
    (["--tokens_per_device", "100"], "--tokens_per_device=100"),
    (["layer", "--experts", "8", "--experts_per_token", "9"], "--experts_per_token=9: exceeds"),
    (["layer", "--dropless", "--grouped_matmul", "auto,cublas"], "'auto,cublas': choose from auto, ragged_dot"),
    (["train", "--experts", "6"], "--experts=6: not divisible by config.mesh.expert=4"),
    (["train", "--config.model.routr=hash"], "config.model.routr: unknown key"),
])
def test_bench_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("k, cf", [(1, 1.25), (2, 0.5)])
def test_onehot_baseline_computes_the_same_layer(k, cf):
    """The benchmark's one-hot einsum dispatch is a second formulation of the same rule: it must
    agree with the layer (so the timing compares like with like), drops included."""
    import jax
    import numpy as np
    from flax import nnx

    from moe import FFNConfig, MoEConfig, MoEFeedForward
    from sharding import make_mesh
    from train.analysis.bench_layer import onehot_dispatch

    cfg = MoEConfig(num_experts=8, experts_per_token=k, capacity_factor=cf)
    with jax.set_mesh(make_mesh(data=2, expert=4)):
        layer = MoEFeedForward(cfg, FFNConfig(16, 32, "gelu"), rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (8, 16, 16), out_sharding=jax.P(("data", "expert")))
        y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
        y1, aux1 = nnx.jit(lambda m, x: m(x, dispatch=onehot_dispatch))(layer, x)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert float(aux1.dropped_fraction) == float(aux.dropped_fraction)
    assert float(aux.dropped_fraction) > (0.2 if cf < 1 else 0.0)  # the drop path is exercised


def test_routing_study_trains_evaluates_and_tabulates_each_variant(tmp_path):
    """scripts/routing_study.py end to end on a tiny model: one row per variant, plots written."""
    import subprocess
    import sys

    from conftest import tiny_train_args

    root = pathlib.Path(__file__).resolve().parents[1]
    tiny = [a for a in tiny_train_args(tmp_path, tmp_path / "unused", 2) if a.startswith("--config.")
            and not a.startswith(("--config.train.steps", "--config.log_every", "--config.eval_every",
                                  "--config.checkpoint"))]
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, str(root / "scripts/routing_study.py"), "--routers", "hash",
                           "--steps", "2", "--seeds", "2", "--out", str(out), *tiny,
                           "--config.log_every_steps=1"], cwd=root, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["hash"]
    row, seeds = rows[0], rows[0]["seeds"]
    assert row["eval_loss"] > 0 and row["bits_per_byte"] > 0 and row["load_imbalance"] >= 1
    # two seeds (two initialisations and data orders): their mean, spread and range
    losses = [s["eval_loss"] for s in seeds]
    assert len(seeds) == 2 and losses[0] != losses[1]
    assert row["eval_loss"] == pytest.approx(sum(losses) / 2)
    assert row["eval_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2 ** 0.5)
    assert (row["eval_loss_min"], row["eval_loss_max"]) == (min(losses), max(losses))
    for i in (0, 1):
        assert json.loads((out / "hash" / f"seed{i}" / "config.json").read_text())["train"]["seed"] == i
    # a hash router routes by token id alone: H(expert | token) 0, churn 0
    assert row["token_entropy"] == 0.0 and row["churn"] == 0.0
    assert f"| hash | {row['eval_loss']:.4f} ± {row['eval_loss_std']:.4f} |" in (out / "results.md").read_text()
    assert (out / "loss.png").stat().st_size > 0 and (out / "eval.png").stat().st_size > 0


@pytest.mark.parametrize("argv, line", [
    (["layer", "--repeats=0"], "moe-bench layer: --repeats=0: must be >= 1 and <= 1000"),
    (["layer", "--capacity_factor=inf"], "moe-bench layer: --capacity_factor=inf: must be a finite number > 0 and <= 64"),
    (["layer", "--d_model=0"], "moe-bench layer: --d_model=0: must be >= 1 and <= 1048576"),
    (["train", "--steps=-1"], "moe-bench train: --steps=-1: must be >= 1 and <= 10000"),
])
def test_bench_flags_out_of_range_are_one_line(argv, line, capsys):
    from train.cli import bench_main

    with pytest.raises(SystemExit) as exc:
        bench_main(argv)
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == line
