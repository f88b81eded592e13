"""Scanned blocks (``model.scan_layers``) and rematerialisation (``model.remat``): the same model,
the same numbers, and checkpoints that move between the two layouts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_mesh, on_both_stacks, stack
from moe import layout
from moe.config import REMAT_POLICIES, TransformerConfig
from moe.transformer import Transformer
from sharding.rules import logical_to_spec, mesh_and_rules
from train.core.checkpoint import to_nested

V = 64


def model_config(router="topk", **kw) -> TransformerConfig:
    """5 blocks, an MoE block every second one: scanned, that is 2 repeats of (dense, MoE) and one
    dense block after them."""
    jitter = kw.pop("router_jitter", 0.0)
    cfg = TransformerConfig(vocab_size=V, num_layers=5, d_model=32, num_heads=2, d_ff=64, moe_every=2, **kw)
    cfg.moe.num_experts, cfg.moe.router, cfg.moe.capacity_factor = 4, router, 1.0
    cfg.moe.router_jitter = jitter
    return cfg


def build(cfg: TransformerConfig):
    """(graphdef, params, rest) of a model built under jit, as the trainer builds it."""

    def make():
        return Transformer(cfg, rngs=nnx.Rngs(params=0, routing=1))

    graphdef, _, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    params, rest = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[1:])()
    return graphdef, params, rest


def tokens_on(mesh, b=8, s=16):
    tokens = jax.random.randint(jax.random.key(3), (b, s), 0, V)
    return tokens if mesh is None else jax.sharding.reshard(tokens, jax.P(("data", "expert")))


def loss_and_grads(cfg: TransformerConfig, mesh):
    """Loss (mean squared logits + router losses), gradients, per-layer aux, the router state after
    one ``update_router_state``, and the parameters: all as unrolled nested dicts of NumPy."""
    with mesh_and_rules(mesh, "ep"):
        graphdef, params, rest = build(cfg)
        tokens = tokens_on(mesh)

        def step(params, rest):  # as the training step: RNG streams and router state move
            model = nnx.merge(graphdef, params, rest)

            def loss(model):
                logits, aux = model(tokens)
                return jnp.mean(jnp.square(logits)) + aux.router_loss, aux

            (value, aux), grads = nnx.value_and_grad(loss, has_aux=True)(model)
            model.update_router_state(aux)
            return value, aux, grads, nnx.state(model, nnx.Not(nnx.Param))

        value, aux, grads, new_rest = jax.jit(step)(params, rest)
    unrolled = lambda tree: jax.tree.map(np.asarray, layout.unroll(to_nested(tree), cfg.period))  # noqa: E731
    return {"loss": np.asarray(value), "grads": unrolled(grads), "params": unrolled(params),
            "state": unrolled(new_rest), "per_layer": jax.tree.map(np.asarray, aux.per_layer)}


# the full forward pass as one program (eagerly, every operation around the scan is a program of its own)
forward = nnx.jit(lambda model, tokens: model(tokens)[0])


def assert_same(a: dict, b: dict, exact_grads=False):
    assert a["loss"] == b["loss"]  # bit for bit
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    jax.tree.map(np.testing.assert_array_equal, a["state"], b["state"])
    jax.tree.map(np.testing.assert_array_equal, a["per_layer"], b["per_layer"])
    check = np.testing.assert_array_equal if exact_grads else (
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8))
    jax.tree.map(check, a["grads"], b["grads"])


@stack
def test_scanned_model_equals_the_unrolled_one_on_a_mesh():
    """Same parameters from the same seed, the same loss bit for bit, the same gradients, per-layer
    statistics, RNG draws (router jitter) and router-state updates (loss_free's bias), on the
    8-device mesh."""
    mesh = build_mesh("d2e4")
    unrolled = loss_and_grads(model_config("loss_free", scan_layers="off", router_jitter=0.1), mesh)
    scanned = loss_and_grads(model_config("loss_free", scan_layers="on", router_jitter=0.1), mesh)
    assert sorted(scanned["per_layer"]) == ["layer1", "layer3"]
    assert_same(scanned, unrolled)


def test_scanned_eval_draws_are_those_of_each_layer():
    """In eval mode the random router's fixed draws are keyed by the block index, which a scanned
    block receives from the scan: the same logits as unrolled, and layers that differ."""
    mesh = build_mesh("d2e4")
    logits = {}
    for scan in ("on", "off"):
        with mesh_and_rules(mesh, "ep"):
            graphdef, params, rest = build(model_config("random", scan_layers=scan))
            model = nnx.merge(graphdef, params, rest)
            model.eval()
            tokens = tokens_on(mesh)
            out = nnx.jit(lambda m, t: (m(t)[0], m(t)[1].per_layer))(model, tokens)
            logits[scan] = jax.tree.map(np.asarray, out)
    jax.tree.map(np.testing.assert_array_equal, logits["on"], logits["off"])
    loads = logits["on"][1]
    assert not np.array_equal(loads["layer1"].expert_load, loads["layer3"].expert_load)


def test_a_dense_model_scans_every_block():
    cfg = model_config(scan_layers="on")
    cfg.moe_every = 0
    assert cfg.scan_repeats == 5
    assert_same(loss_and_grads(cfg, None), loss_and_grads(dataclasses.replace(cfg, scan_layers="off"), None))


def test_scan_layers_auto_scans_from_eight_layers():
    cfg = model_config(scan_layers="auto")
    assert cfg.scan_repeats == 0  # 5 layers: unrolled
    cfg.num_layers = 9
    assert cfg.scan_repeats == 4  # 4 x (dense, MoE), then one dense block unrolled
    cfg.scan_layers = "off"
    assert cfg.scan_repeats == 0
    cfg.scan_layers, cfg.num_layers = "on", 3
    assert cfg.scan_repeats == 0  # one repeat: nothing to scan


@functools.cache
def no_remat_on_a_mesh() -> dict:
    return loss_and_grads(model_config("random", scan_layers="on"), build_mesh("d2e4"))


# (scan_layers, remat): every policy on the scanned pattern and full remat of unrolled blocks; the second
# lane checks the policy that combines the others' and the unrolled one
REMATTED = [("on", policy) for policy in REMAT_POLICIES[1:]] + [("off", "full")]


@pytest.mark.slow
@pytest.mark.parametrize("scan, policy", on_both_stacks(REMATTED, ("on", "save_dots_exchange"), ("off", "full")),
                         ids=[f"{p}-{'scanned' if s == 'on' else 'unrolled'}" for s, p in REMATTED])
def test_every_remat_policy_gives_the_same_loss_and_gradients(scan, policy):
    """With random routing: the recomputed forward pass draws what the first one drew."""
    mesh = build_mesh("d2e4")
    assert_same(loss_and_grads(model_config("random", scan_layers=scan, remat=policy), mesh), no_remat_on_a_mesh())


@stack
def test_full_remat_keeps_less_for_the_backward_pass():
    """XLA's temporary bytes of the compiled gradient: full remat < none."""
    temp = {}
    for policy in ("none", "full"):
        cfg = model_config(scan_layers="on", remat=policy)
        cfg.num_layers, cfg.d_ff = 8, 256
        graphdef, params, rest = build(cfg)
        tokens = jax.random.randint(jax.random.key(0), (8, 128), 0, V)

        def loss(params):
            return jnp.mean(nnx.merge(graphdef, params, rest)(tokens)[0])

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["full"] < temp["none"] / 2, temp


def test_scanned_decoding_equals_the_full_forward_pass():
    cfg = model_config("random", scan_layers="on")
    graphdef, params, rest = build(cfg)
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, V)
    full = np.asarray(forward(model, tokens))
    cache = model.init_cache(2, 8)
    assert cache["stack"][0]["k"].shape[0] == 2  # stacked over the repeats
    decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
    logits, cache = decode(model, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)), cache)  # prefill
    steps = [np.asarray(logits)]
    for t in range(5, 8):
        logits, cache = decode(model, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


@stack
def test_windowed_and_full_blocks_scan_as_one_pattern():
    """GPT-OSS's blocks (a window of 3 positions on blocks 0, 2, 4, full attention on 1 and 3, sinks,
    biases, the clamped SwiGLU, a biased router; an MoE layer in every block): the scanned pattern
    is the two kinds of block (``period`` 2, though every block is MoE), with the unrolled model's
    loss bit for bit and its gradients; decoding through the scanned windowed cache equals the
    full forward pass."""
    pieces = dict(moe_every=1, sliding_window=3, full_attention_every=2, attn_bias=True, attn_out_bias=True,
                  attn_sinks=True, ffn_bias=True, swiglu_limit=1.0)
    configs = {scan: dataclasses.replace(model_config(scan_layers=scan), **pieces) for scan in ("on", "off")}
    for cfg in configs.values():
        cfg.moe.router_bias = True
    assert configs["on"].period == 2 and configs["on"].scan_repeats == 2
    mesh = build_mesh("d2e4")
    scanned, unrolled = loss_and_grads(configs["on"], mesh), loss_and_grads(configs["off"], mesh)
    assert_same(scanned, unrolled)
    assert "sinks" in scanned["params"]["blocks"]["2"]["attn"] and "bo" in scanned["params"]["blocks"]["3"]["ffn"]
    graphdef, params, rest = build(configs["on"])
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, V)
    full = np.asarray(forward(model, tokens))
    cache = model.init_cache(2, 8)
    decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
    logits, cache = decode(model, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)), cache)
    steps = [np.asarray(logits)]
    for t in range(5, 8):
        logits, cache = decode(model, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    model.stack.pattern[0].attn.window = 0  # the same parameters without the window: other logits
    assert not np.allclose(np.asarray(forward(model, tokens)), full, atol=1e-3)


def test_layout_maps_scanned_and_unrolled_trees_both_ways():
    blocks = {str(i): {"attn": {"wq": np.full((2,), i)}} for i in range(5)}
    tree = {"params": {"embed": 0, "blocks": blocks}, "opt": {"mu": {"blocks": dict(blocks)}}}
    scanned = layout.scan(tree, period=2, repeats=2)
    np.testing.assert_array_equal(scanned["params"]["stack"]["pattern"]["1"]["attn"]["wq"], [[1, 1], [3, 3]])
    assert list(scanned["params"]["blocks"]) == ["0"] and scanned["params"]["blocks"]["0"]["attn"]["wq"][0] == 4
    assert "stack" in scanned["opt"]["mu"] and layout.stack_shape(scanned) == (2, 2, 0)
    back = layout.unroll(scanned, period=2)
    jax.tree.map(np.testing.assert_array_equal, back, tree)


@pytest.mark.slow
@stack
def test_checkpoints_move_between_scanned_and_unrolled(tmp_path):
    """A run trained scanned evaluates unrolled (and the reverse) with the same loss, and resumes
    unrolled with the step the scanned run takes next (equal to float rounding: XLA fuses a
    scanned body and unrolled blocks differently)."""
    from test_train import tiny_config
    from train.core.setup import setup
    from train.inference.evaluate import evaluate_run, load_run

    def steps(cfg, workdir, n, save_at=None):
        run, state = setup(cfg, workdir)
        losses = []
        with run.context():
            for _ in range(n):
                batch = run.global_batch(next(run.batches))
                state, metrics = run.train_step(state, batch)
                losses.append(float(metrics["loss"]))
                if len(losses) == save_at:
                    run.save_checkpoint(state, save_at, force=True)
                    run.checkpoints.wait()
        run.close()
        return losses

    cfg = tiny_config(tmp_path)  # 2 MoE blocks: scanned, 2 repeats of one block
    cfg.model.moe.router, cfg.model.moe.router_options.loss_free.gamma, cfg.model.scan_layers = "loss_free", 0.01, "on"
    scanned = steps(cfg, tmp_path / "scanned", 3, save_at=2)
    evals = {mode: evaluate_run(load_run(tmp_path / "scanned", scan_layers=mode), max_batches=1, log=lambda m: None)
             for mode in ("on", "off")}
    assert evals["on"]["loss"] == evals["off"]["loss"]
    cfg.model.scan_layers = "off"
    resumed = steps(cfg, tmp_path / "scanned", 1)  # restores step 2 unrolled (the optimizer moments too)
    np.testing.assert_allclose(resumed, scanned[2:], rtol=1e-6)
    unrolled = steps(cfg, tmp_path / "unrolled", 2, save_at=2)  # and the reverse
    np.testing.assert_allclose(unrolled, scanned[:2], rtol=1e-6)
    back = evaluate_run(load_run(tmp_path / "unrolled", scan_layers="on"), max_batches=1, log=lambda m: None)
    assert back["loss"] == evaluate_run(load_run(tmp_path / "unrolled"), max_batches=1, log=lambda m: None)["loss"]


def test_routers_fit_their_tables_in_every_scanned_layer():
    """balanced_hash learns its table from token counts before training: in every repeat of a
    scanned MoE block, as in the unrolled blocks."""
    counts = np.random.default_rng(0).integers(1, 1000, V)
    tables = {}
    for scan in ("on", "off"):
        cfg = model_config("balanced_hash", scan_layers=scan)
        graphdef, params, rest = build(cfg)
        model = nnx.merge(graphdef, params, rest)
        before = layout.unroll(to_nested(nnx.state(model, nnx.Not(nnx.Param))), cfg.period)
        model.fit_routers(counts)
        tables[scan] = layout.unroll(to_nested(nnx.state(model, nnx.Not(nnx.Param))), cfg.period)
    assert sorted(tables["on"]["blocks"]) == ["1", "3"]
    assert not np.array_equal(tables["on"]["blocks"]["3"]["ffn"]["router"]["table"], before["blocks"]["3"]["ffn"]["router"]["table"])
    jax.tree.map(np.testing.assert_array_equal, tables["on"], tables["off"])


@stack
@pytest.mark.parametrize("rules, sizes", [("ep+tp", dict(expert=4, tensor=2)), ("fsdp+tp", dict(fsdp=4, tensor=2))])
def test_a_scanned_body_computes_with_the_unrolled_models_shardings(monkeypatch, rules, sizes):
    """Every parameter a forward pass gathers (``compute_value``) gets the same compute spec inside
    the scanned body as in the unrolled blocks, grouped-query attention included: the stacked
    ``layers`` axis of a variable's metadata never reaches the body (JAX 0.10 trimmed such a spec
    silently, re-splitting k/v from heads to head_dim; 0.11 refuses it)."""
    import moe.params as params_mod
    from sharding import make_mesh

    real, seen = params_mod.logical_to_spec, {}

    def recording(axes, mesh=None, rules=None, *, compute=False):
        spec = real(axes, mesh, rules, compute=compute)
        if compute:
            seen.setdefault(mode, set()).add((tuple(axes), tuple(spec)))
        return spec

    monkeypatch.setattr(params_mod, "logical_to_spec", recording)
    mesh = make_mesh(devices=jax.devices()[:8], **sizes)
    for mode in ("on", "off"):
        cfg = dataclasses.replace(model_config(scan_layers=mode), num_heads=4, num_kv_heads=2, attn_bias=True)
        with mesh_and_rules(mesh, rules):
            graphdef, params, rest = build(cfg)
            tokens = jax.sharding.reshard(jax.random.randint(jax.random.key(3), (8, 16), 0, V),
                                          logical_to_spec(("batch", "seq"), mesh))
            jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r)(t)[0]).lower(params, rest, tokens)  # traces the body
    assert ("embed", "kv_heads", "head_dim") in {axes for axes, _ in seen["off"]}
    assert seen["on"] == seen["off"]


