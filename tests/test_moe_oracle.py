"""Oracle tests: the sharded MoE layer equals a naive per-expert loop, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import D, E, H, layer_spec, make_inputs, run_layer
from oracle import make_oracle, oracle_routing


def oracle(cfg, out, x, token_ids, ct, num_groups, key=None, deterministic=False):
    # tables and biases are state, not parameters: no gradient
    params = {n: jnp.asarray(v) for n, v in out["params"].items() if n not in ("hash_table", "expert_bias")}
    ids = oracle_routing(cfg, out["params"], x, token_ids, key, deterministic, num_groups)
    gate_ids = oracle_routing(cfg.replace(router="topk"), out["params"], x, token_ids) if cfg.router == "gshard" else None
    capacity = cfg.capacity(x.shape[0] * x.shape[1] // num_groups, deterministic)
    if cfg.dispatch == "dropless" or (cfg.router == "thor" and not deterministic):
        capacity = x.shape[0] * x.shape[1]  # every assignment is kept
    f = make_oracle(cfg, ids, num_groups, capacity, gate_ids)

    def loss(params, x):
        y, router_loss, _ = f(params, x)
        return jnp.sum(y * ct) + router_loss

    y, router_loss, dropped = f(params, x)
    grads, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    grads = {n: np.asarray(v) for n, v in grads.items() if not (n == "router_w" and cfg.router == "frozen")}
    grads["x"] = np.asarray(g_x)
    return np.asarray(y), grads, dropped, ids, float(router_loss)


GROUPS = {"none": 1, "1dev": 1, "d2e4": 8, "d1e8": 8, "d8e1": 8, "e4t2": 4}


def check_against_oracle(cfg, mesh_name, seed=0, deterministic=False):
    x, token_ids, ct = make_inputs(seed)
    key = jax.random.key(7) if cfg.router in ("random", "gshard", "thor") else None
    out = run_layer(cfg, mesh_name, x, token_ids, ct, key=key, deterministic=deterministic)
    num_groups = x.shape[0] * x.shape[1] // cfg.capacity_group_size if cfg.capacity_group_size else GROUPS[mesh_name]
    y_ref, g_ref, dropped_ref, ids, router_loss_ref = oracle(cfg, out, x, token_ids, ct, num_groups, key, deterministic)
    np.testing.assert_allclose(out["y"], y_ref, rtol=1e-5, atol=1e-5)
    assert out["aux"].dropped_fraction == pytest.approx(dropped_ref, abs=1e-7)
    routed = ids[ids < cfg.num_experts]  # id E: no assignment (gshard's unused second choice, EC's untaken slot)
    np.testing.assert_allclose(out["aux"].expert_load, np.bincount(routed, minlength=cfg.num_experts) / len(routed),
                               atol=1e-6, err_msg="expert_load")
    assert float(out["aux"].router_loss) == pytest.approx(router_loss_ref, rel=1e-5, abs=1e-7)
    assert set(out["grads"]) == set(g_ref)
    for name in g_ref:
        np.testing.assert_allclose(out["grads"][name], g_ref[name], rtol=1e-4, atol=1e-5, err_msg=name)
    if out["x_spec"] is not None:
        assert out["y_spec"] == out["x_spec"]
    return out, dropped_ref


@pytest.mark.parametrize("mesh_name", ["1dev", "d2e4", "d1e8"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("router", ["topk", "hash", "random"])
@pytest.mark.parametrize("drops", [False, True], ids=["nodrop", "drop"])
def test_layer_matches_oracle(router, k, mesh_name, drops):
    cfg = layer_spec(
        num_experts=E, experts_per_token=k, router=router,
        capacity_factor=0.5 if drops else float(E), activation="silu" if k == 2 else "gelu", gated=k == 2,
    )
    _, dropped = check_against_oracle(cfg, mesh_name)
    assert (dropped > 0) == drops


@pytest.mark.parametrize("mesh_name, activation, gated", [
    ("none", "silu", True), ("e4t2", "silu", True), ("d8e1", "gelu", True), ("d2e4", "silu", False),
])
def test_layer_matches_oracle_without_mesh_with_tensor_axis_and_other_ffns(mesh_name, activation, gated):
    cfg = layer_spec(num_experts=E, experts_per_token=2, router="topk", capacity_factor=1.0,
                    activation=activation, gated=gated)
    check_against_oracle(cfg, mesh_name)


@pytest.mark.parametrize("mesh_name, k, router", [
    ("none", 2, "topk"), ("1dev", 1, "topk"), ("d2e4", 1, "topk"), ("d2e4", 2, "hash"), ("d1e8", 2, "topk"),
    ("d1e8", 1, "random"), ("e4t2", 2, "topk"), ("d2e4", 2, "gshard"),
])
def test_dropless_dispatch_matches_oracle_and_drops_nothing(mesh_name, k, router):
    """Dropless: the capacity factor is ignored (0.5 here would drop under "capacity")."""
    cfg = layer_spec(
        num_experts=E, experts_per_token=k, router=router, dispatch="dropless",
        capacity_factor=0.5, activation="silu", gated=k == 2,
    )
    out, dropped = check_against_oracle(cfg, mesh_name)
    assert dropped == 0 and out["aux"].dropped_fraction == 0


@pytest.mark.parametrize("mesh_name, dispatch", [("d2e4", "capacity"), ("e4t2", "dropless"), ("d1e8", "dropless")])
def test_expert_biases_clamped_swiglu_and_router_bias_match_oracle(mesh_name, dispatch):
    """GPT-OSS's MoE layer: a bias after each expert projection (added once after the tensor axis's
    sum), the clamped SwiGLU, a bias on the router's logits; with drops (capacity) and through the
    grouped matmul (dropless), whose rows past the groups stay zero."""
    cfg = layer_spec(num_experts=E, experts_per_token=2, router="topk", dispatch=dispatch, capacity_factor=1.0,
                     activation="silu", gated=True, ffn_bias=True, swiglu_limit=0.5, router_bias=True)
    out, dropped = check_against_oracle(cfg, mesh_name)
    assert {"router_b", "bi", "bg", "bo"} <= set(out["grads"])
    assert (dropped > 0) == (dispatch == "capacity")


@pytest.mark.parametrize("mesh_name, impl", [("d2e4", "megablox"), ("e4t2", "megablox"), ("d1e8", "tokamax")])
def test_dropless_dispatch_with_a_grouped_matmul_kernel_matches_oracle(mesh_name, impl):
    """The experts' grouped matmul through the Megablox kernel (Pallas interpret mode on CPU) and
    through tokamax (its reference implementation off the GPU): the same oracle, forward and
    gradients, with the expert axis and the tensor axis (e4t2 splits each expert's hidden width)."""
    cfg = layer_spec(num_experts=E, experts_per_token=2, dispatch="dropless", activation="silu", gated=True,
                     grouped_matmul=impl)
    out, dropped = check_against_oracle(cfg, mesh_name)
    assert dropped == 0


def test_dropless_ragged_exchange_lowers_with_gradients():
    """The GPU/TPU exchange (ragged_all_to_all, which XLA:CPU cannot compile) traces and lowers
    forward and backward: two exchanges out and back, each with its transpose."""
    from flax import nnx

    from sharding import make_mesh

    cfg = layer_spec(num_experts=E, experts_per_token=2, dispatch="dropless", ragged_exchange=True)
    with jax.set_mesh(make_mesh(data=2, expert=4)):
        graphdef, state = nnx.split(cfg.build(rngs=nnx.Rngs(0)))
        x = jax.random.normal(jax.random.key(1), (8, 16, D), out_sharding=jax.P(("data", "expert")))

        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x)[0])

        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).as_text()
    assert hlo.count("ragged_all_to_all") == 4


