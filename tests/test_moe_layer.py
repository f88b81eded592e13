"""MoE layer behaviour beyond the oracle: capacity, routers, losses, layouts, bad configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_mesh
from harness import E, layer_spec, make_inputs, run_layer
from moe.routers.hashing import hash_route
from moe.routers.learned import topk_route
from sharding.rules import use_rules


def _cfg(**kw):
    base = dict(num_experts=E, experts_per_token=1, router="topk")
    base.update(kw)
    return layer_spec(**base)


# ---------------------------------------------------------------- capacity
def test_half_capacity_drops_about_half_and_dropped_rows_are_exactly_zero():
    x, token_ids, ct = make_inputs(b=8, s=64)
    cfg = _cfg(router="random", capacity_factor=0.5)
    out = run_layer(cfg, "d2e4", x, token_ids, ct, key=jax.random.key(3))
    dropped = float(out["aux"].dropped_fraction)
    assert 0.45 <= dropped <= 0.65
    zero_rows = np.all(out["y"] == 0.0, axis=-1)
    assert zero_rows.mean() == pytest.approx(dropped, abs=1e-9)
    # a dropped token gets no gradient through the experts
    assert np.all(out["grads"]["x"][zero_rows] == 0.0)


def test_large_capacity_drops_nothing():
    x, token_ids, ct = make_inputs(b=8, s=64)
    out = run_layer(_cfg(router="random", capacity_factor=float(E)), "d2e4", x, token_ids, ct, key=jax.random.key(3))
    assert float(out["aux"].dropped_fraction) == 0.0
    assert not np.any(np.all(out["y"] == 0.0, axis=-1))


def test_eval_mode_uses_eval_capacity_and_drops_nothing():
    x, token_ids, ct = make_inputs()
    out = run_layer(_cfg(capacity_factor=0.25), "d2e4", x, token_ids, ct, deterministic=True)
    assert float(out["aux"].dropped_fraction) == 0.0


def test_capacity_groups_make_drops_layout_invariant():
    """With a fixed capacity_group_size, even the dropped tokens agree across meshes."""
    x, token_ids, ct = make_inputs()
    cfg = _cfg(experts_per_token=2, capacity_factor=0.5, capacity_group_size=16)
    outs = {m: run_layer(cfg, m, x, token_ids, ct) for m in ("none", "d2e4", "d1e8")}
    assert float(outs["none"]["aux"].dropped_fraction) > 0.2
    for m in ("d2e4", "d1e8"):
        np.testing.assert_allclose(outs[m]["y"], outs["none"]["y"], rtol=1e-5, atol=1e-6)
        assert float(outs[m]["aux"].dropped_fraction) == float(outs["none"]["aux"].dropped_fraction)


# ---------------------------------------------------------------- layout invariance
@pytest.mark.parametrize("router", ["topk", "random"])
def test_routing_and_statistics_do_not_depend_on_the_mesh(router):
    x, token_ids, ct = make_inputs()
    cfg = _cfg(router=router, experts_per_token=2, capacity_factor=float(E))
    key = jax.random.key(5)
    ref = run_layer(cfg, "none", x, token_ids, ct, key=key)
    for m in ("1dev", "d2e4", "d1e8", "d8e1"):
        out = run_layer(cfg, m, x, token_ids, ct, key=key)
        for name in ("expert_load", "aux_loss", "z_loss", "router_entropy", "dropped_fraction"):
            np.testing.assert_allclose(getattr(out["aux"], name), getattr(ref["aux"], name), rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(out["y"], ref["y"], rtol=1e-5, atol=1e-6)
    if router == "random":
        assert np.isclose(ref["aux"].expert_load.sum(), 1.0)
        assert ref["aux"].aux_loss == ref["aux"].z_loss == ref["aux"].router_loss == 0.0  # no router


def test_expert_gradients_are_not_averaged_over_the_expert_axis():
    """The t5x trap: grads of expert weights sharded over 'expert' must equal the 1-device grads."""
    x, token_ids, ct = make_inputs()
    cfg = _cfg(capacity_factor=float(E))
    ref = run_layer(cfg, "none", x, token_ids, ct)
    out = run_layer(cfg, "d1e8", x, token_ids, ct)
    for name in ("wi", "wg", "wo", "router_w"):
        np.testing.assert_allclose(out["grads"][name], ref["grads"][name], rtol=1e-4, atol=1e-6, err_msg=name)
    # each expert's gradient is its own: not all equal (as averaging would make them)
    per_expert = np.linalg.norm(out["grads"]["wi"].reshape(E, -1), axis=-1)
    assert np.ptp(per_expert) > 1e-3 * per_expert.max()


def test_parameters_are_created_sharded():
    for mesh_name, wi_spec in (("d2e4", ("expert", None, None)), ("e4t2", ("expert", None, "tensor"))):
        mesh = build_mesh(mesh_name)
        with jax.set_mesh(mesh), use_rules("ep+tp"):
            layer = _cfg().build(rngs=nnx.Rngs(0))
            assert tuple(jax.typeof(layer.wi[...]).sharding.spec) == wi_spec
            assert tuple(layer.wi.out_sharding) == wi_spec
            assert all(a is None for a in jax.typeof(layer.router.w[...]).sharding.spec)
            local = layer.wi[...].addressable_shards[0].data.shape
            assert local[0] == E // 4


def test_bfloat16_activations_track_float32():
    x, token_ids, ct = make_inputs()
    # hash routing, so that bfloat16 rounding of x cannot flip a near-tie routing decision
    f32 = run_layer(_cfg(router="hash", capacity_factor=float(E)), "d2e4", x, token_ids, ct)
    bf16 = run_layer(_cfg(router="hash", capacity_factor=float(E), dtype="bfloat16"), "d2e4", x, token_ids, ct)
    assert bf16["y"].dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16["y"].astype(np.float32), f32["y"], atol=0.05, rtol=0.05)


# ---------------------------------------------------------------- routers
def test_hash_router_sends_equal_token_ids_to_equal_experts():
    token_ids = jax.random.randint(jax.random.key(0), (16, 64), 0, 40)
    r = hash_route(token_ids, E, 2, seed=0)
    ids, tok = np.asarray(r.expert_ids).reshape(-1, 2), np.asarray(token_ids).reshape(-1)
    for t in np.unique(tok):
        rows = ids[tok == t]
        assert (rows == rows[0]).all()
        assert rows[0, 0] != rows[0, 1]  # k distinct experts
    np.testing.assert_array_equal(np.asarray(r.gates), 0.5)
    other = np.asarray(hash_route(token_ids, E, 2, seed=1).expert_ids).reshape(-1, 2)
    assert (other != ids).any()  # the table depends on the seed
    big = hash_route(jnp.arange(40_000).reshape(100, 400), E, 1, seed=0)
    np.testing.assert_allclose(np.asarray(big.expert_load), 1.0 / E, rtol=0.05)


def test_random_router_changes_between_calls_and_is_fixed_in_eval():
    mesh = build_mesh("d2e4")
    x, token_ids, _ = make_inputs()
    with jax.set_mesh(mesh):
        layer = _cfg(router="random").build(rngs=nnx.Rngs(0, routing=1))
        x = jax.sharding.reshard(x, jax.P(("data", "expert")))
        first = np.asarray(layer.route(x, None).expert_ids)
        second = np.asarray(layer.route(x, None).expert_ids)
        assert (first != second).mean() > 0.5
        layer.eval()
        e1 = np.asarray(layer.route(x, None).expert_ids)
        e2 = np.asarray(layer.route(x, None).expert_ids)
        np.testing.assert_array_equal(e1, e2)
    load = np.bincount(first.reshape(-1), minlength=E) / first.size
    assert load.min() > 0.05  # uniform-ish over experts


def test_router_jitter_only_in_training():
    mesh = build_mesh("d2e4")
    x, token_ids, _ = make_inputs()
    with jax.set_mesh(mesh):
        x = jax.sharding.reshard(x, jax.P(("data", "expert")))
        jittery = _cfg(router_jitter=0.5).build(rngs=nnx.Rngs(0))
        plain = _cfg().build(rngs=nnx.Rngs(0))
        g1 = np.asarray(jittery.route(x, None).gates)
        g2 = np.asarray(jittery.route(x, None).gates)
        assert not np.allclose(g1, g2)
        jittery.eval()
        np.testing.assert_array_equal(np.asarray(jittery.route(x, None).gates), np.asarray(plain.route(x, None).gates))


def test_load_balance_and_z_loss_match_hand_computed_values():
    ln3 = math.log(3.0)
    logits = jnp.array([[[0.0, ln3], [0.0, ln3]]])  # two tokens, both p = (0.25, 0.75)
    r = topk_route(logits, 1)
    np.testing.assert_array_equal(np.asarray(r.expert_ids)[..., 0], [[1, 1]])
    np.testing.assert_allclose(np.asarray(r.gates)[..., 0], [[0.75, 0.75]], rtol=1e-6)
    # f = (0, 1), P = (0.25, 0.75): E * sum f_i P_i = 2 * 0.75
    assert float(r.aux_loss) == pytest.approx(1.5, rel=1e-6)
    assert float(r.z_loss) == pytest.approx(math.log(4.0) ** 2, rel=1e-6)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert float(r.router_entropy) == pytest.approx(entropy, rel=1e-6)
    r2 = topk_route(logits, 2)  # k=2 renormalises the chosen gates (here: all of them)
    np.testing.assert_allclose(np.asarray(r2.gates), [[[0.75, 0.25], [0.75, 0.25]]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r2.expert_load), [0.5, 0.5])


def test_layer_reports_router_losses_with_their_coefficients():
    """aux_loss = alpha * E * sum_i f_i P_i, z_loss = beta * mean lse^2, router_loss = their sum."""
    x, token_ids, ct = make_inputs()
    unit = run_layer(_cfg(aux_loss_coef=1.0, z_loss_coef=1.0), "d2e4", x, token_ids, ct)["aux"]
    a = run_layer(_cfg(aux_loss_coef=0.5, z_loss_coef=0.25), "d2e4", x, token_ids, ct)["aux"]
    assert float(a.aux_loss) == pytest.approx(0.5 * float(unit.aux_loss), rel=1e-6)
    assert float(a.z_loss) == pytest.approx(0.25 * float(unit.z_loss), rel=1e-6)
    assert float(a.router_loss) == pytest.approx(float(a.aux_loss) + float(a.z_loss), rel=1e-6)
    assert float(unit.aux_loss) > 0.0 and float(unit.z_loss) > 0.0
    assert a.expert_load.shape == (E,)
    hashed = run_layer(_cfg(router="hash"), "d2e4", x, token_ids, ct)["aux"]
    assert hashed.aux_loss == hashed.z_loss == hashed.router_loss == 0.0  # no router, no losses


# ---------------------------------------------------------------- bad configs
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(experts_per_token=9), "experts_per_token"),
        (dict(router="learned"), "router"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(num_experts=0), "num_experts"),
        (dict(activation="tanh"), "activation"),
        (dict(d_model=0), "d_model"),
        (dict(capacity_group_size=-1), "capacity_group_size"),
        (dict(dtype="float16"), "dtype"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^(MoEConfig|FFNConfig)\.{field}="):
        _cfg(**kwargs)


def test_experts_not_divisible_by_expert_axis_fails_before_tracing():
    mesh = build_mesh("d1e8")
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"^MoEConfig\.num_experts=6: not divisible by the 'expert'"):
        _cfg(num_experts=6).build(rngs=nnx.Rngs(0))


def test_capacity_group_that_does_not_divide_local_tokens_is_refused():
    x, token_ids, ct = make_inputs()
    with pytest.raises(ValueError, match=r"^MoEConfig\.capacity_group_size=24"):
        run_layer(_cfg(capacity_group_size=24), "d2e4", x, token_ids, ct)


def test_layer_runs_without_a_mesh_context():
    x, token_ids, _ = make_inputs()
    layer = _cfg(router="hash").build(rngs=nnx.Rngs(0))
    y, aux = layer(x, token_ids)
    assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
    assert not nnx.state(layer.router)  # the hash router has no parameters


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_compiled_layer_labels_its_named_stages(dispatch):
    """Every op of the compiled layer carries its stage in its name, so a profile can group by it."""
    x, token_ids, _ = make_inputs()
    mesh = build_mesh("d2e4")
    with jax.set_mesh(mesh), use_rules("ep"):
        layer = _cfg(dispatch=dispatch, experts_per_token=2).build(rngs=nnx.Rngs(0), vocab_size=50)
        x, token_ids = (jax.sharding.reshard(a, jax.P(("data", "expert"))) for a in (x, token_ids))
        graphdef, state = nnx.split(layer)
        hlo = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t)[0]).lower(state, x, token_ids).compile().as_text()
    names = [line.split('op_name="', 1)[1].split('"', 1)[0] for line in hlo.splitlines() if 'op_name="' in line]
    for stage in ("route", "permute", "exchange", "experts", "exchange_back", "unpermute"):
        assert any(f"/{stage}/" in n for n in names), stage
    assert any("all-to-all" in line and "/exchange/" in line for line in hlo.splitlines())
    assert any("all-to-all" in line and "/exchange_back/" in line for line in hlo.splitlines())
