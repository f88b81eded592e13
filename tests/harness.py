"""Runs the MoE layer on a named mesh and returns outputs, aux and gradients as NumPy."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import build_mesh
from moe import FFNConfig, MoEConfig, MoEFeedForward
from sharding.rules import use_rules

B, S, D, H, E = 8, 16, 16, 32, 8
FFN_FIELDS = {f.name for f in dataclasses.fields(FFNConfig)}
MOE_FIELDS = {f.name for f in dataclasses.fields(MoEConfig)}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer's MoE settings and FFN shape in one object: ``spec.router``, ``spec.gated`` and
    ``spec.capacity(...)`` read whichever part has them."""

    moe: MoEConfig
    ffn: FFNConfig

    def __getattr__(self, name):
        for part in (self.moe, self.ffn):
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(name)

    def replace(self, **kw) -> "LayerSpec":
        fields = {f.name: getattr(part, f.name) for part in (self.moe, self.ffn) for f in dataclasses.fields(part)}
        return layer_spec(**{**fields, **kw})

    def build(self, **kw) -> MoEFeedForward:
        return MoEFeedForward(self.moe, self.ffn, **kw)


def layer_spec(**kw) -> LayerSpec:
    """MoE and FFN settings from one set of keywords (the FFN defaults to D -> H, GELU, gated); a keyword
    neither has is an option of the router (``layer_spec(router="stable", freeze_step=3)``)."""
    ffn = {"d_model": D, "d_ff": H, "activation": "gelu", "gated": True}
    ffn.update({k: v for k, v in kw.items() if k in FFN_FIELDS})
    kw.pop("vocab_size", None)  # the layer's table covers the harness's 50 token ids
    for name in ("capacity_group_size", "eval_capacity_factor"):  # None = unset, as 0 in the config
        if kw.get(name, 0) is None:
            kw[name] = 0
    moe = {k: v for k, v in kw.items() if k in MOE_FIELDS}
    options = {k: v for k, v in kw.items() if k not in MOE_FIELDS and k not in FFN_FIELDS}
    cfg = MoEConfig(**moe)
    return LayerSpec(cfg.with_router(cfg.router, **options).check(), FFNConfig(**ffn).check())


def layer_params(layer: MoEFeedForward) -> dict:
    """The layer's variables by their oracle names: router_w, router_b, wi, wg, wo, the experts'
    biases bi, bg, bo, hash_table, expert_bias (those it has)."""
    where = {"router_w": (layer.router, "w"), "router_b": (layer.router, "b"), "hash_table": (layer.router, "table"),
             "expert_bias": (layer.router, "bias"), "wi": (layer, "wi"), "wg": (layer, "wg"), "wo": (layer, "wo"),
             "bi": (layer, "bi"), "bg": (layer, "bg"), "bo": (layer, "bo")}
    return {name: getattr(obj, attr) for name, (obj, attr) in where.items() if getattr(obj, attr, None) is not None}


GRAD_PATHS = {"router_w": ("router", "w"), "router_b": ("router", "b"), "wi": ("wi",), "wg": ("wg",), "wo": ("wo",),
              "bi": ("bi",), "bg": ("bg",), "bo": ("bo",)}


def make_inputs(seed=0, b=B, s=S):
    kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (b, s, D), jnp.float32)
    token_ids = jax.random.randint(kt, (b, s), 0, 50, jnp.int32)
    ct = jax.random.normal(kc, (b, s, D), jnp.float32)  # cotangent for the gradient check
    return x, token_ids, ct


def run_layer(cfg: LayerSpec, mesh_name, x, token_ids, ct, key=None, deterministic=False):
    """Forward + gradients of sum(y * ct) + router_loss on the named mesh; all results as NumPy."""
    mesh = build_mesh(mesh_name)
    rules = "ep+tp" if mesh is not None and "tensor" in mesh.axis_names else "ep"
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(), use_rules(rules):
        layer = cfg.build(rngs=nnx.Rngs(0), vocab_size=50)
        if cfg.router == "loss_free":  # a bias that changes the choices (eval mode keeps it fixed)
            layer.router.bias[...] = jnp.linspace(-0.3, 0.3, cfg.num_experts)
        for i, name in enumerate(("router_b", "bi", "bg", "bo")):  # biases that matter (they start at 0)
            v = layer_params(layer).get(name)
            if v is not None:
                v[...] = jax.random.normal(jax.random.key(100 + i), v.shape, v.dtype)
        if deterministic:
            layer.eval()
        if mesh is not None:
            batch = jax.P(tuple(a for a in ("data", "fsdp", "expert") if a in mesh.axis_names))
            x, token_ids, ct = (jax.sharding.reshard(a, batch) for a in (x, token_ids, ct))

        def loss_fn(layer, x):
            y, aux = layer(x, token_ids, key=key)
            return jnp.sum(y * ct) + aux.router_loss, (y, aux)

        step = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
        (_, (y, aux)), (g_layer, g_x) = step(layer, x)
        x_sharding = jax.typeof(x).sharding.spec if mesh is not None else None
        y_sharding = jax.typeof(y).sharding.spec if mesh is not None else None
        params = {n: np.asarray(v[...]) for n, v in layer_params(layer).items()}
        grads = {}  # trained parameters only: a frozen router's weights and the tables get none
        for name, path in GRAD_PATHS.items():
            node = g_layer
            for part in path:
                node = node[part] if node is not None and part in node else None
            if node is not None:
                grads[name] = np.asarray(node[...])
        grads["x"] = np.asarray(g_x)
        aux = jax.tree.map(np.asarray, aux)
    return dict(y=np.asarray(y), aux=aux, params=params, grads=grads, x_spec=x_sharding, y_spec=y_sharding)
