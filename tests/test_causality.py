"""Causality: no token changes the output of an earlier token of its own sequence.

For every router, both dispatches, k in {1, 2} where the router allows it and capacity factors
that drop, on one device and on the 8-device mesh, in training mode (and evaluation with an
eval capacity): perturbing token j (its id and its hidden state) leaves every output of its
sequence at positions < j bit-identical. The routers and options declared non-causal are shown
to leak, so the declaration is needed, and are refused by the language model.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_mesh
from harness import layer_spec
from moe.config import MoEConfig, TransformerConfig
from moe.routers import ROUTERS
from moe.transformer import Transformer
from sharding.rules import mesh_and_rules

B, S, D, H, E, VOCAB = 8, 24, 16, 32, 8, 50
ROW = 1  # the perturbed sequence (on one device, row 0 has already taken some slots)
POSITIONS = range(1, S)  # perturbed positions j, one at a time
CAUSAL_ROUTERS = [name for name, router in ROUTERS.items() if router.causal]


def allowed_k(router):
    return {"gshard": (2,), "thor": (1,)}.get(router, (1, 2))


@contextlib.contextmanager
def on_mesh(mesh_name):
    mesh = build_mesh(mesh_name)
    with mesh_and_rules(mesh, "ep") if mesh is not None else contextlib.nullcontext():
        yield mesh


def _batch_spec(mesh):
    return jax.P(tuple(a for a in ("data", "fsdp", "expert") if a in mesh.axis_names))


def perturbed_inputs(seed=0, positions=POSITIONS):
    """The inputs and, for each position j, a copy whose token (ROW, j) has a new id and hidden state."""
    kx, kt, kp = jax.random.split(jax.random.key(seed), 3)
    x = np.asarray(jax.random.normal(kx, (B, S, D), jnp.float32))
    ids = np.asarray(jax.random.randint(kt, (B, S), 0, VOCAB, jnp.int32))
    variants = []
    for n, j in enumerate(positions):
        x2, ids2 = x.copy(), ids.copy()
        x2[ROW, j] = np.asarray(jax.random.normal(jax.random.fold_in(kp, n), (D,)))
        ids2[ROW, j] = (ids[ROW, j] + 17) % VOCAB
        variants.append((j, x2, ids2))
    return x, ids, variants


def layer_outputs(cfg, mesh_name, inputs, deterministic=False):
    """y for each (x, ids) from one layer, one compile, the same parameters and draws."""
    with on_mesh(mesh_name) as mesh:
        layer = cfg.build(rngs=nnx.Rngs(0), vocab_size=VOCAB)
        if cfg.router == "loss_free":  # a bias that changes the choices
            layer.router.bias[...] = jnp.linspace(-0.02, 0.02, cfg.num_experts)
        if deterministic:
            layer.eval()
        graphdef, state = nnx.split(layer)
        key = jax.random.key(7)

        @jax.jit
        def forward(state, x, ids):
            y, _ = nnx.merge(graphdef, state)(x, ids, key=key)
            return y

        outs = []
        for x, ids in inputs:
            x, ids = jnp.asarray(x), jnp.asarray(ids)
            if mesh is not None:
                x, ids = (jax.sharding.reshard(a, _batch_spec(mesh)) for a in (x, ids))
            outs.append(np.asarray(forward(state, x, ids)))
    return outs


def earlier_changes(cfg, mesh_name, deterministic=False, positions=POSITIONS):
    """For each perturbed j: (largest change at positions < j of its row, at positions >= j)."""
    x, ids, variants = perturbed_inputs(positions=positions)
    ys = layer_outputs(cfg, mesh_name, [(x, ids)] + [(x2, ids2) for _, x2, ids2 in variants], deterministic)
    base = ys[0]
    return [
        (np.abs(y[ROW, :j] - base[ROW, :j]).max(), np.abs(y[ROW, j:] - base[ROW, j:]).max())
        for (j, _, _), y in zip(variants, ys[1:], strict=True)
    ]


def settings(router):
    """(dispatch, k, capacity_factor) for the router: both dispatches, every k, factors that drop."""
    for k in allowed_k(router):
        for cf in (0.5, 1.25):
            yield "capacity", k, cf
        yield "dropless", k, 1.25


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", ["1dev", "d2e4"])
@pytest.mark.parametrize("router", CAUSAL_ROUTERS)
def test_no_token_changes_an_earlier_one_in_training(router, mesh_name):
    dropped_somewhere = False
    for dispatch, k, cf in settings(router):
        cfg = layer_spec(num_experts=E, experts_per_token=k, router=router, dispatch=dispatch,
                         capacity_factor=cf, vocab_size=VOCAB)
        assert cfg.non_causal_reason() is None
        changes = earlier_changes(cfg, mesh_name)
        for earlier, _ in changes:
            assert earlier == 0.0, f"{dispatch} k={k} cf={cf}: an earlier output moved by {earlier}"
        assert max(later for _, later in changes) > 0  # the perturbations reached the layer
        dropped_somewhere |= dispatch == "capacity" and cf == 0.5
    assert dropped_somewhere


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "gshard", "random", "bigram_hash"])
def test_no_token_changes_an_earlier_one_in_evaluation_with_drops(router):
    k = max(allowed_k(router))
    cfg = layer_spec(num_experts=E, experts_per_token=k, router=router, eval_capacity_factor=0.5)
    changes = earlier_changes(cfg, "d2e4", deterministic=True)
    assert all(earlier == 0.0 for earlier, _ in changes) and max(later for _, later in changes) > 0


@pytest.mark.parametrize("mesh_name", ["1dev", "d2e4"])
@pytest.mark.parametrize("settings_", [
    dict(router="topk", experts_per_token=2, capacity_priority="choice"),
    dict(router="gshard", experts_per_token=2, capacity_priority="choice"),
    dict(router="expert_choice"),
], ids=["topk-choice-priority", "gshard-choice-priority", "expert_choice"])
def test_what_is_declared_non_causal_does_leak(settings_, mesh_name):
    """The declaration is needed: these settings do let a later token change an earlier output
    (capacity groups of one sequence)."""
    cfg = layer_spec(**{"d_model": D, "d_ff": H, "num_experts": E, "capacity_factor": 0.75, "capacity_group_size": S,
                       **settings_})
    assert cfg.non_causal_reason() is not None
    leaks = [earlier for earlier, _ in earlier_changes(cfg, mesh_name)]
    assert max(leaks) > 0


def tiny_lm(**kw) -> TransformerConfig:
    """A 2-block LM, MoE in both; MoE settings (router, k, dispatch, ...) go to its ``moe`` section."""
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    moe = dict(num_experts=E, capacity_factor=0.5)
    moe.update({k: v for k, v in kw.items() if k in moe_fields})
    base = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=2, d_ff=64, moe_every=1, moe=MoEConfig(**moe))
    base.update({k: v for k, v in kw.items() if k not in moe_fields})
    return TransformerConfig(**base)


def lm_logits(cfg, mesh_name, token_batches):
    """Training-mode logits for each token batch: one model, one compile, the same draws."""
    with on_mesh(mesh_name) as mesh:
        model = Transformer(cfg, rngs=nnx.Rngs(params=0, routing=1))
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
        outs = []
        for tokens in token_batches:
            tokens = jnp.asarray(tokens)
            if mesh is not None:
                tokens = jax.sharding.reshard(tokens, _batch_spec(mesh))
            outs.append(np.asarray(forward(state, tokens)))
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("router, mesh_name, dispatch", [
    *[(r, "d2e4", "capacity") for r in CAUSAL_ROUTERS],
    ("topk", "1dev", "capacity"), ("gshard", "1dev", "capacity"), ("topk", "d2e4", "dropless"),
])
def test_the_language_model_is_causal_in_training(router, mesh_name, dispatch):
    cfg = tiny_lm(router=router, experts_per_token=max(allowed_k(router)), dispatch=dispatch)
    _, ids, variants = perturbed_inputs()
    logits = lm_logits(cfg, mesh_name, [ids] + [ids2 for _, _, ids2 in variants])
    for (j, _, _), out in zip(variants, logits[1:], strict=True):
        np.testing.assert_array_equal(out[ROW, :j], logits[0][ROW, :j], err_msg=f"position {j}")
        assert np.abs(out[ROW, j:] - logits[0][ROW, j:]).max() > 0


@pytest.mark.parametrize("settings_, field", [
    (dict(router="expert_choice"), "router"),
    (dict(router="topk", experts_per_token=2, capacity_priority="choice"), "capacity_priority"),
])
def test_the_language_model_refuses_non_causal_settings_unless_allowed(settings_, field):
    cfg = tiny_lm(**settings_)
    assert cfg.non_causal_routing
    with pytest.raises(ValueError, match=rf"^TransformerConfig\.moe\.{field}=.*would see the future"):
        Transformer(cfg, rngs=nnx.Rngs(0))
    cfg.allow_non_causal_router = True
    Transformer(cfg, rngs=nnx.Rngs(0))


def test_choice_priority_is_causal_where_it_cannot_matter():
    """One choice per token, or no capacity at all: GShard's order changes nothing."""
    assert not tiny_lm(capacity_priority="choice", experts_per_token=1).non_causal_routing
    assert not tiny_lm(capacity_priority="choice", experts_per_token=2, dispatch="dropless").non_causal_routing
    assert not tiny_lm(capacity_priority="choice", experts_per_token=2, moe_every=0).non_causal_routing
