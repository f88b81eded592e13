"""Single-expert dispatch: every token goes to one expert (THOR in training), so nothing is
permuted or exchanged but that expert's weights.

Shape letters: see ``moe/__init__.py`` (local to one device, inside ``shard_map``).

``exchange``: the device holding the drawn expert contributes its weights, the others zeros, and
one ``psum`` over ``expert`` gives every device that expert. ``experts``: each device runs its own
tokens through it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.dispatch.base import DispatchPlan, LocalRoute


def single_dispatch(x_BSD: jax.Array, route: LocalRoute, experts, plan: DispatchPlan):
    b, s, d = x_BSD.shape
    with jax.named_scope("exchange"):
        one = experts.one(route.single_expert, plan)
    with jax.named_scope("experts"):
        y_1TD = one.batched(x_BSD.reshape(1, b * s, d))
    return y_1TD.reshape(b, s, d), jnp.zeros((), jnp.float32)
