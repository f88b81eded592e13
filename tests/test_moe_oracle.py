"""Oracle tests: the sharded MoE layer equals a naive per-expert loop, forward and gradients."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import build_mesh
from moe import MoEConfig, MoEFeedForward
from oracle import make_oracle, oracle_routing

B, S, D, H, E = 8, 16, 16, 32, 8
PARAM_NAMES = ("router_w", "wi", "wg", "wo")


def _inputs(seed=0):
    kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (B, S, D), jnp.float32)
    token_ids = jax.random.randint(kt, (B, S), 0, 50, jnp.int32)
    ct = jax.random.normal(kc, (B, S, D), jnp.float32)  # cotangent for the gradient check
    return x, token_ids, ct


def run_layer(cfg, mesh_name, x, token_ids, ct, key=None, deterministic=False):
    """Forward + gradients of sum(y * ct) + router_loss on the named mesh; all results as NumPy."""
    mesh = build_mesh(mesh_name)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        layer = MoEFeedForward(cfg, rngs=nnx.Rngs(0))
        if deterministic:
            layer.eval()
        if mesh is not None:
            batch = jax.P(tuple(a for a in ("data", "fsdp", "expert") if a in mesh.axis_names))
            x, token_ids, ct = (jax.sharding.reshard(a, batch) for a in (x, token_ids, ct))

        def loss_fn(layer, x):
            y, aux = layer(x, token_ids, key=key)
            return jnp.sum(y * ct) + aux["router_loss"], (y, aux)

        step = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
        (_, (y, aux)), (g_layer, g_x) = step(layer, x)
        x_sharding = jax.typeof(x).sharding.spec if mesh is not None else None
        y_sharding = jax.typeof(y).sharding.spec if mesh is not None else None
        params = {n: np.asarray(getattr(layer, n)[...]) for n in PARAM_NAMES if hasattr(layer, n)}
        grads = {n: np.asarray(g_layer[n][...]) for n in params}
        grads["x"] = np.asarray(g_x)
        aux = jax.tree.map(np.asarray, aux)
    return dict(y=np.asarray(y), aux=aux, params=params, grads=grads, x_spec=x_sharding, y_spec=y_sharding)


def oracle(cfg, out, x, token_ids, ct, num_groups, key=None, deterministic=False):
    params = {n: jnp.asarray(v) for n, v in out["params"].items()}
    ids = oracle_routing(cfg, params, x, token_ids, key)
    capacity = cfg.capacity(B * S // num_groups, deterministic)
    f = make_oracle(cfg, ids, num_groups, capacity)

    def loss(params, x):
        y, router_loss, _ = f(params, x)
        return jnp.sum(y * ct) + router_loss

    y, _, dropped = f(params, x)
    grads, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    grads = {n: np.asarray(v) for n, v in grads.items()}
    grads["x"] = np.asarray(g_x)
    return np.asarray(y), grads, dropped


GROUPS = {"none": 1, "1dev": 1, "d2e4": 8, "d1e8": 8, "e4t2": 4}


def check_against_oracle(cfg, mesh_name, seed=0, deterministic=False):
    x, token_ids, ct = _inputs(seed)
    key = jax.random.key(7) if cfg.router == "random" else None
    out = run_layer(cfg, mesh_name, x, token_ids, ct, key=key, deterministic=deterministic)
    y_ref, g_ref, dropped_ref = oracle(cfg, out, x, token_ids, ct, GROUPS[mesh_name], key, deterministic)
    np.testing.assert_allclose(out["y"], y_ref, rtol=1e-5, atol=1e-5)
    assert out["aux"]["dropped_fraction"] == pytest.approx(dropped_ref, abs=1e-7)
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
    cfg = MoEConfig(
        d_model=D, d_ff=H, num_experts=E, experts_per_token=k, router=router,
        capacity_factor=0.5 if drops else float(E), activation="silu" if k == 2 else "gelu", gated=k == 2,
    )
    _, dropped = check_against_oracle(cfg, mesh_name)
    assert (dropped > 0) == drops


@pytest.mark.parametrize("mesh_name", ["none", "e4t2"])
def test_layer_matches_oracle_without_mesh_and_with_tensor_axis(mesh_name):
    cfg = MoEConfig(d_model=D, d_ff=H, num_experts=E, experts_per_token=2, router="topk", capacity_factor=1.0)
    check_against_oracle(cfg, mesh_name)