@pytest.mark.parametrize("mesh_name, k", [("1dev", 1), ("d2e4", 2)])
def test_frozen_router_matches_oracle_and_has_no_gradient(mesh_name, k):
    """"frozen" routes exactly like "topk" from the same initial weights; its router_w is model
    state, not a parameter, so it gets no gradient (the oracle drops it too)."""
    kw = dict(d_model=D, d_ff=H, num_experts=E, experts_per_token=k, capacity_factor=1.0, gated=True)
    out, _ = check_against_oracle(layer_spec(router="frozen", **kw), mesh_name)
    assert "router_w" in out["params"] and "router_w" not in out["grads"]
    ref = run_layer(layer_spec(router="topk", **kw), mesh_name, *make_inputs(0))
    np.testing.assert_allclose(out["y"], ref["y"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["params"]["router_w"], ref["params"]["router_w"])


@pytest.mark.parametrize("mesh_name, k", [("1dev", 2), ("d2e4", 1)])
def test_bigram_hash_router_matches_oracle(mesh_name, k):
    cfg = layer_spec(num_experts=E, experts_per_token=k, router="bigram_hash", capacity_factor=1.0)
    check_against_oracle(cfg, mesh_name)


def test_bigram_hash_routes_by_the_pair_of_tokens():
    from moe.routers.hashing import bigram_hash_route, hash_route

    cur = jnp.asarray([[5, 5, 5, 5, 7, 5]], jnp.int32)
    prev = jnp.asarray([[1, 2, 3, 1, 1, 1]], jnp.int32)
    ids = np.asarray(bigram_hash_route(prev, cur, 64, 1, 0).expert_ids)[0, :, 0]
    assert ids[0] == ids[3] == ids[5]  # the pair (1, 5) always goes to the same expert
    assert len({ids[0], ids[1], ids[2]}) > 1  # token 5 after 1, 2, 3: not one fixed expert
    uni = np.asarray(hash_route(cur, 64, 1, 0).expert_ids)[0, :, 0]
    assert len(set(uni[[0, 1, 2, 3, 5]])) == 1  # the unigram hash cannot tell them apart


def test_balanced_hash_router_matches_oracle():
    cfg = layer_spec(num_experts=E, experts_per_token=2, router="balanced_hash", vocab_size=50,
                    capacity_factor=1.0)
    check_against_oracle(cfg, "d2e4")


def test_balanced_table_balances_the_training_mass_and_keeps_hash_for_unseen_ids():
    from moe.routers.hashing import balanced_table, hash_table

    counts = (1000.0 / np.arange(1, 201) ** 1.1).round()  # Zipf-like: no id above 1/8 of the mass...
    counts[0] = counts.sum() / 10
    counts[150:] = 0  # ...and 50 ids never seen
    for k in (1, 2):
        table = balanced_table(counts, 8, k, seed=0)
        assert table.shape == (200, k) and all(len(set(row)) == k for row in table)
        mass = np.zeros(8)
        for token, experts in enumerate(table):
            mass[experts] += counts[token] / k
        assert mass.max() / mass.mean() < 1.02  # balanced
        hashed = hash_table(200, 8, k, seed=0)
        hashed_mass = np.zeros(8)
        for token, experts in enumerate(hashed):
            hashed_mass[experts] += counts[token] / k
        assert hashed_mass.max() / hashed_mass.mean() > 1.2  # the plain hash is not
        np.testing.assert_array_equal(table[150:], hashed[150:])  # unseen ids: hash experts


@pytest.mark.parametrize("mesh_name, cf", [("1dev", 8.0), ("d2e4", 0.5)])
def test_gshard_router_matches_oracle(mesh_name, cf):
    """Unused second choices take no capacity and are not counted as dropped (the oracle skips them)."""
    cfg = layer_spec(num_experts=E, experts_per_token=2, router="gshard", capacity_factor=cf)
    out, dropped = check_against_oracle(cfg, mesh_name)
    assert (dropped > 0) == (cf < 1)


@pytest.mark.parametrize("mesh_name, router", [("1dev", "topk"), ("d2e4", "gshard")])
def test_choice_major_capacity_priority_matches_oracle(mesh_name, router):
    """GShard's order (every first choice before any second) is a layer option: the oracle walks
    its groups in that order."""
    cfg = layer_spec(num_experts=E, experts_per_token=2, router=router, capacity_factor=0.5,
                    capacity_priority="choice")
    _, dropped = check_against_oracle(cfg, mesh_name)
    assert dropped > 0


def test_gshard_uses_the_second_expert_at_the_rate_of_its_gate():
    from moe.routers.base import top_k
    from moe.routers.gshard import gshard_route

    b, s, e, threshold = 16, 512, 8, 0.2
    logits = 2.0 * jax.random.normal(jax.random.key(0), (b, s, e))
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    r = gshard_route(logits, jax.random.key(1), positions, threshold)
    top, _ = top_k(jax.nn.softmax(logits, axis=-1), 2)
    g2 = np.asarray(top[..., 1] / top.sum(-1))
    expected = np.minimum(1.0, g2 / threshold).mean()
    used = np.asarray(r.expert_ids[..., 1] < e)
    n = used.size
    assert abs(used.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / n)  # binomial, 4 sigma
    assert 0.2 < used.mean() < 0.95  # the test is informative: some, not all, second choices used
    assert np.all(np.asarray(r.gates[..., 1])[~used] == 0) and np.all(np.asarray(r.expert_ids[..., 0]) < e)
    assert float(jnp.sum(r.expert_load)) == pytest.approx(1.0, abs=1e-6)


def test_gshard_is_top_2():
    with pytest.raises(ValueError, match="MoEConfig.experts_per_token=1: the gshard router is top-2"):
        layer_spec(num_experts=E, experts_per_token=1, router="gshard")


@pytest.mark.parametrize("mesh_name, k", [("1dev", 1), ("d2e4", 2)])
def test_loss_free_router_matches_oracle(mesh_name, k):
    """Selection by probability + bias (the harness sets a bias that changes the choices), gates
    from the probabilities alone; eval mode, so the bias stays as set."""
    cfg = layer_spec(num_experts=E, experts_per_token=k, router="loss_free", gated=True)
    check_against_oracle(cfg, mesh_name, deterministic=True)


def test_loss_free_bias_moves_toward_balance_outside_the_gradient():
    from flax import nnx

    cfg = layer_spec(num_experts=E, router="loss_free", gamma=0.02, capacity_factor=8.0)
    layer = cfg.build(rngs=nnx.Rngs(0))
    layer.router.w[...] = layer.router.w[...].at[:, 0].add(0.3)  # a router that favours expert 0
    x = jax.random.normal(jax.random.key(1), (8, 16, D))

    @nnx.jit
    def step(layer, x):
        (_, aux), grads = nnx.value_and_grad(lambda m: (lambda y, a: (jnp.sum(y), a))(*m(x)), has_aux=True)(layer)
        unchanged = layer.router.bias[...]  # the forward pass itself never moves the bias
        layer.update_router_state(aux.expert_load)  # once per training step
        return aux, grads, unchanged

    loads = []
    for _ in range(30):
        before = np.asarray(layer.router.bias[...])
        aux, grads, during = step(layer, x)
        np.testing.assert_array_equal(during, before)
        load = np.asarray(aux.expert_load)
        loads.append(load.max() * E)
        np.testing.assert_allclose(layer.router.bias[...], before + 0.02 * np.sign(load.mean() - load), atol=1e-7)
    assert "bias" not in grads["router"] and float(aux.aux_loss) == 0.0
    assert loads[0] > 2.0 and loads[-1] < 0.6 * loads[0]  # the overloaded expert sheds load
    assert np.asarray(layer.router.bias[...])[0] < 0  # ... because its bias went down


@pytest.mark.parametrize("mesh_name, dispatch, gated", [
    ("none", "capacity", True), ("1dev", "capacity", False), ("d2e4", "capacity", True), ("d1e8", "dropless", True),
    ("e4t2", "capacity", True),
])
def test_thor_training_runs_one_expert_on_every_token(mesh_name, dispatch, gated):
    """THOR in training: the drawn expert runs all tokens (no capacity, nothing dropped); only its
    weights get gradients (the oracle's other experts see no tokens)."""
    cfg = layer_spec(num_experts=E, router="thor", dispatch=dispatch, gated=gated, capacity_factor=0.5)
    out, dropped = check_against_oracle(cfg, mesh_name)
    expert = int(jax.random.randint(jax.random.key(7), (), 0, E))
    assert dropped == 0 and out["aux"].expert_load[expert] == 1.0
    touched = np.abs(out["grads"]["wi"]).sum(axis=(1, 2)) > 0
    assert touched.tolist() == [e == expert for e in range(E)]


@pytest.mark.parametrize("mesh_name, dispatch", [("1dev", "capacity"), ("d2e4", "dropless")])
def test_thor_evaluation_routes_each_token_to_a_random_expert(mesh_name, dispatch):
    cfg = layer_spec(num_experts=E, router="thor", dispatch=dispatch)
    out, dropped = check_against_oracle(cfg, mesh_name, deterministic=True)
    assert dropped == 0 and np.count_nonzero(out["aux"].expert_load) == E  # every expert used


@pytest.mark.parametrize("mesh_name, dispatch, group", [
    ("1dev", "capacity", 16), ("d2e4", "capacity", 16), ("d1e8", "dropless", None), ("e4t2", "capacity", 32),
    ("none", "dropless", 64),
])
def test_expert_choice_matches_oracle(mesh_name, dispatch, group):
    cfg = layer_spec(num_experts=E, router="expert_choice", dispatch=dispatch,
                    capacity_factor=1.0, capacity_group_size=group, gated=True, activation="silu")
    out, unrouted = check_against_oracle(cfg, mesh_name)
    np.testing.assert_allclose(out["aux"].expert_load, np.full(E, 1 / E), rtol=1e-6)  # C tokens each
    assert 0 < unrouted < 1  # some tokens got no expert (and others several)
