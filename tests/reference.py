"""Test-only references: greedy decoding that recomputes the whole prefix, and the table of where
each parameter is placed."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.transformer import Transformer
from sharding.rules import mesh_and_rules


def generate_without_cache(model: Transformer, prompt_ids, max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding that re-runs the whole prefix for every token (the reference for the KV cache)."""
    ids = list(np.asarray(prompt_ids).reshape(-1))
    forward = nnx.jit(lambda m, t: m(t)[0][:, -1])
    out, all_logits = [], []
    for _ in range(max_new_tokens):
        logits = forward(model, jnp.asarray([ids], jnp.int32))
        out.append(int(jnp.argmax(logits[0])))
        all_logits.append(np.asarray(logits[0]))
        ids.append(out[-1])
    return out, np.stack(all_logits)


def sharding_table(model_cfg, mesh, rules: str) -> dict[str, tuple]:
    """Parameter path -> PartitionSpec (as a tuple) of a model built on ``mesh`` under ``rules``."""
    with mesh_and_rules(mesh, rules):
        abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    table = {}
    for path, leaf in jax.tree.leaves_with_path(nnx.state(abstract, nnx.Param)):
        name = "/".join(str(p.key) for p in path if hasattr(p, "key"))
        table[name] = tuple(leaf.sharding.spec)
    return table
