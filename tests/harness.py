"""Runs the MoE layer on a named mesh and returns outputs, aux and gradients as NumPy."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import build_mesh
from moe import MoEFeedForward
from sharding.rules import use_rules

B, S, D, H, E = 8, 16, 16, 32, 8
PARAM_NAMES = ("router_w", "wi", "wg", "wo", "hash_table", "expert_bias")


def make_inputs(seed=0, b=B, s=S):
    kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (b, s, D), jnp.float32)
    token_ids = jax.random.randint(kt, (b, s), 0, 50, jnp.int32)
    ct = jax.random.normal(kc, (b, s, D), jnp.float32)  # cotangent for the gradient check
    return x, token_ids, ct


def run_layer(cfg, mesh_name, x, token_ids, ct, key=None, deterministic=False):
    """Forward + gradients of sum(y * ct) + router_loss on the named mesh; all results as NumPy."""
    mesh = build_mesh(mesh_name)
    rules = "ep+tp" if mesh is not None and "tensor" in mesh.axis_names else "ep"
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(), use_rules(rules):
        layer = MoEFeedForward(cfg, rngs=nnx.Rngs(0))
        if cfg.router == "loss_free":  # a bias that changes the choices (eval mode keeps it fixed)
            layer.expert_bias[...] = jnp.linspace(-0.3, 0.3, cfg.num_experts)
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
        grads = {n: np.asarray(g_layer[n][...]) for n in params if n in g_layer}  # frozen router_w: none
        grads["x"] = np.asarray(g_x)
        aux = jax.tree.map(np.asarray, aux)
    return dict(y=np.asarray(y), aux=aux, params=params, grads=grads, x_spec=x_sharding, y_spec=y_sharding)