@stack
def test_compute_value_refuses_axes_that_do_not_name_every_dimension():
    from moe.params import compute_value, sharded_param

    var = sharded_param(jax.random.key(0), (4, 8), ("embed", "mlp"), 1.0, jnp.float32)
    with pytest.raises(ValueError, match=r"logical axes \('layers', 'embed', 'mlp'\) for a value of shape \(4, 8\)"):
        compute_value(var, ("layers", "embed", "mlp"))


@stack
def test_the_same_parameters_are_decayed_scanned_and_unrolled():
    """Weight decay by meaning: matrices and tensors (a stacked ``layers`` axis does not count),
    never norm scales (QK-norm over a whole projection is 2-D), biases or the stable router's
    distilled table."""
    from train.core.optimizer import decay_mask

    masks = {}
    for mode in ("on", "off"):
        cfg = dataclasses.replace(model_config("stable", scan_layers=mode), attn_bias=True, qk_norm="proj")
        _, params, _ = build(cfg)
        full = jax.tree.map(lambda m, p: np.full(p.shape, m), decay_mask(params), params)  # stackable
        masks[mode] = jax.tree.map(lambda a: bool(a.all()), layout.unroll(to_nested(full), cfg.period))
    assert masks["on"] == masks["off"]
    m = masks["off"]
    assert m["embed"]
    attn, moe_block = m["blocks"]["1"]["attn"], m["blocks"]["1"]["ffn"]
    assert attn["wq"] and attn["wk"] and attn["wo"] and moe_block["wi"] and moe_block["router"]["w"]
    assert not (attn["bq"] or attn["bk"] or attn["q_norm"]["scale"] or m["blocks"]["1"]["attn_norm"]["scale"])
    assert not moe_block["router"]["distill"]


@stack
def test_an_unrolled_model_is_initialised_through_the_scan_with_the_same_draws():
    """Unrolled parameters and model state (RNG streams, router state) come from the scanned
    initialisation, unstacked (one block pattern to compile, not every block), bit for bit what
    building the unrolled blocks one by one draws; dense first blocks included."""
    from train.core.config import Config
    from train.core.optimizer import make_optimizer
    from train.core.setup import state_init

    cfg = Config()
    cfg.model = dataclasses.replace(model_config("loss_free", scan_layers="off"), num_layers=7, first_dense_layers=2)
    assert cfg.model.scan_repeats == 0 and dataclasses.replace(cfg.model, scan_layers="on").scan_repeats == 2
    tx, _ = make_optimizer(cfg.optimizer, 10)
    graphdef, _, _, init = state_init(cfg, tx)
    assert "scan" in str(jax.make_jaxpr(init)())
    state = jax.jit(init)()
    _, params, rest = build(cfg.model)  # block by block
    for got, want in ((state.params, params), (state.model_state, rest)):
        jax.tree.map(np.testing.assert_array_equal, to_nested(got), to_nested(want))
    assert sorted(to_nested(state.params)["blocks"], key=int) == [str(i) for i in range(7)]
