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


@pytest.mark.parametrize("k, cf", [(1, 1.25), (2, 0.5)])
def test_onehot_baseline_computes_the_same_layer(k, cf):
    """The benchmark's one-hot einsum dispatch is a second formulation of the same rule: it must
    agree with the layer (so the timing compares like with like), drops included."""
    import jax
    import numpy as np
    from flax import nnx

    from moe import MoEConfig, MoEFeedForward
    from sharding import make_mesh
    from train.bench import onehot_dispatch_combine

    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=8, experts_per_token=k, capacity_factor=cf)
    with jax.set_mesh(make_mesh(data=2, expert=4)):
        layer = MoEFeedForward(cfg, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (8, 16, 16), out_sharding=jax.P(("data", "expert")))
        y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
        y1, aux1 = nnx.jit(lambda m, x: m.forward_with(onehot_dispatch_combine, x))(layer, x)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert float(aux1["dropped_fraction"]) == float(aux["dropped_fraction"])
    assert float(aux["dropped_fraction"]) > (0.2 if cf < 1 else 0.0)  # the drop path is exercised
