"""Router health telemetry (churn, H(expert | token id)) and the StableMoE router.

The telemetry's numbers are checked against hand-computed values and, through a whole training
run, against the routes of the saved parameters; the ``stable`` router is checked to be ``topk``
exactly in stage 1, a table router on any mesh in stage 2, and to freeze what it distilled.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_train_args
from harness import make_inputs, run_layer, layer_spec
from moe.routers.hashing import hash_table
from moe.routers.stable import balanced_choice, distill_loss
from train.services.telemetry import RoutingProbe, churn, token_entropy


# ---------------------------------------------------------------- the numbers
def test_token_entropy_by_hand():
    tokens = np.array([[5, 5, 5, 5, 7, 7]])
    # token 5 -> experts 0,0,1,1 (1 bit = log 2 nats), token 7 -> 3,3 (0): weighted by frequency 4/6, 2/6
    assert token_entropy(np.array([[0, 0, 1, 1, 3, 3]]), tokens, 4) == pytest.approx(4 / 6 * math.log(2))
    assert token_entropy(np.array([[2, 2, 2, 2, 1, 1]]), tokens, 4) == 0.0  # a token-level router
    # uniform over E experts for one token id: log E; an untaken slot (id E) is its own outcome
    assert token_entropy(np.arange(8)[None], np.zeros((1, 8), int), 8) == pytest.approx(math.log(8))
    assert token_entropy(np.array([[0, 4]]), np.zeros((1, 2), int), 4) == pytest.approx(math.log(2))


def test_churn_and_the_probe_between_logged_steps():
    assert churn(np.array([[0, 1, 2, 3]]), np.array([[0, 1, 3, 2]])) == 0.5
    tokens = np.array([[1, 2, 1, 2]])
    probe = RoutingProbe(tokens, 4, mask_BS=np.array([[True, True, True, False]]))
    first = probe.metrics({"layer3": np.array([[0, 1, 0, 9]]), "layer1": np.array([[0, 1, 2, 9]])})
    assert "moe/churn" not in first and "moe/layer1/churn" not in first  # nothing to compare with yet
    assert first["moe/layer3/token_entropy"] == 0.0  # the masked (padding) position is not counted
    assert first["moe/layer1/token_entropy"] == pytest.approx(2 / 3 * math.log(2))
    assert first["moe/token_entropy"] == pytest.approx(1 / 3 * math.log(2))
    second = probe.metrics({"layer3": np.array([[0, 1, 1, 0]]), "layer1": np.array([[0, 1, 2, 0]])})
    assert second["moe/layer3/churn"] == pytest.approx(1 / 3) and second["moe/layer1/churn"] == 0.0
    assert second["moe/churn"] == pytest.approx(1 / 6)


# ---------------------------------------------------------------- the stable router
def stable_spec(freeze, k=1, **kw):
    return layer_spec(num_experts=8, experts_per_token=k, router="stable", freeze_step=freeze, **kw)


@pytest.mark.parametrize("mesh_name, k", [("1dev", 1), ("d2e4", 2)])
def test_stable_router_in_stage_one_is_topk(mesh_name, k):
    """Before the freeze step: the same outputs and gradients as topk with the same weights and
    slots per expert (to float rounding: the gates are gathered, not top_k's values; the
    distillation's gradient reaches only its own logits)."""
    x, ids, ct = make_inputs()
    stable = run_layer(stable_spec(100, k, capacity_factor=1.0), mesh_name, x, ids, ct)
    # the same slots: stable's are sized for its balance option (1.25) equal shares per expert
    topk = run_layer(layer_spec(num_experts=8, experts_per_token=k, router="topk", capacity_factor=1.25),
                     mesh_name, x, ids, ct)
    # two programs computing the same sums: XLA may fuse (and so round) them differently
    np.testing.assert_allclose(stable["y"], topk["y"], rtol=1e-6, atol=1e-6 * np.abs(topk["y"]).max())
    for name in ("x", "wi", "wg", "wo", "router_w"):
        scale = np.abs(topk["grads"][name]).max()
        np.testing.assert_allclose(stable["grads"][name], topk["grads"][name], rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    assert float(stable["aux"].aux_loss) == float(topk["aux"].aux_loss) > 0
    assert float(stable["aux"].router_loss) > float(topk["aux"].router_loss)  # plus the distillation


def test_stable_router_in_stage_two_routes_by_its_table_on_any_mesh():
    """From the freeze step (here 0: the initial table, hash's) a token's experts are its id's row;
    the learned router gates them; no balance loss; the same outputs on 1 and 8 devices."""
    x, ids, ct = make_inputs()
    spec = stable_spec(0, k=2, capacity_factor=4.0, gate="softmax")  # no drops: layouts group tokens differently
    one, eight = run_layer(spec, "1dev", x, ids, ct), run_layer(spec, "d2e4", x, ids, ct)
    np.testing.assert_allclose(eight["y"], one["y"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eight["grads"]["router_w"], one["grads"]["router_w"], rtol=1e-4, atol=1e-6)
    assert float(one["aux"].aux_loss) == 0.0
    layer = spec.build(rngs=nnx.Rngs(0), vocab_size=50)
    route = layer.route(x, ids)
    table = hash_table(50, 8, 2, 0)
    np.testing.assert_array_equal(np.asarray(route.expert_ids), table[np.asarray(ids)])
    probs = jax.nn.softmax(jnp.einsum("bsd,de->bse", x, layer.router.w[...]), axis=-1)
    chosen = np.take_along_axis(np.asarray(probs), table[np.asarray(ids)], axis=-1)
    np.testing.assert_allclose(np.asarray(route.gates), chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)
    for gate, expected in (("sigmoid", None), ("one", np.full(chosen.shape, 0.5))):
        other = stable_spec(0, k=2, gate=gate).build(rngs=nnx.Rngs(0), vocab_size=50).route(x, ids)
        np.testing.assert_array_equal(np.asarray(other.expert_ids), table[np.asarray(ids)])
        if expected is None:  # StableMoE's: sigmoid of the chosen experts' logits
            logits = np.asarray(jnp.einsum("bsd,de->bse", x, layer.router.w[...]))
            expected = 1 / (1 + np.exp(-np.take_along_axis(logits, table[np.asarray(ids)], axis=-1)))
        np.testing.assert_allclose(np.asarray(other.gates), expected, rtol=1e-5)


def router_terms(aux):
    return {name: float(getattr(aux, name)) for name in ("aux_loss", "z_loss", "router_loss", "router_entropy")}


def test_stable_router_losses_come_from_what_routes():
    """Before the freeze: topk's balance loss, z-loss and entropy, and their gradients (the
    expert outputs carry no cotangent here, so the gradients are the router losses' alone).
    After it with gate one: the learned router neither routes nor gates, so no router loss, entropy
    0, and not one nonzero gradient from the router terms to its weights or to the layer's input;
    the total loss gives its weights none either. With the softmax gate its logits still gate:
    their z-loss and entropy stay."""
    x, ids, ct = make_inputs()
    no_ct = jnp.zeros_like(ct)
    topk = run_layer(layer_spec(num_experts=8, experts_per_token=2, router="topk", capacity_factor=1.25),
                     "1dev", x, ids, no_ct)
    before = run_layer(stable_spec(100, k=2, capacity_factor=1.0), "1dev", x, ids, no_ct)
    for name in ("aux_loss", "z_loss", "router_entropy"):
        assert float(getattr(before["aux"], name)) == float(getattr(topk["aux"], name)) > 0, name
    assert float(before["aux"].router_loss) > float(topk["aux"].router_loss)  # plus the distillation
    for name in ("x", "router_w"):
        np.testing.assert_allclose(before["grads"][name], topk["grads"][name], rtol=1e-6, atol=1e-9, err_msg=name)
        assert np.abs(topk["grads"][name]).max() > 0, name
    after = run_layer(stable_spec(0, k=2), "1dev", x, ids, no_ct)
    assert router_terms(after["aux"]) == {"aux_loss": 0.0, "z_loss": 0.0, "router_loss": 0.0, "router_entropy": 0.0}
    for name in ("x", "router_w"):
        assert not np.any(after["grads"][name]), name
    trained = run_layer(stable_spec(0, k=2), "1dev", x, ids, ct)
    assert not np.any(trained["grads"]["router_w"]) and np.abs(trained["grads"]["x"]).max() > 0
    gated = run_layer(stable_spec(0, k=2, gate="softmax"), "1dev", x, ids, no_ct)
    assert float(gated["aux"].z_loss) == float(topk["aux"].z_loss)
    assert float(gated["aux"].router_entropy) == float(topk["aux"].router_entropy)
    assert float(gated["aux"].aux_loss) == 0.0 and np.abs(gated["grads"]["router_w"]).max() > 0


def test_stable_capacity_is_sized_for_the_balanced_tables_share():
    """Slots per expert: capacity_factor x the balance option's equal shares (the cap of the frozen table's
    expert shares), as topk with that factor; the config's slots without a cap; no drops in eval
    without an eval capacity factor."""
    x, _, _ = make_inputs()

    def slots(router, **kw):
        return layer_spec(num_experts=8, experts_per_token=2, router=router, **kw).build(
            rngs=nnx.Rngs(0), vocab_size=50).plan(x).capacity

    group = x.shape[0] * x.shape[1]
    assert slots("stable", capacity_factor=1.0) == slots("topk", capacity_factor=1.25) == math.ceil(1.25 * 2 * group / 8)
    assert slots("stable", capacity_factor=1.0, balance=2.0) == slots("topk", capacity_factor=2.0)
    assert slots("stable", capacity_factor=1.0, balance=0) == slots("topk", capacity_factor=1.0)
    layer = stable_spec(0, k=2, eval_capacity_factor=0).build(rngs=nnx.Rngs(0), vocab_size=50)
    layer.eval()
    assert layer.plan(x).capacity == group


def test_stable_router_freezes_what_it_distilled_at_the_freeze_step():
    layer = stable_spec(3, k=2).build(rngs=nnx.Rngs(0), vocab_size=50)
    router = layer.router
    hashed = np.asarray(router.table[...]).copy()
    logits = np.zeros((50, 8), np.float32)
    logits[4] = [0, 3, 0, 0, 5, 0, 0, 0]  # -> experts 4, 1
    logits[9] = [1, 0, 0, 0, 0, 0, 0, 2]  # -> experts 7, 0
    router.distill[...] = jnp.asarray(logits)
    for step in (1, 2):
        router.update(jnp.full((8,), 1 / 8))
        assert int(router.step[...]) == step
        np.testing.assert_array_equal(np.asarray(router.table[...]), hashed)  # stage 1: the table waits
    router.update(jnp.full((8,), 1 / 8))  # the third step ends stage 1
    table = np.asarray(router.table[...])
    assert table[4].tolist() == [4, 1] and table[9].tolist() == [7, 0]
    unseen = [t for t in range(50) if t not in (4, 9)]
    np.testing.assert_array_equal(table[unseen], hashed[unseen])  # never distilled: hash's experts
    router.distill[...] = -jnp.asarray(logits)  # later changes of the logits move nothing
    router.update(jnp.full((8,), 1 / 8))
    np.testing.assert_array_equal(np.asarray(router.table[...]), table)


def greedy_balance(scores, counts, k, limit):
    """The reference: ids by decreasing count take their best experts with room, else the least loaded."""
    e = scores.shape[1]
    cap, mass, table = np.float32(limit * counts.sum() / e), np.zeros(e, np.float32), np.zeros((len(counts), k), int)
    for t in np.argsort(-counts, kind="stable"):
        free = np.ones(e, bool)
        for j in range(k):
            room = free & (mass + np.float32(counts[t] / k) <= cap)
            pick = np.argmax(np.where(room, scores[t], -np.inf)) if room.any() else np.argmin(np.where(free, mass, np.inf))
            table[t, j], free[pick] = pick, False
            mass[pick] += np.float32(counts[t] / k)
    return table


def test_balanced_freeze_caps_each_experts_share():
    by_hand = balanced_choice(jnp.array([[0.0, 0, 9, 0]] * 5), jnp.array([50.0, 30, 10, 5, 5]), 1, 1.0)
    # 50 and 30 exceed the cap (25) everywhere: the least loaded; then expert 2 (the best) until full
    assert np.asarray(by_hand)[:, 0].tolist() == [0, 1, 2, 2, 2]
    rng = np.random.default_rng(1)
    for k, limit in ((1, 1.2), (2, 1.0), (2, 1.5)):
        scores = rng.normal(size=(40, 8)).astype(np.float32)
        counts = rng.integers(0, 100, 40).astype(np.float32)
        got = np.asarray(jax.jit(balanced_choice, static_argnums=(2, 3))(scores, counts, k, limit))
        np.testing.assert_array_equal(got, greedy_balance(scores, counts, k, limit))
        if limit > 1:  # with room to spare every id fits under the cap
            mass = np.bincount(got.ravel(), np.repeat(counts / k, k), minlength=8)
            assert mass.max() <= limit * counts.sum() / 8 + 1e-3


def test_stable_balanced_freeze_uses_the_training_counts():
    layer = stable_spec(1, k=1, balance=1.0).build(rngs=nnx.Rngs(0), vocab_size=50)
    router = layer.router
    counts = np.zeros(50, np.float32)
    counts[:8] = 10  # eight equally common ids that all prefer expert 3
    router.fit(counts)
    logits = np.zeros((50, 8), np.float32)
    logits[:8, 3] = 1.0
    router.distill[...] = jnp.asarray(logits)
    router.update(jnp.full((8,), 1 / 8))
    assert sorted(np.asarray(router.table[...])[:8, 0].tolist()) == list(range(8))  # one id per expert


def test_distillation_learns_each_token_ids_majority_expert():
    """Minimising the distillation loss alone puts each token id's most frequent choice on top."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, (4, 40))
    majority = rng.integers(0, 8, 6)
    choices = np.where(rng.random((4, 40)) < 0.7, majority[tokens], rng.integers(0, 8, (4, 40)))
    logits = jnp.zeros((6, 8))
    grad = jax.jit(jax.grad(lambda t: distill_loss(t[jnp.asarray(tokens)], jnp.asarray(choices)[..., None])))
    for _ in range(300):
        logits = logits - 2.0 * grad(logits)
    for t in range(6):
        counts = np.bincount(choices[tokens == t], minlength=8)
        assert int(jnp.argmax(logits[t])) == int(np.argmax(counts)), t


# ---------------------------------------------------------------- a training run
def test_training_logs_router_health_and_stable_freezes(tmp_path, capsys):
    """A stable-router run (freeze after step 2): H(expert | token) > 0 while the router routes,
    0 from the freeze on; churn from the second probe, 0 after the switch; the plot is drawn."""
    from train.cli import plot_main, train_main

    workdir = tmp_path / "run"
    args = tiny_train_args(tmp_path, workdir, 5) + ["--config.model.moe.router=stable",
                                                     "--config.model.moe.router_options.stable.freeze_step=2",
                                                     "--config.model.moe.router_options.stable.gate=one"]
    assert train_main(args) == 0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    assert sorted(train) == [1, 2, 3, 4, 5]
    assert "moe/churn" not in train[1] and train[1]["moe/layer1/token_entropy"] > 0
    assert train[1]["moe/token_entropy"] == train[1]["moe/layer1/token_entropy"]
    for step in (2, 3, 4, 5):
        assert train[step]["moe/token_entropy"] == 0.0, step  # the table routes from the freeze on
    assert train[2]["moe/churn"] > 0  # the switch itself moves tokens
    assert [train[s]["moe/churn"] for s in (3, 4, 5)] == [0.0, 0.0, 0.0]
    assert train[2]["moe/aux_loss"] > 0 and train[3]["moe/aux_loss"] == 0.0  # no balance loss in stage 2
    capsys.readouterr()
    assert plot_main([f"--workdir={workdir}"]) == 0
    assert "routing_health.png" in capsys.readouterr().out
