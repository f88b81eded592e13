"""``optimizer.sharded_state`` (ZeRO-1): the Adam moments and the update are split over every device,
and training is the same (losses bit for bit here; parameters to float rounding, since XLA fuses
the split update differently)."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from conftest import build_mesh
from sharding.rules import spread_spec
from test_train import run_steps, tiny_config
from train.core.setup import setup


def test_spread_spec_uses_every_axis_an_array_is_replicated_on():
    mesh = build_mesh("d2e4")  # data=2 x expert=4
    assert spread_spec(P("expert", None, None), (8, 32, 64), mesh) == P("expert", None, "data")
    assert spread_spec(P(None, None), (32, 64), mesh) == P(None, ("data", "expert"))
    assert spread_spec(P(None), (6,), mesh) == P("data")  # 6 splits 2 ways, not 8
    assert spread_spec(P(None), (5,), mesh) == P(None)  # nothing divides: as it was
    assert spread_spec(P("data", "expert"), (4, 8), mesh) == P("data", "expert")  # nothing left to add


def test_sharded_optimizer_state_trains_the_same(tmp_path):
    cfg = tiny_config(tmp_path)
    base_losses, base_params, _ = run_steps(cfg, tmp_path / "replicated", 3)
    cfg.optimizer.sharded_state = True
    losses, params, _ = run_steps(cfg, tmp_path / "sharded", 3)
    np.testing.assert_allclose(losses, base_losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, base_params)


def test_sharded_optimizer_state_splits_the_moments_over_every_device(tmp_path):
    cfg = tiny_config(tmp_path)
    replicated, _ = setup(cfg, tmp_path / "a")
    full = replicated.step_memory.optimizer
    replicated.close()
    cfg.optimizer.sharded_state = True
    run, state = setup(cfg, tmp_path / "b")
    try:
        mu = state.opt_state[1][0].mu  # clip, then adamw: (ScaleByAdamState, ...)
        wi = mu["blocks"][0]["ffn"]["wi"][...]  # [E=8, D, F], experts over expert=4
        assert wi.sharding.shard_shape(wi.shape) == (2, 32, 32)  # and F over data=2
        embed = mu["embed"][...]  # replicated parameter: its moments over all 8 devices
        assert np.prod(embed.sharding.shard_shape(embed.shape)) * 8 == np.prod(embed.shape)
        assert state.params["embed"][...].sharding.spec == P(None, None)  # parameters unchanged
        assert run.step_memory.optimizer < full / 2
    finally:
        run.close()
